"""Stage lines for long CLI work (demo, infer, import, train) on a terminal; nothing when the output is not
a terminal (a script, a pipe, a log file), where the final report alone is wanted."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Prints "[  12.3 s] <what is happening now>" to `stream` (standard error) when it is a terminal.

    Args:
        stream: where the lines go; standard error by default, so standard output keeps only the report.
        enabled: force on or off; None: on when `stream` is a terminal.
    """

    def __init__(self, stream: TextIO | None = None, enabled: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.start = time.monotonic()
        self._last = ""

    def __call__(self, what: str) -> None:
        """Say what starts now; a repeat of the previous line is not printed again."""
        if not self.enabled or what == self._last:
            return
        self._last = what
        self.stream.write(f"[{time.monotonic() - self.start:6.1f} s] {what}\n")
        self.stream.flush()
