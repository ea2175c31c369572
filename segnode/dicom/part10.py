"""PS3.10 file meta: written by us in front of the received dataset bytes, parsed from STOW parts.

Our meta is deterministic (no receive time, no sender AE), so the same dataset received twice,
over DIMSE or over STOW-RS, yields the same file bytes and the same SHA-256.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from segnode import __version__

from segnode.errors import InputError

PREAMBLE = b"\x00" * 128 + b"DICM"
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1432.1"
IMPLEMENTATION_VERSION = f"SEGNODE_{__version__}"[:16]
MAX_META = 64 * 1024


class NotPart10(InputError):
    """The bytes do not start with a PS3.10 preamble and file meta group."""


def _element(elem: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00" if vr in (b"UI", b"OB") else b" "
    if vr == b"OB":
        return struct.pack("<HH2sHI", 0x0002, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, elem, vr, len(value)) + value


def file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """Preamble, 'DICM' and the file meta group (explicit VR little endian)."""
    body = b"".join(
        (
            _element(0x0001, b"OB", b"\x00\x01"),
            _element(0x0002, b"UI", sop_class_uid.encode()),
            _element(0x0003, b"UI", sop_instance_uid.encode()),
            _element(0x0010, b"UI", transfer_syntax_uid.encode()),
            _element(0x0012, b"UI", IMPLEMENTATION_CLASS_UID.encode()),
            _element(0x0013, b"SH", IMPLEMENTATION_VERSION.encode()),
        )
    )
    return PREAMBLE + struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body)) + body


@dataclass
class Meta:
    transfer_syntax_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    dataset_offset: int


def parse_meta(head: bytes) -> Meta | None:
    """Parse the meta group at the start of `head`; None when more bytes are needed.

    A meta group without a Transfer Syntax UID gives `transfer_syntax_uid` "" (the dataset cannot be read,
    but its SOP Class and Instance UIDs can still be reported).

    Raises:
        NotPart10: no preamble and DICM prefix, or a malformed or over-long meta group.
    """
    if len(head) < 132:
        return None
    if head[128:132] != b"DICM":
        raise NotPart10("no DICM prefix after the 128-byte preamble")
    pos, values = 132, {}
    while True:
        if pos + 8 > len(head):
            if len(head) >= MAX_META:
                raise NotPart10("file meta group too long")
            return None
        group, elem = struct.unpack_from("<HH", head, pos)
        if group != 0x0002:
            break
        vr = head[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"UN", b"UT", b"SQ", b"UC", b"UR"):
            if pos + 12 > len(head):
                return None
            length, start = struct.unpack_from("<I", head, pos + 8)[0], pos + 12
        else:
            length, start = struct.unpack_from("<H", head, pos + 6)[0], pos + 8
        if length == 0xFFFFFFFF or start + length > MAX_META:
            raise NotPart10("malformed file meta element")
        if start + length > len(head):
            return None
        values[elem] = head[start : start + length].rstrip(b"\x00 ").decode("ascii", "replace")
        pos = start + length
    return Meta(values.get(0x0010, ""), values.get(0x0002, ""), values.get(0x0003, ""), pos)
