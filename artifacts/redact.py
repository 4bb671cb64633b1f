"""Hiding credentials in URLs before they are printed, logged or put in an error message.

Index URLs (`postgresql+psycopg://user:password@host/db`) and store URLs can carry a password;
every message that shows a URL goes through `redact_url`, and the CLI runs each error line
through `redact_text` as a last net for messages written by libraries. This parses nothing
strictly: a URL too malformed for SQLAlchemy (a bad port, an unknown driver) is exactly the
one that ends up in an error message.
"""

from __future__ import annotations

import re

MASK = "***"
# scheme://  then the text up to the next whitespace or quote (the URL, as far as it goes),
# less trailing punctuation that belongs to the sentence around it.
_URL = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<rest>[^\s'\"<>]*?)"
    r"(?=[:,.;)]*(?:[\s'\"<>]|\Z))"
)
_SECRET_PARAM = re.compile(
    r"(?P<key>[?&;](?:[A-Za-z0-9_.\-]*(?:pass|secret|token|credential|key)[A-Za-z0-9_.\-]*)=)"
    r"(?P<value>[^&;#\s'\"]*)",
    re.IGNORECASE,
)


def redact_url(url: str) -> str:
    """`url` with the password in its user info and secret-looking query values masked.

    `postgresql://u:s3cr3t@host/db` -> `postgresql://u:***@host/db`; a URL without
    credentials comes back unchanged.
    """
    match = _URL.fullmatch(url)
    if match is None:
        return _SECRET_PARAM.sub(_mask_param, url)
    return _redact(match)


def redact_text(text: str) -> str:
    """Every URL found in `text` passed through `redact_url`."""
    return _URL.sub(_redact, text)


def _redact(match: re.Match[str]) -> str:
    scheme, rest = match.group("scheme"), match.group("rest")
    # The user info ends at the last '@' before the query: a password may hold '@' or '/',
    # and masking too much is harmless where masking too little is a leak.
    query_at = rest.find("?")
    head = rest if query_at < 0 else rest[:query_at]
    at = head.rfind("@")
    if at >= 0:
        user, colon, _ = head[:at].partition(":")
        rest = f"{user}:{MASK}" + rest[at:] if colon else rest
    return scheme + _SECRET_PARAM.sub(_mask_param, rest)


def _mask_param(match: re.Match[str]) -> str:
    return match.group("key") + MASK
