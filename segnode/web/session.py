"""The dashboard's sign-in cookie: a signed expiry, not the token itself.

The cookie holds `<expiry>.<HMAC-SHA256(token, "segnode-session:<expiry>")>`: a browser that signed in
holds a proof that ends (SESSION_SECONDS), never the token, and changing `http.token` ends every session.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from urllib.parse import parse_qs

SESSION_SECONDS = 12 * 3600
MAX_SIGN_IN_BYTES = 4096  # a sign-in body holds one token; anything longer is refused before it is read whole


def _mac(secret: str, expiry: int) -> str:
    return hmac.new(secret.encode(), f"segnode-session:{expiry}".encode(), hashlib.sha256).hexdigest()


def session_value(secret: str, now: float | None = None) -> str:
    """A new cookie value for the token `secret`, valid SESSION_SECONDS from `now` (Unix seconds)."""
    expiry = int(now if now is not None else time.time()) + SESSION_SECONDS
    return f"{expiry}.{_mac(secret, expiry)}"


def session_valid(value: str, secret: str, now: float | None = None) -> bool:
    """Whether `value` is a cookie signed with `secret` that has not expired."""
    expiry, _, mac = value.partition(".")
    if not expiry.isdigit() or len(expiry) > 12:
        return False
    if int(expiry) < (now if now is not None else time.time()):
        return False
    return hmac.compare_digest(mac.encode("ascii", "replace"), _mac(secret, int(expiry)).encode())


def token_field(body: bytes, content_type: str) -> str:
    """The `token` of a sign-in body: a form (application/x-www-form-urlencoded) or a JSON object; "" when
    absent or unreadable."""
    if content_type.split(";")[0].strip().lower() == "application/x-www-form-urlencoded":
        return parse_qs(body.decode("utf-8", "replace")).get("token", [""])[0]
    import json

    try:
        found = json.loads(body or b"{}").get("token", "")
    except (ValueError, AttributeError):
        return ""
    return found if isinstance(found, str) else ""
