"""Small Kiln JSON documents stored as blobs so the index can be rebuilt from blobs alone."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from artifacts.digest import canonical_json
from artifacts.manifest import RELEASE_MEDIA_TYPE
from artifacts.refs import NAME_RULE, TAG_RULE, is_valid_name, is_valid_tag
from artifacts.validate import Reader

TAG_EVENT_MEDIA_TYPE = "application/vnd.kiln.tag-event.v1+json"
COMPILATION_MEDIA_TYPE = "application/vnd.kiln.compilation.v1+json"
RUN_MEDIA_TYPE = "application/vnd.kiln.run.v1+json"

KIND_BY_MEDIA_TYPE = {
    RELEASE_MEDIA_TYPE: "release",
    TAG_EVENT_MEDIA_TYPE: "tag-event",
    COMPILATION_MEDIA_TYPE: "compilation",
    RUN_MEDIA_TYPE: "run",
}
SNIFF_LIMIT = 16 * 1024 * 1024


@dataclass(frozen=True)
class TagEvent:
    """One move of a tag: the truth behind tag history (the index row is its copy).

    `previous` is the manifest the tag pointed at before; `previous_event` the digest of the
    event that set it, so the events of one tag form a chain that history walks from the
    tag's ref object (artifacts/tagrefs.py) without the index. Events written before the
    chain existed have no `previous_event`: a walk stops there.
    """

    name: str
    tag: str
    digest: str
    previous: str | None
    at: float
    user: str
    host: str
    reason: str
    previous_event: str | None = None

    def to_bytes(self) -> bytes:
        return canonical_json({"mediaType": TAG_EVENT_MEDIA_TYPE, **asdict(self)})

    @classmethod
    def from_json(cls, value: Any, source: str) -> TagEvent:
        r = Reader(value, "", source)
        name, tag = r.text("name"), r.text("tag")
        if not is_valid_name(name):
            r.fail("name", f"must be {NAME_RULE}, got {name!r}")
        if not is_valid_tag(tag):
            r.fail("tag", f"must be {TAG_RULE}, got {tag!r}")
        return cls(
            name=name,
            tag=tag,
            digest=r.text("digest"),
            previous=r.get("previous", str, required=False),
            at=r.number("at"),
            user=r.get("user", str, required=False) or "",
            host=r.get("host", str, required=False) or "",
            reason=r.get("reason", str, required=False) or "",
            previous_event=r.get("previous_event", str, required=False),
        )


def sniff_document(data: bytes) -> tuple[str, dict[str, Any]] | None:
    """(kind, parsed JSON) when the bytes are a Kiln document, else None."""
    if not data.startswith(b"{") or b'"mediaType"' not in data:
        return None
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(value, dict):
        return None
    kind = KIND_BY_MEDIA_TYPE.get(value.get("mediaType"))  # type: ignore[arg-type]
    return (kind, value) if kind else None
