"""Reading a stored instance with pydicom, every value decoded at once.

pydicom decodes element values lazily, on first access: an instance our walker accepted (it checks
element headers, not values) can still fail deep inside whatever code first touches a bad value. Here
every value is decoded on read, so such an instance fails in one place, with one error that names it.
"""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from segnode.dicom.charsets import configure_pydicom
from segnode.errors import InputError


class UnreadableInstance(InputError):
    """pydicom cannot decode a stored instance; the message names the file and what failed."""


def decode_standard(ds: Dataset) -> None:
    """Decode every standard element, nested ones included. Private elements stay as bytes: nothing in
    segnode reads them, and vendors write some that disagree with pydicom's private dictionary (a
    decimal string where it expects FD): they must not cost a series."""
    for tag in list(ds.keys()):
        if tag.is_private:
            continue
        element = ds[tag]  # decodes the value
        if element.VR == "SQ":
            for item in element.value:
                decode_standard(item)


def read_dataset(path: Path, *, pixels: bool = True) -> Dataset:
    """The instance at `path`, every element value decoded (the pixel data stays encoded bytes).

    Args:
        pixels: False stops before the pixel data (headers only, for routing).
    Raises:
        UnreadableInstance: a standard element's value pydicom cannot decode (wrong length for its VR,
            unknown VR, ...), or a file that is not DICOM.
        OSError, MemoryError: the file cannot be read now (may pass later; not the instance's fault).
    """
    configure_pydicom()  # ISO 2022 IR 58 read with its escape sequence (idempotent)
    try:
        ds = dcmread(path, stop_before_pixels=not pixels)
        decode_standard(ds)
    except (OSError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for undecodable values
        raise UnreadableInstance(f"{path.name} cannot be read: {type(exc).__name__}: {str(exc).splitlines()[0]}") \
            from exc
    return ds
