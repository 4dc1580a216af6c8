"""A gateway's ports are its own: checked free before anything starts.

Envoy's listener is rendered with ``enable_reuse_port: false`` and the
processor's TCP port is bound without SO_REUSEPORT (except by its own
workers), so a second gateway on a taken port cannot share it. This check
turns that into one clear line before any process starts, instead of a child
failing later. (A port taken between the check and the bind still fails: Envoy
rejects the listener, which ``up`` reports the same way.)
"""

from __future__ import annotations

import socket

from extproc.config.model import GatewayConfig


class PortTaken(Exception):
    """One of the gateway's ports is in use; the message names it and its role."""


def gateway_ports(config: GatewayConfig) -> list[tuple[str, str, int]]:
    """(role, address, port) for every TCP port the gateway listens on."""
    ports = [("listener", config.listener.address, config.listener.port),
             ("admin", config.admin.address, config.admin.port)]  # fmt: skip
    if config.metrics is not None:
        ports.append(("metrics", config.metrics.address, config.metrics.port))
    if config.extproc.socket is None:
        ports.append(("extproc", config.extproc.address, config.extproc.port))
    return ports


def check_free(ports: list[tuple[str, str, int]]) -> None:
    """Raise PortTaken for the first port something else listens on."""
    for role, address, port in ports:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            # As Envoy and grpc bind: past TIME_WAIT leftovers, never beside a listener.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((address, port))
            except OSError as exc:
                raise PortTaken(
                    f"{role} port {port} on {address} is in use by another program "
                    f"(another gateway?): {exc.strerror or exc}"
                ) from None
