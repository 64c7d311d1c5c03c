"""Local TCP ports and child processes for the servers the project starts itself."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Servers bind with this option too, so a port in TIME_WAIT after a restart counts
        # as free while a port someone listens on does not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def die_with_parent(signum: signal.Signals) -> Callable[[], None] | None:
    """A preexec_fn that makes Linux send `signum` to the child when this process dies, even
    by SIGKILL (SIGTERM lets a server stop its own workers; SIGKILL for a broker).

    PR_SET_PDEATHSIG fires when the *thread* that started the child ends, so it is only used
    from the main thread: a child started from a worker thread would otherwise die with that
    thread. Elsewhere the atexit hooks (clean exits and unhandled exceptions) must do.
    """
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return None
    try:
        # Resolved here, in the parent: the forked child should do as little as possible.
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    # int prctl(int option, unsigned long arg2, ...): declared so arg2 is passed full width.
    prctl.argtypes = [ctypes.c_int, *[ctypes.c_ulong] * 4]
    prctl.restype = ctypes.c_int
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
        # The parent may have died between fork() and prctl(): then nobody would signal us.
        if os.getppid() != parent:
            os._exit(1)

    return preexec
