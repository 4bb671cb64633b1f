"""`kiln copy`: promoting releases between a local store and S3 (a real SeaweedFS), both ways."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from artifacts.copy import copy_release, open_stores
from artifacts.errors import BlobCorrupted, ReferenceNotFound, StoreConfigError
from artifacts.store import Store
from artifacts.verify import verify_store
from tests.conftest import build_release
from tests.servers.s3_server import BUCKET, S3Fixture

KILN = [sys.executable, "-m", "kiln"]


def kiln(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("KILN_STORE", "KILN_INDEX_URL")}
    return subprocess.run(KILN + list(args), capture_output=True, text=True, env=env, timeout=120)


def test_local_to_s3_copies_only_missing_blobs_then_tags(
    store: Store, s3_server: S3Fixture, tmp_path: Path
) -> None:
    first = store.put_release(build_release(store, seqs=(32, 64), weights=b"w" * 100_000))
    store.tag(str(first), "m:prod")
    second = store.put_release(build_release(store, seqs=(32, 128), weights=b"w" * 100_000))
    url = s3_server.new_url()
    s3_index = f"sqlite:///{tmp_path / 's3-index.db'}"
    with Store.open(url, s3_index) as remote:
        report = copy_release(store, remote, "m:prod")
        blobs = len({ref.digest for _, ref in store.load_release(first).blob_refs()})
        assert (report.copied, report.present, report.tag) == (blobs + 1, 0, "m:prod")
        assert report.bytes_copied >= 100_000
        assert remote.resolve("m:prod").digest == first
        assert remote.load_release(first) == store.load_release(first)
        assert verify_store(remote).ok

        again = copy_release(store, remote, "m:prod")
        assert (again.copied, again.present, again.bytes_copied) == (0, blobs + 1, 0)

        # A digest ref with --tag: only the second release's new blobs travel.
        promoted = copy_release(store, remote, str(second), tag="m:canary")
        # Shared: weights and the seq-32 hlo, executable and log; new: seq 128's and the manifest.
        assert (promoted.tag, promoted.present, promoted.copied) == ("m:canary", 4, 4)
        assert remote.resolve("m:canary").digest == second
        assert [m.digest for m in remote.history("m:prod")] == [str(first)]


def test_s3_to_local_through_the_cli(s3_server: S3Fixture, tmp_path: Path) -> None:
    url = s3_server.new_url()
    s3_index = f"sqlite:///{tmp_path / 's3-index.db'}"
    with Store.open(url, s3_index) as remote:
        digest = remote.put_release(build_release(remote, name="enc"))
        remote.tag(str(digest), "enc:prod")
    local = tmp_path / "local-store"
    args = ["copy", "enc:prod", "--from", url, "--from-index", s3_index, "--to", str(local)]
    result = kiln(*args, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["digest"] == str(digest) and report["tag"] == "enc:prod"
    assert report["copied"] == 8 and report["present"] == 0
    assert report["source"] == url and report["destination"] == str(local)
    with Store.open(str(local)) as store:
        assert store.resolve("enc:prod").digest == digest
        assert verify_store(store).ok

    text = kiln(*args)
    assert text.returncode == 0, text.stderr
    assert "0 blobs copied" in text.stdout and "8 already present" in text.stdout
    verify = kiln("verify", "--store", str(local))
    assert verify.returncode == 0 and verify.stdout.strip().endswith(": ok")


def test_corrupt_source_blob_stops_before_manifest_and_tag(
    store: Store, s3_server: S3Fixture, tmp_path: Path
) -> None:
    release = build_release(store)
    digest = store.put_release(release)
    store.tag(str(digest), "m:prod")
    victim = release.graphs[0].executable.digest
    path = store.backend.path_of(victim)  # type: ignore[attr-defined]
    path.chmod(0o644)
    path.write_bytes(b"X" * path.stat().st_size)
    url = s3_server.new_url()
    with Store.open(url, f"sqlite:///{tmp_path / 'i.db'}") as remote:
        with pytest.raises(BlobCorrupted, match=victim.hex):
            copy_release(store, remote, "m:prod", workers=1)
        assert not remote.has_blob(victim) and not remote.has_blob(digest)
        with pytest.raises(ReferenceNotFound):
            remote.resolve("m:prod")
    client = s3_server.client()
    prefix = url.removeprefix(f"s3://{BUCKET}/")
    listing = client.list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/tmp/")
    assert listing.get("KeyCount", 0) == 0


def test_refuses_same_store_or_shared_index(
    store_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Store.open(str(store_dir)).close()
    with pytest.raises(StoreConfigError, match="same store"):
        open_stores(str(store_dir), str(store_dir))
    monkeypatch.setenv("KILN_INDEX_URL", f"sqlite:///{tmp_path / 'shared.db'}")
    with pytest.raises(StoreConfigError, match="--to-index"):
        open_stores(str(store_dir), str(tmp_path / "other"))
    result = kiln("copy", "m:prod", "--from", str(store_dir), "--to", str(store_dir))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        f"kiln: error: kiln copy: --from and --to are the same store ({store_dir})"
    )
