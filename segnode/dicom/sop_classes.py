"""Which SOP classes the node stores: every storage SOP class the standard defines (pydicom's UID
dictionary, retired ones too, as old modalities still send them), private ones (a valid UID outside the
DICOM root), narrowed by the operator's policy (`storage.sop_classes`). Verification and the service
classes (query/retrieve, storage commitment, worklists, print) are never storage.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from pydicom._uid_dict import UID_dictionary

from segnode.dicom.uids import is_valid_uid

if TYPE_CHECKING:
    from segnode.config import SopClassPolicy

DICOM_ROOT = "1.2.840.10008."
_STORAGE_NAME = re.compile(r"Storage( - For (Presentation|Processing)| - Trial)?$")
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR: a file-set's index, never sent with C-STORE
STANDARD_STORAGE = frozenset(
    uid for uid, (name, kind, *_rest) in UID_dictionary.items()
    if kind == "SOP Class" and _STORAGE_NAME.search(name) and uid != MEDIA_STORAGE_DIRECTORY)


def refusal(sop_class_uid: str, policy: "SopClassPolicy") -> str | None:
    """Why an instance of this SOP class is not stored, or None when it is.

    Args:
        sop_class_uid: the SOP Class UID (an abstract syntax, or a STOW part's Media Storage SOP Class UID).
        policy: the operator's narrowing (deny list, allow list, private classes on or off).
    """
    if not is_valid_uid(sop_class_uid):
        return "the SOP Class UID is not a valid UID"
    if sop_class_uid in policy.deny:
        return "this SOP class is denied by storage.sop_classes.deny"
    if policy.allow is not None and sop_class_uid not in policy.allow:
        return "this SOP class is not in storage.sop_classes.allow"
    if sop_class_uid.startswith(DICOM_ROOT):
        return None if sop_class_uid in STANDARD_STORAGE else "not a storage SOP class"
    return None if policy.private else "private SOP classes are refused (storage.sop_classes.private: false)"
