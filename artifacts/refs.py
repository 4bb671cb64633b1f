"""Parsing references: `name:tag`, `name@sha256:<hex>`, `sha256:<hex>`, digest prefixes."""

from __future__ import annotations

import re
from dataclasses import dataclass

from artifacts.digest import Digest
from artifacts.errors import InvalidDigest, InvalidReference

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._/-]{0,254}$")
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
PREFIX_RE = re.compile(r"^(sha256:)?[0-9a-f]{4,64}$")
DEFAULT_TAG = "latest"


@dataclass(frozen=True)
class Reference:
    """A parsed reference. Exactly one of (tag, digest, prefix) is the lookup key."""

    text: str
    name: str | None = None
    tag: str | None = None
    digest: Digest | None = None
    prefix: str | None = None


@dataclass(frozen=True)
class TagName:
    name: str
    tag: str

    def __str__(self) -> str:
        return f"{self.name}:{self.tag}"


def parse_tag_name(text: str) -> TagName:
    """Parse `name:tag` (a destination for `kiln tag`): both parts required and valid."""
    name, sep, tag = text.rpartition(":")
    if not sep or not name:
        raise InvalidReference(f"invalid tag {text!r}: expected NAME:TAG (for example bert:prod)")
    _check_name(name, text)
    if not TAG_RE.match(tag):
        raise InvalidReference(
            f"invalid tag {text!r}: the tag must be letters, digits, '.', '_' or '-' (max 128)"
        )
    return TagName(name, tag)


def _check_name(name: str, text: str) -> None:
    if not NAME_RE.match(name):
        raise InvalidReference(
            f"invalid reference {text!r}: the name must be lowercase letters, digits, '.', '_',"
            " '-' or '/'"
        )


def parse_reference(text: str) -> Reference:
    """Parse any reference form accepted on the command line."""
    text = text.strip()
    if not text:
        raise InvalidReference("empty reference")
    if "@" in text:
        name, _, digest_text = text.partition("@")
        _check_name(name, text)
        try:
            return Reference(text, name=name, digest=Digest.parse(digest_text))
        except InvalidDigest:
            raise InvalidReference(
                f"invalid reference {text!r}: expected NAME@sha256:<64 hex>"
            ) from None
    if text.startswith("sha256:"):
        try:
            return Reference(text, digest=Digest.parse(text))
        except InvalidDigest:
            if PREFIX_RE.match(text):
                return Reference(text, prefix=text.removeprefix("sha256:"))
            raise InvalidReference(f"invalid digest reference {text!r}") from None
    if PREFIX_RE.match(text) and len(text) >= 6 and ":" not in text:
        return Reference(text, prefix=text)
    if ":" in text:
        tag_name = parse_tag_name(text)
        return Reference(text, name=tag_name.name, tag=tag_name.tag)
    _check_name(text, text)
    return Reference(text, name=text, tag=DEFAULT_TAG)
