"""Listening sockets for the node's DIMSE and HTTP sides, bound before anything else starts, so a port in use
or an address the host does not have ends start-up with one line naming the setting (not a traceback, nor
a node running without its HTTP side)."""

from __future__ import annotations

import socket

from segnode.errors import ConfigurationError


def listening_socket(host: str, port: int, setting: str, backlog: int = 128) -> socket.socket:
    """A TCP socket bound to (host, port) and listening.

    Args:
        host: IPv4 or IPv6 address (or a name) to bind.
        port: TCP port, 0 for any free one.
        setting: the settings section named in the error (e.g. "dimse", "http").

    Raises:
        ConfigurationError: the address cannot be bound (in use, not this host's, not an address).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        raise ConfigurationError(f"cannot listen on {setting}.host {host!r}, {setting}.port {port}: {reason} "
                                 f"(another program on that port, or an address this host does not have?)") from None
    return sock
