"""Locate the external DICOM peers (dcmtk) the demo, benchmarks and tests drive.

pynetdicom installs Python scripts named storescu/echoscu too, which may come first on PATH;
dcmtk's binaries are looked up by absolute path first and checked to be dcmtk.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from segnode.errors import ConfigurationError


class ToolMissing(ConfigurationError, RuntimeError):
    pass


def dcmtk(name: str) -> str:
    for candidate in (Path("/usr/bin") / name, Path("/usr/local/bin") / name):
        if candidate.exists():
            return str(candidate)
    found = shutil.which(name)
    if found:
        out = subprocess.run([found, "--version"], capture_output=True, text=True, timeout=10).stdout
        if "dcmtk" in out.lower() or "offis" in out.lower():
            return found
    raise ToolMissing(f"dcmtk's {name} not found; install it with: apt-get install -y dcmtk")
