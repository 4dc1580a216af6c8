"""Free TCP ports on loopback, picked at run time so parallel test runs never collide."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port the kernel just handed out for 127.0.0.1 (released again before returning).

    There is a short window in which another process could take it; the gateway
    fixture retries its start when a bind fails for that reason.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
