"""pynetdicom set up for segnode's use as a client (delivery; tests' peers), called at start by every
entry point and before each association: nothing is changed merely by importing segnode.

- identifier logging off, so patient names, IDs and birth dates never reach a log;
- TCP_NODELAY on the sockets it opens: without it, Nagle and delayed ACKs stall every
  request/response exchange by ~40 ms.
"""

from __future__ import annotations

import socket
from typing import Any

from pynetdicom import _config as pynetdicom_config
from pynetdicom.transport import AssociationSocket


def configure_pynetdicom() -> None:
    """Apply the settings above; idempotent."""
    pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
    pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False
    if getattr(AssociationSocket._create_socket, "_segnode", False):
        return
    create_socket = AssociationSocket._create_socket

    def create_socket_nodelay(self: AssociationSocket, address: Any) -> socket.socket:
        sock = create_socket(self, address)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    create_socket_nodelay._segnode = True  # type: ignore[attr-defined]
    AssociationSocket._create_socket = create_socket_nodelay  # type: ignore[method-assign]
