"""Export a release to one tar file and import it into another store; hostile archives."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import func, select

from artifacts.digest import Digest
from artifacts.errors import ArchiveError, BlobCorrupted, ReferenceNotFound, SizeMismatch
from artifacts.index.models import ManifestRow, TagRow
from artifacts.manifest import (
    RELEASE_MEDIA_TYPE,
    BlobRef,
    CompilerInfo,
    Graph,
    Provenance,
    Release,
    Source,
)
from artifacts.store import Store
from artifacts.transfer import (
    REF_NAME_ANNOTATION,
    RELEASE_NAME_ANNOTATION,
    export_release,
    import_archive,
)

BIG = 3 * 1024 * 1024 + 17  # more than one tar copy buffer


def _ref(store: Store, data: bytes, name: str | None = None) -> BlobRef:
    result = store.put_bytes(data)
    return BlobRef(result.digest, result.size, name)


def make_release(store: Store, name: str = "minilm", tag: str = "prod") -> Digest:
    """A small two-graph release with weights, a side file and a log; tagged name:tag."""
    weights = _ref(store, os.urandom(BIG), "model.safetensors")
    tokenizer = _ref(store, b'{"vocab": ["a", "b"]}', "tokenizer.json")
    graphs = []
    for seq in (16, 32):
        graphs.append(
            Graph(
                kind="encode",
                bucket={"batch": 1, "seq": seq},
                signature={"inputs": [{"name": "ids", "dtype": "int32", "shape": [1, seq]}]},
                hlo=_ref(store, f"hlo module seq={seq}".encode()),
                executable=_ref(store, os.urandom(4096 + seq)),
                format="xla-cpu",
                compiler=CompilerInfo("jaxlib", "0.10.2", ("--xla_cpu_opt=2",)),
                hlo_key="a" * 64,
                compile_seconds=1.5,
                log=_ref(store, f"compiled seq={seq}\n".encode()),
            )
        )
    release = Release(
        name=name,
        target="cpu",
        source=Source(
            task="embedding",
            architecture_digest="sha256:" + "b" * 64,
            config={"hidden": 384},
            weights=(weights,),
            files=(tokenizer,),
        ),
        graphs=tuple(graphs),
        provenance=Provenance(kiln_version="0.1.0", created="2025-01-01T00:00:00Z"),
    )
    digest = store.put_release(release)
    store.tag(str(digest), f"{name}:{tag}")
    return digest


@pytest.fixture
def source(tmp_path: Path) -> Store:
    with Store.open(str(tmp_path / "source")) as store:
        yield store


@pytest.fixture
def target(tmp_path: Path) -> Store:
    with Store.open(str(tmp_path / "target")) as store:
        yield store


@pytest.fixture
def exported(source: Store, tmp_path: Path) -> tuple[Digest, Path]:
    digest = make_release(source)
    out = tmp_path / "minilm.tar"
    export_release(source, "minilm:prod", out)
    return digest, out


def registered(store: Store) -> tuple[int, int]:
    """(release manifests, tags) in the store's index."""
    with store.engine.connect() as conn:
        manifests = conn.execute(select(func.count()).select_from(ManifestRow)).scalar_one()
        tags = conn.execute(select(func.count()).select_from(TagRow)).scalar_one()
    return manifests, tags


def all_digests(store: Store, digest: Digest) -> list[Digest]:
    release = store.load_release(digest)
    return [digest, *dict.fromkeys(ref.digest for _, ref in release.blob_refs())]


# -- round trip --------------------------------------------------------------------------------


def test_round_trip_into_empty_store(source: Store, target: Store, tmp_path: Path) -> None:
    digest = make_release(source)
    out = tmp_path / "out" / "minilm.tar"
    out.parent.mkdir()

    report = export_release(source, "minilm:prod", out)

    blobs = all_digests(source, digest)
    assert report.digest == digest
    assert report.ref == "minilm:prod"
    assert report.blob_count == len(blobs) == 9
    assert report.path == out and report.bytes == out.stat().st_size
    assert [p.name for p in out.parent.iterdir()] == ["minilm.tar"]  # no temp file left

    with tarfile.open(out) as tar:
        names = tar.getnames()
        assert names[:2] == ["oci-layout", "index.json"]
        assert json.loads(tar.extractfile("oci-layout").read()) == {"imageLayoutVersion": "1.0.0"}
        index = json.loads(tar.extractfile("index.json").read())
    assert sorted(n for n in names if n.startswith("blobs/sha256/")) == sorted(
        f"blobs/sha256/{d.hex}" for d in blobs
    )
    assert index["schemaVersion"] == 2
    assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    (entry,) = index["manifests"]
    assert entry["mediaType"] == RELEASE_MEDIA_TYPE
    assert entry["digest"] == str(digest)
    assert entry["size"] == len(source.read_bytes(digest))
    assert entry["annotations"] == {
        REF_NAME_ANNOTATION: "minilm:prod",
        RELEASE_NAME_ANNOTATION: "minilm",
    }

    imported = import_archive(target, out)

    assert imported.releases == (("minilm:prod", digest),)
    assert imported.blobs_added == len(blobs) and imported.blobs_present == 0
    assert imported.bytes == sum(len(source.read_bytes(d)) for d in blobs)
    assert target.resolve("minilm:prod").digest == digest
    (move,) = target.history("minilm:prod")
    assert move.reason == "import minilm.tar"
    for blob in blobs:
        assert target.read_bytes(blob) == source.read_bytes(blob)  # read_bytes verifies
    assert target.load_release(digest) == source.load_release(digest)


