"""DICOM networking and encoding.

Importing it adjusts pynetdicom for segnode's use as a client (delivery, tests):
- identifier logging off, so patient names, IDs and birth dates never reach a log;
- TCP_NODELAY on the sockets it opens: without it, Nagle and delayed ACKs stall every
  request/response exchange by ~40 ms.
"""

import socket as _socket

from pynetdicom import _config as _pynetdicom_config
from pynetdicom.transport import AssociationSocket as _AssociationSocket

_pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
_pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False

_create_socket = _AssociationSocket._create_socket


def _create_socket_nodelay(self, address):  # type: ignore[no-untyped-def]
    sock = _create_socket(self, address)
    sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
    return sock


if not getattr(_AssociationSocket._create_socket, "_segnode", False):
    _create_socket_nodelay._segnode = True  # type: ignore[attr-defined]
    _AssociationSocket._create_socket = _create_socket_nodelay  # type: ignore[method-assign]
