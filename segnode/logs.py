"""Logging for every entry point (the CLI and the supervised stages): one format, quiet libraries."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str) -> None:
    """Log to standard error at `level`; pynetdicom at WARNING; highdicom and alembic (a line per copied
    module / migration step) only when DEBUG."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    if logging.getLevelName(str(level).upper()) != logging.DEBUG:
        for chatty in ("highdicom", "alembic"):
            logging.getLogger(chatty).setLevel(logging.WARNING)
