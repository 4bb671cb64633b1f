"""The reads a deploy host makes, without the SQL index: a tag's ref object, then blobs.

Opening a full ``Store`` imports SQLAlchemy and the index modules (about half a second of a
load) and opens the index, though a tag with a ref object resolves without it
(artifacts/tagrefs.py). ``DeployStore`` is that path alone; anything it cannot resolve (a
digest prefix, a tag written before ref objects existed) is left to ``Store``.
"""

from __future__ import annotations

from typing import IO

from artifacts.backends import BlobBackend, open_backend
from artifacts.config import resolve_store_url
from artifacts.digest import Digest
from artifacts.refs import parse_reference
from artifacts.tagrefs import has_refs, read_tag_ref


class DeployStore:
    """A store opened for reading blobs and ref objects only (nothing is created)."""

    def __init__(self, backend: BlobBackend) -> None:
        self.backend = backend

    @classmethod
    def open(cls, store_url: str | None = None) -> DeployStore:
        return cls(open_backend(resolve_store_url(store_url), create=False))

    def resolve_tag(self, text: str) -> Digest | None:
        """The manifest digest a ``name:tag`` reference's ref object names; None for any
        other reference, or a tag without a ref object."""
        ref = parse_reference(text)
        if ref.tag is None or ref.name is None or not has_refs(self.backend):
            return None
        tag_ref = read_tag_ref(self.backend, ref.name, ref.tag)  # type: ignore[arg-type]
        return None if tag_ref is None else Digest.parse(tag_ref.digest)

    def open_blob(self, digest: Digest) -> IO[bytes]:
        """A reader that verifies the content against `digest` at EOF."""
        return self.backend.open(digest)

    def close(self) -> None:
        """Nothing to release: the backend holds no connection to close."""