def test_export_is_deterministic(source: Store, tmp_path: Path) -> None:
    make_release(source)
    export_release(source, "minilm:prod", tmp_path / "a.tar")
    export_release(source, "minilm:prod", tmp_path / "b.tar")
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()


def test_import_twice_adds_nothing(exported: tuple[Digest, Path], target: Store) -> None:
    digest, archive = exported
    first = import_archive(target, archive)
    blobs = sorted(info.digest for info in target.backend.iter_blobs())

    second = import_archive(target, archive)

    assert second.releases == (("minilm:prod", digest),)
    assert second.blobs_added == 0 and second.bytes == 0
    assert second.blobs_present == first.blobs_added
    assert sorted(info.digest for info in target.backend.iter_blobs()) == blobs
    assert len(target.history("minilm:prod")) == 1
    assert registered(target) == (1, 1)


def test_import_moves_an_existing_tag_when_asked(
    exported: tuple[Digest, Path], target: Store
) -> None:
    digest, archive = exported
    older = make_release(target)
    assert older != digest

    import_archive(target, archive, move_tags=True)

    assert target.resolve("minilm:prod").digest == digest
    assert [m.previous for m in target.history("minilm:prod")] == [str(older), None]


def test_import_without_tag(exported: tuple[Digest, Path], target: Store) -> None:
    digest, archive = exported
    report = import_archive(target, archive, tag=False)
    assert report.releases == ((None, digest),)
    assert registered(target) == (1, 0)
    assert target.resolve(f"minilm@{digest}").digest == digest


@pytest.mark.parametrize("ref", ["minilm@{digest}", "{digest}"])
def test_export_by_digest_carries_no_tag(
    source: Store, target: Store, tmp_path: Path, ref: str
) -> None:
    digest = make_release(source)
    out = tmp_path / "x.tar"
    export_release(source, ref.format(digest=digest), out)
    assert import_archive(target, out).releases == ((None, digest),)
    assert registered(target) == (1, 0)


def test_export_without_tag(source: Store, target: Store, tmp_path: Path) -> None:
    digest = make_release(source)
    out = tmp_path / "x.tar"
    export_release(source, "minilm:prod", out, include_tag=False)
    with tarfile.open(out) as tar:
        index = json.loads(tar.extractfile("index.json").read())
    assert index["manifests"][0]["annotations"] == {RELEASE_NAME_ANNOTATION: "minilm"}
    assert import_archive(target, out).releases == ((None, digest),)


# -- export failures ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("damage", "error"),
    [
        (lambda data: bytes([data[0] ^ 1]) + data[1:], BlobCorrupted),
        (lambda data: data[:-1], SizeMismatch),
    ],
    ids=["flipped-byte", "truncated"],
)
def test_export_of_corrupt_blob_fails_and_writes_nothing(
    source: Store, tmp_path: Path, damage: Callable[[bytes], bytes], error: type[Exception]
) -> None:
    digest = make_release(source)
    victim = source.load_release(digest).graphs[1].executable.digest
    path = Path(source.backend.location(victim))
    data = path.read_bytes()
    path.chmod(0o644)
    path.write_bytes(damage(data))
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    with pytest.raises(error, match=victim.hex):
        export_release(source, "minilm:prod", out_dir / "minilm.tar")

    assert list(out_dir.iterdir()) == []


def test_export_does_not_replace_existing_file_on_failure(source: Store, tmp_path: Path) -> None:
    digest = make_release(source)
    victim = source.load_release(digest).source.weights[0].digest
    path = Path(source.backend.location(victim))
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    out = tmp_path / "minilm.tar"
    out.write_bytes(b"previous export")

    with pytest.raises(BlobCorrupted, match=victim.hex):
        export_release(source, "minilm:prod", out)

    assert out.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["minilm.tar"]


