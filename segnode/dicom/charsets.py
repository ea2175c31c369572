"""ISO 2022 IR 58 (GB2312 with code extensions) for pydicom, set up explicitly at start.

pydicom 3 maps the defined term to Python's `gb2312` codec and counts it among the encodings "whose
escape sequences Python handles" - but that codec knows no escape sequence: pydicom writes Chinese
text without ESC $ ) A (unreadable as ISO 2022) and leaves "$)A" in the text it reads. A name would come
out wrong in every result. `configure_pydicom` gives the term a codec that writes and strips the escape
sequence (PS3.5 6.1.2.5.3, Annex K: ESC $ ) A designates GB2312 to G1 before each run of Chinese text;
ASCII stays in G0), registered under its own name so nothing else using `gb2312` changes.
"""

from __future__ import annotations

import codecs
import re

import pydicom.charset as charset

NAME = "segnode-iso-2022-ir-58"  # codecs normalizes the name it is asked for: keep it already normal
ESCAPE = b"\x1b$)A"
_ASCII_RUNS = re.compile(r"([\x00-\x7f]+)")


def _encode(text: str, errors: str = "strict") -> tuple[bytes, int]:
    out = bytearray()
    for run in _ASCII_RUNS.split(text):
        if not run:
            continue
        out += run.encode("ascii") if run.isascii() else ESCAPE + run.encode("gb2312", errors)
    return bytes(out), len(text)


def _decode(data: bytes, errors: str = "strict") -> tuple[str, int]:
    raw = bytes(data)
    return raw.replace(ESCAPE, b"").decode("gb2312", errors), len(raw)


def _search(name: str) -> codecs.CodecInfo | None:
    if name.replace("_", "-") != NAME:
        return None
    return codecs.CodecInfo(_encode, _decode, name=NAME)  # type: ignore[arg-type]


def configure_pydicom() -> None:
    """Make pydicom read and write ISO 2022 IR 58 with its escape sequence; idempotent."""
    if charset.python_encoding.get("ISO 2022 IR 58") == NAME:
        return
    codecs.register(_search)
    charset.python_encoding["ISO 2022 IR 58"] = NAME
    charset.CODES_TO_ENCODINGS[ESCAPE] = NAME
    charset.ENCODINGS_TO_CODES[NAME] = ESCAPE
    # our codec writes and strips the escape itself, as Python's do for ISO 2022 JP
    setattr(charset, "handled_encodings", (*charset.handled_encodings, NAME))
