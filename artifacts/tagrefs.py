"""Tag ref objects: each `name:tag` as a small JSON object beside the blobs.

`refs/<name>/<tag>` in the store (a file in a local store, one object on S3) holds the tag's
name, the manifest digest it points at, the digest of the tag-event blob that set it, and
when. An inference host resolves a tag with this one read and needs no index, as an OCI
registry resolves a tag with one GET and the Hugging Face cache keeps `refs/` files.

Agreement with the index: the ref object is the truth and the index's tag rows are its copy.
`Store.move_tag` writes, while it holds the index's per-tag write lock: the tag-event blob
(whose `previous_event` names the event the ref object pointed at), then the index rows in
the open transaction, then the ref object, then commits. Writers of one store share its
index, so moves are serialised and each event's predecessor is the ref object's event at
that moment: one unbroken chain. If the process dies between the ref write and the commit,
the ref object is ahead of the index; the next move reads its predecessor from the ref
object (so the chain still holds) and `kiln reindex` rebuilds the missing index rows from
the event blobs.

A reader sees the old ref object or the new one, never a mix: a local ref is replaced by
rename, an S3 object by one PutObject.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from artifacts.digest import Digest, canonical_json
from artifacts.errors import InvalidManifest, InvalidReference
from artifacts.validate import Reader

REF_MEDIA_TYPE = "application/vnd.kiln.ref.v1+json"


class RefBackend(Protocol):
    """The small named-object API a backend offers for ref objects (local and S3 do)."""

    def read_ref(self, key: str) -> bytes | None: ...

    def write_ref(self, key: str, data: bytes) -> None: ...

    def delete_ref(self, key: str) -> bool: ...

    def iter_refs(self, prefix: str = "") -> Iterator[str]: ...

    def ref_location(self, key: str) -> str: ...


@dataclass(frozen=True)
class TagRef:
    """Where `name:tag` points, and the tag event that put it there."""

    name: str
    tag: str
    digest: str
    event: str | None
    moved_at: float

    @property
    def key(self) -> str:
        return ref_key(self.name, self.tag)

    def to_bytes(self) -> bytes:
        return canonical_json(
            {
                "mediaType": REF_MEDIA_TYPE,
                "name": self.name,
                "tag": self.tag,
                "digest": self.digest,
                "event": self.event,
                "moved_at": self.moved_at,
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes, source: str) -> TagRef:
        try:
            value: Any = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidManifest(f"{source}: not a Kiln ref object ({exc})") from None
        r = Reader(value, "", source)
        if value.get("mediaType") != REF_MEDIA_TYPE:
            r.fail("mediaType", f"must be {REF_MEDIA_TYPE}")
        digest = r.digest("digest")
        event = r.digest("event", required=False)
        return cls(
            name=r.text("name"),
            tag=r.text("tag"),
            digest=str(digest),
            event=str(event) if event else None,
            moved_at=r.number("moved_at"),
        )


def ref_key(name: str, tag: str) -> str:
    """`name/tag`, refusing parts that would leave the refs folder."""
    parts = [*name.split("/"), tag]
    if any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        raise InvalidReference(f"invalid tag {name}:{tag}: a name part is empty or starts with '.'")
    return "/".join(parts)


def has_refs(backend: object) -> bool:
    """Whether the backend can hold ref objects (every built-in backend can)."""
    return callable(getattr(backend, "read_ref", None))


def read_tag_ref(backend: RefBackend, name: str, tag: str) -> TagRef | None:
    """The ref object of `name:tag`, or None when the store has none."""
    key = ref_key(name, tag)
    data = backend.read_ref(key)
    if data is None:
        return None
    ref = TagRef.from_bytes(data, backend.ref_location(key))
    if (ref.name, ref.tag) != (name, tag):
        raise InvalidManifest(
            f"{backend.ref_location(key)}: names {ref.name}:{ref.tag}, not {name}:{tag}"
        )
    return ref


def write_tag_ref(backend: RefBackend, ref: TagRef) -> None:
    """Replace the ref object atomically (readers see the old or the new, whole)."""
    Digest.parse(ref.digest)
    backend.write_ref(ref.key, ref.to_bytes())


def list_tag_refs(backend: RefBackend, name: str | None = None) -> list[TagRef]:
    """Every ref object (of one model when `name` is given), sorted by name and tag."""
    prefix = f"{name}/" if name else ""
    out = []
    for key in backend.iter_refs(prefix):
        ref_name, _, tag = key.rpartition("/")
        if not ref_name or (name is not None and ref_name != name):
            continue
        data = backend.read_ref(key)
        if data is None:  # deleted since the listing
            continue
        ref = TagRef.from_bytes(data, backend.ref_location(key))
        if (ref.name, ref.tag) == (ref_name, tag):
            out.append(ref)
    return sorted(out, key=lambda r: (r.name, r.tag))
