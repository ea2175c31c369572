"""One root for segnode's own errors, carrying what the caller must decide from.

`retryable`: whether trying the same thing again later can succeed (a PACS that was down, a lost
connection) or not (a series that cannot be one volume, a model version that is no longer
installed). The worker retries or fails a job for good on this flag alone; the CLI exits with
`exit_status` and prints the message, which names the object and what to do.

Errors that never leave their module (a peer that went away mid-PDU, a malformed multipart body)
still derive from it, so `except SegnodeError` is the one way to tell ours from a bug.
"""

from __future__ import annotations


class SegnodeError(Exception):
    """Base of every error segnode raises on purpose.

    Attributes:
        retryable: True when the same operation may succeed later without anyone changing anything.
        exit_status: the status `segnode` exits with when this error ends a command (2: usage, input
            or configuration that must be fixed; 1: a check that failed).
    """

    retryable: bool = False
    exit_status: int = 2


class InputError(SegnodeError, ValueError):
    """Bytes or files received that cannot be read as what they claim to be (never retried)."""


class ConfigurationError(SegnodeError):
    """Settings, rules, tools or models that must be fixed by the operator before this can work."""


class TransientError(SegnodeError):
    """A peer or resource that is unavailable now and may be available later (retried with backoff)."""

    retryable = True
