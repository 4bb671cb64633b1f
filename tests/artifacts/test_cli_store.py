"""The store commands through the real `kiln` entry point: output shapes and user errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers.cli_helpers import assert_one_line_error

KILN = [sys.executable, "-m", "kiln"]


def kiln(store_dir: Path, *args: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    full_env = {**os.environ, "KILN_STORE": str(store_dir), **(env or {})}
    full_env.pop("KILN_INDEX_URL", None)
    return subprocess.run(
        KILN + list(args), capture_output=True, text=True, env=full_env, timeout=120
    )


def test_listing_and_json_shapes(store, store_dir: Path, make_release) -> None:  # type: ignore[no-untyped-def]
    first = make_release(tag="m:prod", seqs=(32,))
    second = make_release(tag="m:canary", seqs=(32, 64), flags=("-O2",), compiler_version="t-2")
    store.tag(str(second), "m:prod", reason="promote")

    stats = json.loads(kiln(store_dir, "stats", "--json").stdout)
    assert stats["releases"] == 2 and stats["tags"] == 2
    assert stats["blobs"] >= 8 and stats["bytes"] > 0

    ls = kiln(store_dir, "ls")
    assert ls.returncode == 0 and "m:prod" in ls.stdout and first.hex[:12] in ls.stdout
    rows = json.loads(kiln(store_dir, "ls", "m", "--json").stdout)
    assert {r["digest"] for r in rows} == {str(first), str(second)}

    show = kiln(store_dir, "show", "m:prod")
    assert show.returncode == 0 and "seq64" in show.stdout and "-O2" in show.stdout
    by_prefix = json.loads(kiln(store_dir, "show", first.hex[:10], "--json").stdout)
    assert by_prefix["digest"] == str(first)

    history = json.loads(kiln(store_dir, "history", "m:prod", "--json").stdout)
    assert [h["digest"] for h in history] == [str(second), str(first)]
    assert history[0]["previous"] == str(first) and history[0]["reason"] == "promote"

    diff = json.loads(kiln(store_dir, "diff", "m:canary", f"m@{first}", "--json").stdout)
    assert diff["removed"] == ["encode batch1xseq64"]
    changes = " ".join(diff["changed"][0]["changes"])
    assert "compiler version t-2 -> test-1" in changes and "flags -O2 -> (none)" in changes

    rollback = kiln(store_dir, "tag", str(first), "m:prod", "-m", "rollback")
    assert rollback.returncode == 0
    assert json.loads(kiln(store_dir, "show", "m:prod", "--json").stdout)["digest"] == str(first)

    verify = json.loads(kiln(store_dir, "verify", "--json").stdout)
    assert verify["checked"] == stats["blobs"] + 1 and verify["bad"] == []


def test_user_errors_are_one_line(store, store_dir: Path, make_release, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    make_release(tag="bert:prod")
    assert_one_line_error(kiln(store_dir, "show", "bert:prd"), "bert:prd", "closest: bert:prod")
    assert_one_line_error(kiln(store_dir, "show", "sha256:" + "0" * 64), "0" * 64, "not found")
    assert_one_line_error(kiln(store_dir, "tag", "bert:prod", "Bad Name"), "invalid tag")
    assert_one_line_error(kiln(store_dir, "ls", "--store", "ftp://x/y"), "ftp://x/y")
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert_one_line_error(kiln(afile, "ls"), str(afile), "not a folder")
    assert_one_line_error(kiln(tmp_path / "nope", "verify"), "does not exist")
    assert_one_line_error(kiln(store_dir, "ls", "--index", "nosuchdb://x"), "nosuchdb://x")


def test_malformed_manifest_is_named(store, store_dir: Path) -> None:  # type: ignore[no-untyped-def]
    from artifacts.index import ops
    from artifacts.index.db import write_transaction
    from artifacts.index.models import ManifestRow

    bad = store.put_bytes(b'{"mediaType": "application/vnd.kiln.release.v1+json", "name": 3}')
    with write_transaction(store.engine) as conn:
        ops.insert_ignore(
            conn,
            ManifestRow.__table__,
            [
                {
                    "digest": str(bad.digest),
                    "name": "x",
                    "target": "cpu",
                    "task": "encoder",
                    "graph_count": 0,
                    "total_size": 1,
                    "created": "",
                    "indexed_at": 0.0,
                }
            ],
        )
    assert_one_line_error(
        kiln(store_dir, "show", str(bad.digest)), str(bad.digest), "schemaVersion: required"
    )


def test_unreadable_store_folder_as_any_user(tmp_path: Path) -> None:
    """A store path under a regular file cannot be opened: one line naming it."""
    parent = tmp_path / "file"
    parent.write_text("x")
    assert_one_line_error(kiln(parent / "store", "ls"), str(parent / "store"))