# -- hostile and damaged archives --------------------------------------------------------------


def rewrite(
    src: Path,
    dst: Path,
    change: Callable[[tarfile.TarInfo, bytes], tuple[tarfile.TarInfo, bytes] | None] | None = None,
    extra: list[tuple[tarfile.TarInfo, bytes]] | None = None,
) -> Path:
    """Copy an archive member by member, letting `change` replace or drop members."""
    with tarfile.open(src) as old, tarfile.open(dst, "w") as new:
        for member in old.getmembers():
            data = old.extractfile(member).read() if member.isreg() else b""
            result = change(member, data) if change else (member, data)
            if result is not None:
                info, payload = result
                new.addfile(info, io.BytesIO(payload) if info.isreg() else None)
        for info, payload in extra or []:
            new.addfile(info, io.BytesIO(payload) if info.isreg() else None)
    return dst


def swap_manifest(
    src: Path, dst: Path, old: Digest, manifest: bytes, annotations: dict[str, str]
) -> Path:
    """Copy an archive with release manifest `old` replaced by `manifest`, stored under its own
    digest and named so in index.json (with these annotations): an archive sound but for
    what the new manifest says."""
    new = Digest.of_bytes(manifest)

    def swap(info: tarfile.TarInfo, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
        if info.name == f"blobs/sha256/{old.hex}":
            info.name, data = f"blobs/sha256/{new.hex}", manifest
        elif info.name == "index.json":
            index = json.loads(data)
            entry = index["manifests"][0]
            entry.update(digest=str(new), size=len(manifest), annotations=annotations)
            data = json.dumps(index).encode()
        info.size = len(data)
        return info, data

    return rewrite(src, dst, swap)


def member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.linkname = link
    return info, data


def assert_refused(target: Store, archive: Path, *needles: str) -> ArchiveError:
    with pytest.raises(ArchiveError) as caught:
        import_archive(target, archive)
    message = str(caught.value)
    for needle in (str(archive), *needles):
        assert needle in message, message
    assert registered(target) == (0, 0)
    with pytest.raises(ReferenceNotFound):
        target.resolve("minilm:prod")
    return caught.value


def blob_name(digest: Digest) -> str:
    return f"blobs/sha256/{digest.hex}"


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        (member("/etc/cron.d/evil", b"* * * * * root sh"), "/etc/cron.d/evil"),
        (member("../x", b"escape"), "../x"),
        (member("blobs/../../x", b"escape"), "blobs/../../x"),
        (member("blobs/sha256/" + "c" * 64, kind=tarfile.SYMTYPE, link="/etc/passwd"), "c" * 64),
        (member("blobs/sha256/" + "d" * 64, kind=tarfile.LNKTYPE, link="index.json"), "d" * 64),
        (member("blobs/sha256/" + "e" * 64, kind=tarfile.FIFOTYPE), "e" * 64),
        (member("blobs/sha256/" + "f" * 64, kind=tarfile.CHRTYPE), "f" * 64),
        (member("README.txt", b"hello"), "README.txt"),
        (member("blobs/sha256/" + "A" * 64, b"upper"), "A" * 64),
        (member("blobs/sha512/" + "a" * 64, b"other"), "sha512"),
        (member("./oci-layout", b"{}"), "./oci-layout"),
        (member("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'), "more than once"),
    ],
    ids=[
        "absolute",
        "dotdot",
        "nested-dotdot",
        "symlink",
        "hardlink",
        "fifo",
        "device",
        "unexpected-name",
        "uppercase-hex",
        "other-algorithm",
        "dot-slash",
        "duplicate",
    ],
)
def test_hostile_member_is_refused(
    exported: tuple[Digest, Path], target: Store, tmp_path: Path, bad: tuple, needle: str
) -> None:
    _, archive = exported
    hostile = rewrite(archive, tmp_path / "hostile.tar", extra=[bad])
    assert_refused(target, hostile, needle)
    assert list(target.backend.iter_blobs()) == []  # refused before anything was written


def test_blob_that_does_not_match_its_name_is_refused(
    exported: tuple[Digest, Path], source: Store, target: Store, tmp_path: Path
) -> None:
    digest, archive = exported
    victim = source.load_release(digest).graphs[0].executable

    def swap(info: tarfile.TarInfo, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
        if info.name == blob_name(victim.digest):
            data = bytes(len(data))  # same size, wrong content
        return info, data

    hostile = rewrite(archive, tmp_path / "swapped.tar", swap)
    assert_refused(target, hostile, blob_name(victim.digest), "does not hash to its name")
    assert not target.has_blob(victim.digest)


def test_manifest_that_does_not_match_its_name_is_refused(
    exported: tuple[Digest, Path], target: Store, tmp_path: Path
) -> None:
    digest, archive = exported

    def tamper(info: tarfile.TarInfo, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
        if info.name == blob_name(digest):
            data = data.replace(b'"cpu"', b'"gpu"')
        return info, data

    hostile = rewrite(archive, tmp_path / "tampered.tar", tamper)
    assert_refused(target, hostile, blob_name(digest), "does not hash to its name")
    assert list(target.backend.iter_blobs()) == []


def test_missing_blob_is_refused(
    exported: tuple[Digest, Path], source: Store, target: Store, tmp_path: Path
) -> None:
    digest, archive = exported
    victim = source.load_release(digest).graphs[0].hlo.digest

    def drop(info: tarfile.TarInfo, data: bytes) -> tuple[tarfile.TarInfo, bytes] | None:
        return None if info.name == blob_name(victim) else (info, data)

    hostile = rewrite(archive, tmp_path / "partial.tar", drop)
    assert_refused(target, hostile, blob_name(victim), "is missing")


def test_unreferenced_blob_is_refused(
    exported: tuple[Digest, Path], target: Store, tmp_path: Path
) -> None:
    _, archive = exported
    stray = b"not part of any release"
    hostile = rewrite(
        archive,
        tmp_path / "stray.tar",
        extra=[member(blob_name(Digest.of_bytes(stray)), stray)],
    )
    assert_refused(target, hostile, blob_name(Digest.of_bytes(stray)), "not referenced")


def archive_end(archive: Path) -> int:
    """Offset of the end-of-archive marker (just after the last member's data)."""
    with tarfile.open(archive) as tar:
        tar.getmembers()
        return tar.offset


@pytest.mark.parametrize(
    "cut",
    [
        lambda archive: archive.stat().st_size // 2,
        lambda archive: archive_end(archive),
        lambda archive: archive_end(archive) - 100,
        lambda archive: 700,
        lambda archive: 0,
    ],
    ids=["middle", "at-member-boundary", "inside-last-blob", "inside-first-member", "empty"],
)
def test_truncated_archive_is_refused(
    exported: tuple[Digest, Path], target: Store, tmp_path: Path, cut: Callable[[Path], int]
) -> None:
    _, archive = exported
    truncated = tmp_path / "truncated.tar"
    length = cut(archive)
    truncated.write_bytes(archive.read_bytes()[:length])
    assert_refused(target, truncated, "truncated" if length else "empty file")


def test_non_tar_file_is_refused(target: Store, tmp_path: Path) -> None:
    bogus = tmp_path / "notes.tar"
    bogus.write_bytes(b"these are not the bytes you are looking for\n" * 100)
    assert_refused(target, bogus, "not a readable tar archive")


def test_missing_archive_is_refused(target: Store, tmp_path: Path) -> None:
    assert_refused(target, tmp_path / "nowhere.tar", "does not exist")


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda index: index["manifests"][0].update(mediaType="application/json"), "mediaType"),
        (lambda index: index["manifests"][0].update(size=1), "index.json says 1"),
        (lambda index: index.update(manifests=[]), "lists no manifests"),
        (
            lambda index: index["manifests"][0]["annotations"].update(
                {REF_NAME_ANNOTATION: "Not A Tag"}
            ),
            "invalid tag",
        ),
    ],
    ids=["media-type", "size", "empty", "bad-ref"],
)
def test_bad_index_is_refused(
    exported: tuple[Digest, Path],
    target: Store,
    tmp_path: Path,
    edit: Callable[[dict], None],
    needle: str,
) -> None:
    _, archive = exported

    def change(info: tarfile.TarInfo, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
        if info.name == "index.json":
            index = json.loads(data)
            edit(index)
            data = json.dumps(index).encode()
            info.size = len(data)
        return info, data

    hostile = rewrite(archive, tmp_path / "bad-index.tar", change)
    assert_refused(target, hostile, needle)


def test_blob_missing_from_archive_but_present_in_target_is_fine(
    exported: tuple[Digest, Path], source: Store, target: Store, tmp_path: Path
) -> None:
    digest, archive = exported
    weights = source.load_release(digest).source.weights[0].digest
    target.put_bytes(source.read_bytes(weights))

    def drop(info: tarfile.TarInfo, data: bytes) -> tuple[tarfile.TarInfo, bytes] | None:
        return None if info.name == blob_name(weights) else (info, data)

    report = import_archive(target, rewrite(archive, tmp_path / "thin.tar", drop))
    assert report.releases == (("minilm:prod", digest),)
    assert target.resolve("minilm:prod").digest == digest
