"""DIMSE command sets: the few fields a C-ECHO/C-STORE SCP reads and writes (implicit VR LE)."""

from __future__ import annotations

import struct

from segnode.errors import InputError

C_STORE_RQ, C_STORE_RSP, C_ECHO_RQ, C_ECHO_RSP = 0x0001, 0x8001, 0x0030, 0x8030
NO_DATASET = 0x0101

AFFECTED_SOP_CLASS, COMMAND_FIELD, MESSAGE_ID, DATASET_TYPE = 0x0002, 0x0100, 0x0110, 0x0800
AFFECTED_SOP_INSTANCE = 0x1000
_US = {COMMAND_FIELD, MESSAGE_ID, 0x0120, DATASET_TYPE, 0x0700, 0x0900}


class BadCommand(InputError):
    """The command set cannot be parsed."""


def parse_command(data: bytes) -> dict[int, int | str]:
    """Decode a command set into {element: value} (group 0000 only, as PS3.7 requires)."""
    out: dict[int, int | str] = {}
    pos, end = 0, len(data)
    while pos < end:
        if pos + 8 > end:
            raise BadCommand("truncated command element")
        group, elem, length = struct.unpack_from("<HHI", data, pos)
        pos += 8
        if group != 0 or pos + length > end:
            raise BadCommand(f"bad command element (0x{group:04X},{elem:04X})")
        raw = data[pos : pos + length]
        if elem in _US and length == 2:
            out[elem] = struct.unpack("<H", raw)[0]
        elif elem != 0x0000:
            out[elem] = raw.rstrip(b"\x00 ").decode("ascii", "replace")
        pos += length
    return out


def _el(elem: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00"
    return struct.pack("<HHI", 0, elem, len(value)) + value


def _comment(text: str) -> bytes:
    clean = "".join(c if c.isprintable() and c != "\\" else " " for c in text)[:64]
    raw = clean.encode("ascii", "replace")
    return raw + b" " if len(raw) % 2 else raw


def response(command: int, message_id: int, sop_class: str, status: int, sop_instance: str = "",
             comment: str = "") -> bytes:
    """Encode a C-STORE-RSP / C-ECHO-RSP command set."""
    body = _el(AFFECTED_SOP_CLASS, sop_class.encode()[:64])
    body += _el(COMMAND_FIELD, struct.pack("<H", command))
    body += _el(0x0120, struct.pack("<H", message_id))
    body += _el(DATASET_TYPE, struct.pack("<H", NO_DATASET))
    body += _el(0x0900, struct.pack("<H", status))
    if comment and status != 0:
        body += _el(0x0902, _comment(comment))
    if sop_instance:
        body += _el(AFFECTED_SOP_INSTANCE, sop_instance.encode()[:64])
    return _el(0x0000, struct.pack("<I", len(body))) + body
