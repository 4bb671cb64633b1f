"""The weights-set record: the one blob a weights key points at when a release's weights are
several safetensors blobs (the index's `weights` rows hold one digest each).

It is derived from the release: the same (digest, size, name) list as the release's
`source.weights`, in canonical JSON, so its digest follows from the release alone. That is
how the index ties the record to the releases using it (`weights_set_digest`): `kiln gc`
keeps it while one of them lives, and `kiln reindex` finds it again from their manifests."""

from __future__ import annotations

from collections.abc import Sequence

from artifacts.digest import Digest, canonical_json
from artifacts.manifest import Release

WEIGHTS_SET_MEDIA_TYPE = "application/vnd.kiln.weights-set.v1+json"
WEIGHTS_SET_PREFIX = b'{"mediaType"'

# (digest, size, file name) of each safetensors blob of one set of weights.
WeightBlobs = tuple[tuple[str, int, str], ...]


def weights_set_document(blobs: Sequence[tuple[str, int, str]]) -> bytes:
    record = {
        "mediaType": WEIGHTS_SET_MEDIA_TYPE,
        "weights": [{"digest": d, "size": s, "name": n} for d, s, n in blobs],
    }
    return canonical_json(record)


def weights_set_digest(release: Release) -> Digest | None:
    """The digest of the weights-set record of `release`'s weights; None when they are one
    blob (the weights key points at it directly) or a blob has no name."""
    weights = release.source.weights
    if len(weights) < 2 or any(w.name is None for w in weights):
        return None
    document = weights_set_document([(str(w.digest), w.size, str(w.name)) for w in weights])
    return Digest.of_bytes(document)
