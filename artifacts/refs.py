"""Parsing references: `name:tag`, `name@sha256:<hex>`, `sha256:<hex>`, digest prefixes."""

from __future__ import annotations

import re
from dataclasses import dataclass

from artifacts.digest import Digest
from artifacts.errors import InvalidDigest, InvalidReference

# OCI distribution's reference grammar, without a registry domain: path components of
# lowercase letters and digits joined by '.', '_', '__' or dashes, separated by '/'. Every
# name is therefore a safe relative path ('.', '..', empty parts and control characters
# cannot match) and printable ASCII. \A...\Z, because `$` also matches before a final "\n".
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
NAME_MAX = 255
NAME_RE = re.compile(rf"\A(?=.{{1,{NAME_MAX}}}\Z){_COMPONENT}(?:/{_COMPONENT})*\Z")
TAG_RE = re.compile(r"\A[A-Za-z0-9_][A-Za-z0-9._-]{0,127}\Z")
PREFIX_RE = re.compile(r"\A(sha256:)?[0-9a-f]{4,64}\Z")
DEFAULT_TAG = "latest"
# What the grammar allows, to follow "must be " in messages.
NAME_RULE = (
    "lowercase letters and digits, joined by '.', '_', '__' or '-' and separated by '/'"
    f" (for example team/bert-base; at most {NAME_MAX} characters)"
)
TAG_RULE = "letters, digits, '.', '_' or '-', not starting with '.' or '-' (max 128)"


def is_valid_name(name: object) -> bool:
    """True for a release name the grammar accepts (the one check for every entry point)."""
    return isinstance(name, str) and NAME_RE.match(name) is not None


def is_valid_tag(tag: object) -> bool:
    """True for a tag the grammar accepts."""
    return isinstance(tag, str) and TAG_RE.match(tag) is not None


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
    if not is_valid_tag(tag):
        raise InvalidReference(f"invalid tag {text!r}: the tag must be {TAG_RULE}")
    return TagName(name, tag)


def _check_name(name: str, text: str) -> None:
    if not is_valid_name(name):
        raise InvalidReference(f"invalid reference {text!r}: the name must be {NAME_RULE}")


def parse_reference(text: str) -> Reference:
    """Parse any reference form accepted on the command line (no surrounding whitespace)."""
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
