"""/health, /ready and /metrics for the processes that are not functions (the push adapter, the
outbox relay, the dead-letter recorder), served on OPS_PORT from a thread of their own.

/health is 200 while the process's loops beat (moderation.heartbeat); /ready adds the
process's own check (its broker and database answer).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from moderation import heartbeat
from shared import metrics

log = logging.getLogger(__name__)

# A loop that has not beaten for this long is stuck: /health says so.
STALE_AFTER_SECONDS = 30.0


def health() -> tuple[int, dict[str, object]]:
    age = heartbeat.age()
    if age is None or age > STALE_AFTER_SECONDS:
        return 503, {"status": "unhealthy", "last_beat_seconds_ago": age}
    return 200, {"status": "ok"}


def serve(port: int, role: str, ready: Callable[[], dict[str, bool]]) -> ThreadingHTTPServer:
    """Start the ops server on port (0.0.0.0); `ready` returns named checks."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0].rstrip("/")
            if path == "/health":
                self._json(*health())
            elif path == "/ready":
                checks = ready()
                ok = all(checks.values())
                body = {
                    "status": "ready" if ok else "not ready",
                    "role": role,
                    "checks": {k: "ok" if v else "unavailable" for k, v in checks.items()},
                }
                self._json(200 if ok else 503, body)
            elif path == "/metrics":
                payload, content_type = metrics.exposition()
                self._send(200, payload, content_type)
            else:
                self._json(404, {"detail": "Not Found"})

        def do_HEAD(self) -> None:
            self.do_GET()

        def _not_allowed(self) -> None:
            self._json(405, {"detail": "Method Not Allowed"}, {"Allow": "GET, HEAD"})

        do_POST = do_PUT = do_DELETE = do_PATCH = _not_allowed

        def _json(self, status: int, body: object, headers: dict[str, str] | None = None) -> None:
            self._send(status, json.dumps(body).encode(), "application/json", headers)

        def _send(
            self, status: int, payload: bytes, content_type: str,
            headers: dict[str, str] | None = None,
        ) -> None:  # fmt: skip
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        def log_message(self, format: str, *args: object) -> None:  # probes: not logged
            pass

    # Every interface: it runs in a container, whose port is all that is published.
    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)  # nosec B104
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name=f"ops-{role}", daemon=True).start()
    log.info("ops endpoints on :%d (/health, /ready, /metrics)", port)
    return server
