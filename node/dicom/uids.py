"""UID validation: a UID is only ever used in a path after it passed `is_valid_uid`."""

from __future__ import annotations

import re

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")


def is_valid_uid(value: str) -> bool:
    """PS3.5 9.1: digits and dots, no leading zeros in a component, at most 64 characters."""
    return 0 < len(value) <= 64 and _UID.match(value) is not None
