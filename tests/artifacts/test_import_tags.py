"""Which tags an import may move: only its own release's name, and an existing tag only with
--move-tags. Also: import and copy into a store on a full disk."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select

from artifacts.digest import Digest, canonical_json
from artifacts.errors import ArchiveError
from artifacts.index.models import BlobRow
from artifacts.store import Store
from artifacts.transfer import REF_NAME_ANNOTATION, export_release, import_archive
from tests.artifacts.test_export_targets import files_left, kiln, on_tiny_tmpfs, one_line_error
from tests.artifacts.test_transfer import make_release, registered, swap_manifest

KILN = [sys.executable, "-m", "kiln"]


def blob_rows(store: Store) -> int:
    with store.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(BlobRow)).scalar_one()


def renamed_archive(tmp_path: Path, name: str, tag: str) -> tuple[Digest, Path]:
    """An archive of a release named `name` whose index annotates it as `tag`: the manifest
    is rewritten under its new digest, so the archive is otherwise sound."""
    with Store.open(str(tmp_path / "evil-source")) as store:
        digest = make_release(store, name="evil", tag="latest")
        value = json.loads(store.read_bytes(digest))
        export_release(store, "evil:latest", tmp_path / "evil.tar")
    value["name"] = name
    manifest = canonical_json(value)
    renamed = swap_manifest(
        tmp_path / "evil.tar", tmp_path / "renamed.tar", digest, manifest,
        {REF_NAME_ANNOTATION: tag},
    )
    return Digest.of_bytes(manifest), renamed


def test_an_archive_cannot_move_another_models_tag(tmp_path: Path) -> None:
    with Store.open(str(tmp_path / "target")) as target:
        minilm = make_release(target, tag="latest")
        before = blob_rows(target)
        _, archive = renamed_archive(tmp_path, "evil", "minilm:latest")

        for move_tags in (False, True):
            with pytest.raises(ArchiveError, match="only tag its own release's name") as caught:
                import_archive(target, archive, move_tags=move_tags)
            assert "'minilm:latest'" in str(caught.value) and "'evil'" in str(caught.value)

        assert target.resolve("minilm:latest").digest == minilm
        assert registered(target) == (1, 1)
        assert blob_rows(target) == before  # refused before anything was written


def test_moving_an_existing_tag_needs_the_flag(tmp_path: Path) -> None:
    with Store.open(str(tmp_path / "source")) as source:
        new = make_release(source)
        export_release(source, "minilm:prod", tmp_path / "minilm.tar")
    archive = tmp_path / "minilm.tar"
    with Store.open(str(tmp_path / "target")) as target:
        old = make_release(target)
        before = blob_rows(target)

    result = kiln(
        "import", str(archive), "--store", str(tmp_path / "target"), cwd=tmp_path, text=True
    )
    one_line_error(result, "minilm:prod", old.hex[:12], new.hex[:12], "--move-tags")
    with Store.open(str(tmp_path / "target")) as target:
        assert target.resolve("minilm:prod").digest == old
        assert registered(target) == (1, 1) and blob_rows(target) == before

    result = kiln(
        "import", str(archive), "--move-tags", "--store", str(tmp_path / "target"),
        cwd=tmp_path, text=True,
    )
    assert result.returncode == 0, result.stderr
    with Store.open(str(tmp_path / "target")) as target:
        assert target.resolve("minilm:prod").digest == new
        assert [m.previous for m in target.history("minilm:prod")] == [str(old), None]


def test_a_new_tag_or_the_same_target_needs_no_flag(tmp_path: Path) -> None:
    with Store.open(str(tmp_path / "source")) as source:
        digest = make_release(source)
        export_release(source, "minilm:prod", tmp_path / "minilm.tar")
    with Store.open(str(tmp_path / "target")) as target:
        assert import_archive(target, tmp_path / "minilm.tar").releases == (
            ("minilm:prod", digest),
        )
        import_archive(target, tmp_path / "minilm.tar")  # already there: nothing moves
        assert len(target.history("minilm:prod")) == 1


def test_a_tag_of_another_name_is_not_exported(tmp_path: Path) -> None:
    with Store.open(str(tmp_path / "source")) as source:
        digest = make_release(source)
        source.tag("minilm:prod", "other:prod")
        export_release(source, "other:prod", tmp_path / "other.tar")
    with Store.open(str(tmp_path / "target")) as target:
        assert import_archive(target, tmp_path / "other.tar").releases == ((None, digest),)
        assert registered(target) == (1, 0)


# -- a full disk -------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["import", "copy"])
def test_a_full_store_disk_is_one_line_and_registers_nothing(
    tmp_path: Path, command: str
) -> None:
    with Store.open(str(tmp_path / "source")) as source:
        make_release(source)  # 3 MiB of weights: more than the 1 MiB disk
        export_release(source, "minilm:prod", tmp_path / "minilm.tar")
    full = tmp_path / "full"
    store = full / "store"
    kiln_cmd = " ".join(KILN)
    if command == "import":
        run = f"{kiln_cmd} import {tmp_path / 'minilm.tar'} --store {store}"
    else:
        run = f"{kiln_cmd} copy minilm:prod --from {tmp_path / 'source'} --to {store}"
    check = f"{kiln_cmd} ls --store {store} --json"
    result = on_tiny_tmpfs(full, f"{run}; rc=$?; {check}; (exit $rc)")

    one_line_error(result, str(store), "no space left on device")
    assert json.loads(result.stdout.split("FILES:")[0]) == []  # no release, no tag
    assert not [f for f in files_left(result) if f.startswith("./store/tmp/")]  # no partial blob
