"""A closed-loop HTTP/1.1 load generator on asyncio, for machines without `wrk`: each of
`connections` keep-alive connections sends the same POST again as soon as it is answered.

    python -m benchmarks.loadgen URL BODY_FILE --connections 16 --seconds 10

Prints one JSON object: requests, non_2xx, p50_ms, p99_ms. It is slower than wrk (one Python
process); `benchmarks.serve` measures its CPU and says when it, not the server, was the limit.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path
from urllib.parse import urlsplit

import click


async def _connection(
    host: str, port: int, request: bytes, until: float, latencies: list[float], statuses: list[int]
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while (started := time.perf_counter()) < until:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            length = next(
                int(line.split(":", 1)[1])
                for line in lines
                if line.lower().startswith("content-length:")
            )
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            statuses.append(int(lines[0].split()[1]))
    finally:
        writer.close()


async def generate(url: str, body: bytes, connections: int, seconds: float) -> dict[str, float]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = (
        f"POST {parts.path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    latencies: list[float] = []
    statuses: list[int] = []
    until = time.perf_counter() + seconds
    await asyncio.gather(
        *(_connection(host, port, request, until, latencies, statuses) for _ in range(connections))
    )
    if not latencies:
        return {"requests": 0, "non_2xx": 0, "p50_ms": 0.0, "p99_ms": 0.0}
    cuts = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return {
        "requests": len(latencies),
        "non_2xx": sum(not 200 <= status < 300 for status in statuses),
        "p50_ms": cuts[49] * 1e3,
        "p99_ms": cuts[98] * 1e3,
    }


@click.command()
@click.argument("url")
@click.argument("body_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--connections", default=16, show_default=True)
@click.option("--seconds", default=10.0, show_default=True)
def main(url: str, body_file: Path, connections: int, seconds: float) -> None:
    result = asyncio.run(generate(url, body_file.read_bytes(), connections, seconds))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
