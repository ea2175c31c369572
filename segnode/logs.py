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


def printable(text: str, limit: int = 200) -> str:
    """`text` safe for a log line, an audit detail or XML: control and other unprintable characters (and lone
    surrogates) written as escapes (\\x1b, \\ud800), cut to `limit` characters with a note of how many more
    there were. A peer chooses what it sends (a path, a header): it may not forge log lines or make an audit
    message invalid XML, and it may not make either grow without bound."""
    clipped = text[:limit]
    clean = "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                    for c in clipped)
    return clean + (f"… (+{len(text) - limit} characters)" if len(text) > limit else "")
