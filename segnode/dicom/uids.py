"""UID validation: a UID is only ever used in a path after it passed `is_valid_uid`."""

from __future__ import annotations

import re

from pydicom.uid import UID
from pynetdicom._globals import ALL_TRANSFER_SYNTAXES

# JPIP transfer syntaxes reference pixel data held elsewhere: nothing to segment.
JPIP = frozenset({"1.2.840.10008.1.2.4.94", "1.2.840.10008.1.2.4.95", "1.2.840.10008.1.2.4.204",
                  "1.2.840.10008.1.2.4.205"})
# What the node accepts, over DIMSE (negotiated) and STOW-RS (named in each part's file meta) alike:
# the transfer syntaxes pydicom and pynetdicom know, JPIP excepted.
TRANSFER_SYNTAXES: tuple[str, ...] = tuple(ts for ts in ALL_TRANSFER_SYNTAXES if ts not in JPIP)
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")
# names of UIDs newer than pydicom's dictionary
_NAMES = {"1.2.840.10008.5.1.4.1.1.66.7": "Label Map Segmentation Storage"}


def uid_name(uid: str) -> str:
    """A UID's name (pydicom's dictionary, then the newer ones above), else the UID itself."""
    name = _NAMES.get(uid) or UID(uid).name
    return name if name and name != uid else uid


def is_valid_uid(value: str) -> bool:
    """PS3.5 9.1: digits and dots, no leading zeros in a component, at most 64 characters."""
    return 0 < len(value) <= 64 and _UID.match(value) is not None


UID_ROOT = "1.2.826.0.1.3680043.10.1432."  # segnode's root (under the pydicom organisation's arc)


def derived_uid(*parts: str) -> str:
    """The same parts give the same UID: re-encoding or re-pushing a result creates no duplicate."""
    from pydicom.uid import generate_uid

    return str(generate_uid(prefix=UID_ROOT, entropy_srcs=[*parts]))
