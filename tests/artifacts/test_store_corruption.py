"""Damage built on disk: a flipped byte, a corrupted manifest, a deleted blob. Every reader and
`kiln verify` must name the digest at fault, and the CLI must say so in one line."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from artifacts.digest import Digest
from artifacts.errors import ArtifactError
from artifacts.store import Store
from tests.helpers.store_helpers import (
    MiB,
    blob_path,
    flip_byte,
    kiln,
    make_release,
    seeded_bytes,
)

WEIGHTS_SIZE = 9 * MiB + 17  # more than two read chunks, and not a multiple of one


def _store_with_release(root: Path) -> tuple[Digest, Digest, Digest]:
    """(release manifest, weights blob, executable blob) of one stored release."""
    weights = seeded_bytes(7, WEIGHTS_SIZE)
    exe = seeded_bytes(8, 300_000)
    with Store.open(str(root)) as store:
        manifest = make_release(store, "bert", [weights, exe])
        store.tag(str(manifest), "bert:prod")
    return manifest, Digest.of_bytes(weights), Digest.of_bytes(exe)


def _verify_json(root: Path) -> dict[str, object]:
    result = kiln(root, "verify", "--json")
    assert result.returncode == 1, result.stdout + result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_flipped_byte_is_named_by_verify_and_every_reader(tmp_path: Path, where: str) -> None:
    root = tmp_path / "store"
    _, weights, _ = _store_with_release(root)
    offset = {"first": 0, "middle": WEIGHTS_SIZE // 2, "last": WEIGHTS_SIZE - 1}[where]
    flip_byte(blob_path(root, weights), offset)

    text = kiln(root, "verify")
    assert text.returncode == 1
    assert f"BAD {weights}" in text.stdout
    assert "1 bad" in text.stdout
    assert _verify_json(root)["bad"] == [str(weights)]

    with Store.open(str(root)) as store:
        with pytest.raises(ArtifactError, match=str(weights)):
            store.read_bytes(weights)
        # A streaming consumer: the error comes at the end, still naming the digest.
        with pytest.raises(ArtifactError, match=str(weights)):
            with store.open_blob(weights) as reader, open(tmp_path / "out", "wb") as out:
                shutil.copyfileobj(reader, out)
        with pytest.raises(ArtifactError, match=str(weights)):
            with store.open_blob(weights) as reader:
                reader.read()


def test_truncated_blob_is_named_by_verify(tmp_path: Path) -> None:
    root = tmp_path / "store"
    _, weights, _ = _store_with_release(root)
    path = blob_path(root, weights)
    os.chmod(path, 0o644)
    os.truncate(path, WEIGHTS_SIZE - 1)
    report = _verify_json(root)
    assert report["bad"] == [str(weights)]
    problems = " ".join(p["problem"] for p in report["problems"])  # type: ignore[attr-defined]
    assert "corrupted" in problems and "index says" in problems


def test_show_of_corrupted_manifest_is_one_line_naming_it(tmp_path: Path) -> None:
    root = tmp_path / "store"
    manifest, _, _ = _store_with_release(root)
    flip_byte(blob_path(root, manifest), 10)

    for ref in (str(manifest), "bert:prod"):
        result = kiln(root, "show", ref)
        assert result.returncode == 1
        assert result.stdout == ""
        assert "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert str(manifest) in lines[0] and "corrupted" in lines[0]
    assert _verify_json(root)["bad"] == [str(manifest)]


def test_deleted_blob_of_a_release_is_named(tmp_path: Path) -> None:
    root = tmp_path / "store"
    manifest, _, exe = _store_with_release(root)
    blob_path(root, exe).unlink()

    text = kiln(root, "verify")
    assert text.returncode == 1 and f"BAD {exe}" in text.stdout
    report = _verify_json(root)
    assert report["bad"] == [str(exe)]
    problems = [p["problem"] for p in report["problems"]]  # type: ignore[attr-defined]
    assert any(f"referenced by release bert@{manifest.short}" in p for p in problems), problems

    with Store.open(str(root)) as store:
        with pytest.raises(ArtifactError, match=str(exe)):
            store.read_bytes(exe)


def test_re_putting_the_bytes_repairs_a_corrupted_blob(tmp_path: Path) -> None:
    root = tmp_path / "store"
    data = seeded_bytes(9, 100_000)
    with Store.open(str(root)) as store:
        digest = store.put_bytes(data).digest
        flip_byte(blob_path(root, digest), 50)
        store.put_bytes(data)
        assert store.read_bytes(digest) == data
    assert kiln(root, "verify").returncode == 0
