"""The no-op record of `kiln compile` (pipeline/noop.py): what its key covers, and when a
record no longer describes the store. The end-to-end runs are in test_pipeline_e2e.py."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from artifacts.backends import open_backend
from artifacts.digest import Digest
from artifacts.tagrefs import TagRef, write_tag_ref
from pipeline import noop
from pipeline.noop import ModelKeys, NoopItem, NoopRecord, NoopRelease

BASE = {
    "spec_digest": "sha256:" + "1" * 64,
    "store_url": "/stores/a",
    "index_url": "sqlite:////stores/a/index.db",
    "backend": "auto",
    "flags": None,
    "tag": None,
    "version": "1.0",
    "models": [ModelKeys("m", "sha256:" + "2" * 64, ("sha256:" + "3" * 64,))],
}


@pytest.mark.parametrize(
    "change",
    [
        {"spec_digest": "sha256:" + "9" * 64},
        {"store_url": "/stores/b"},
        {"index_url": "postgresql://db/kiln"},
        {"backend": "xla-cpu"},
        {"flags": ()},
        {"tag": "prod"},
        {"version": "1.1"},
        {"models": [ModelKeys("m", "sha256:" + "8" * 64, ("sha256:" + "3" * 64,))]},
        {"models": [ModelKeys("m", "sha256:" + "2" * 64, ("sha256:" + "7" * 64,))]},
        {"models": [ModelKeys("n", "sha256:" + "2" * 64, ("sha256:" + "3" * 64,))]},
    ],
)
def test_the_key_covers_everything_the_outcome_depends_on(change: dict) -> None:  # type: ignore[type-arg]
    assert noop.noop_key(**BASE) == noop.noop_key(**BASE)
    assert noop.noop_key(**{**BASE, **change}) != noop.noop_key(**BASE)


def _record(key: str, manifest: Digest, blob: Digest) -> NoopRecord:
    item = NoopItem("m", "encode", 1, 32, "cpu", "sha256:" + "3" * 64, "sha256:" + "4" * 64)
    release = NoopRelease("m:latest", str(manifest), "m", "cpu", (str(blob),))
    return NoopRecord(key, "run1", (item,), (release,))


def test_records_round_trip_and_a_torn_one_is_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(noop.NOOP_DIR_ENV, str(tmp_path / "noop"))
    key = noop.noop_key(**BASE)
    record = _record(key, Digest.of_bytes(b"m"), Digest.of_bytes(b"b"))
    noop.save_record(record)
    assert noop.load_record(key) == record
    assert noop.load_record(noop.noop_key(**{**BASE, "tag": "x"})) is None
    path = next((tmp_path / "noop").iterdir())
    path.write_bytes(path.read_bytes()[:-5])
    assert noop.load_record(key) is None
    noop.forget(key)
    assert not path.exists()


def test_a_record_holds_only_while_its_tags_and_blobs_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a real local store: the recorded release must be where its tag's ref object points
    and all its blobs must exist; a moved tag or a collected blob ends the shortcut."""
    monkeypatch.setenv(noop.NOOP_DIR_ENV, str(tmp_path / "noop"))
    backend = open_backend(str(tmp_path / "store"))
    manifest = backend.put(io.BytesIO(b"manifest")).digest
    blob = backend.put(io.BytesIO(b"executable")).digest
    other = backend.put(io.BytesIO(b"another manifest")).digest
    key = noop.noop_key(**BASE)
    noop.save_record(_record(key, manifest, blob))

    def point_tag_at(digest: Digest) -> None:
        write_tag_ref(backend, TagRef("m", "latest", str(digest), None, 1.0))

    assert noop.find_noop(key, backend) is None  # no ref object yet
    point_tag_at(manifest)
    assert noop.find_noop(key, backend) == noop.load_record(key)
    point_tag_at(other)
    assert noop.find_noop(key, backend) is None  # the tag moved
    point_tag_at(manifest)
    backend.delete(blob)
    assert noop.find_noop(key, backend) is None  # a blob of the release is gone
