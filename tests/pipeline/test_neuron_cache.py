"""`kiln import-neuron-cache` / `kiln export-neuron-cache` against a Neuron persistent cache
folder built here: HLO from Kiln's own tracer (a tiny BERT), NEFFs built from the documented
header layout, flags files as torch-neuronx writes them, plus an incomplete, a failed and a
locked entry. The only test double is the `neuronx-cc` stand-in (tests/helpers/neuron_helpers.py):
the real compiler cannot be installed here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from artifacts.digest import Digest  # noqa: E402
from artifacts.neff import NeffHeader  # noqa: E402
from artifacts.store import Store  # noqa: E402
from pipeline.neuron_cache import (  # noqa: E402
    S3CacheSource,
    import_neuron_cache,
    open_cache_source,
    scan_cache,
)
from pipeline.trace import hlo_digest_bytes  # noqa: E402
from tests.helpers.model_helpers import TINY_BERT  # noqa: E402
from tests.helpers.neuron_helpers import (  # noqa: E402
    NEURON_VERSION,
    OOM_LOG,
    Entry,
    install_neuronx_cc,
    neff_bytes,
    trace_spec_hlo,
    tree,
    write_entry,
)
from tests.helpers.pipeline_helpers import kiln, kiln_env, kiln_json, write_spec  # noqa: E402

VERSION_DIR = f"neuronxcc-{NEURON_VERSION}"
FLAGS_16 = ["--target=inf2", "--model-type=transformer", "--auto-cast=none"]
# no --target: the entry takes the default target (inf2); the spaced spelling is canonicalised
FLAGS_32 = ["--model-type", "transformer", "--auto-cast=none"]
MODULE_16 = "MODULE_10016429939327138289+39f12043"
MODULE_32 = "MODULE_ae1c31503cedd3e1a504+39f12043"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A spec for inf2, a Neuron cache holding its two graphs (and three unusable entries),
    and a bin folder with the neuronx-cc stand-in of the cache's compiler version."""
    base = tmp_path_factory.mktemp("neuron")
    spec = write_spec(
        base / "bert.yaml",
        {
            "name": "tinybert",
            "task": "encoder",
            "source": {"config": TINY_BERT, "seed": 3},
            "buckets": {"batch": [1], "seq": [16, 32]},
            "targets": ["inf2"],
            "compiler_flags": {"inf2": ["--model-type transformer", "--auto-cast=none"]},
        },
    )
    hlo = trace_spec_hlo(spec)
    cache = base / "cache"
    neff16 = neff_bytes(name="bert-s16")
    neff32 = neff_bytes(name="bert-s32", compressed=False)
    write_entry(cache, Entry(MODULE_16, hlo[(1, 16)], FLAGS_16, neff16, done=True))
    write_entry(
        cache,
        Entry(MODULE_32, hlo[(1, 32)], FLAGS_32, neff32, done=True, hlo_name="model.hlo.pb"),
    )
    write_entry(cache, Entry("MODULE_111+39f12043", hlo[(1, 16)], FLAGS_16))  # no done
    write_entry(cache, Entry("MODULE_222+39f12043", hlo[(1, 32)], FLAGS_16, log=OOM_LOG))
    write_entry(
        cache, Entry("MODULE_333+39f12043", hlo[(1, 16)], FLAGS_16, neff16, done=True, lock=True)
    )
    (cache / "not-a-version").mkdir()
    (cache / "neuron_config.json").write_text("{}")
    bin_dir = install_neuronx_cc(base / "bin")
    return {"base": base, "spec": spec, "cache": cache, "hlo": hlo, "bin": bin_dir}


def _import(cache: Path, store: Path, *extra: str) -> dict[str, Any]:
    return kiln_json("import-neuron-cache", cache, *extra, store=store)


def _by_status(report: dict[str, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for entry in report["entries"]:
        out.setdefault(entry["status"], []).append(entry["folder"].split("/", 1)[1])
    return out


def test_scan_classifies_every_entry(world: dict[str, Any]) -> None:
    source, versions = open_cache_source(str(world["cache"]))
    states = {e.folder.split("/")[1]: e.state for e in scan_cache(source, versions)}
    assert states == {
        MODULE_16: "complete",
        MODULE_32: "complete",
        "MODULE_111+39f12043": "incomplete",
        "MODULE_222+39f12043": "failed",
        "MODULE_333+39f12043": "locked",
    }
    # a neuronxcc-<version> folder on its own is a cache too
    one, versions = open_cache_source(str(world["cache"] / VERSION_DIR))
    assert versions == [VERSION_DIR] and len(scan_cache(one, versions)) == 5


def test_import_plan_compile_export_round_trip(world: dict[str, Any], tmp_path: Path) -> None:
    cache, store = world["cache"], tmp_path / "store"

    dry = _import(cache, store, "--dry-run")
    assert dry["dry_run"] and dry["counts"]["imported"] == 2 and dry["bytes"] > 0
    with Store.open(str(store)) as s:
        assert list(s.backend.iter_blobs()) == []  # a dry run stores nothing

    first = _import(cache, store)
    assert first["counts"] == {
        "imported": 2,
        "present": 0,
        "incomplete": 1,
        "failed": 1,
        "locked": 1,
        "invalid": 0,
    }
    statuses = _by_status(first)
    assert sorted(statuses["imported"]) == sorted([MODULE_16, MODULE_32])
    (failed,) = [e for e in first["entries"] if e["status"] == "failed"]
    assert "memory" in failed["detail"]  # the model.log was triaged
    imported = {e["folder"].split("/")[1]: e for e in first["entries"] if e["hlo_key"]}
    assert imported[MODULE_16]["target"] == imported[MODULE_32]["target"] == "inf2"
    assert imported[MODULE_32]["flags"] == ["--model-type=transformer", "--auto-cast=none"]
    assert first["bytes"] == dry["bytes"]

    with Store.open(str(store)) as s:
        blobs_after_first = sorted(str(b.digest) for b in s.backend.iter_blobs())
    again = _import(cache, store)
    assert again["counts"]["imported"] == 0 and again["counts"]["present"] == 2
    assert again["bytes"] == 0
    with Store.open(str(store)) as s:
        assert sorted(str(b.digest) for b in s.backend.iter_blobs()) == blobs_after_first

    # the human summary table
    text = kiln("import-neuron-cache", cache, store=store)
    assert text.returncode == 0, text.stderr
    assert "ALREADY PRESENT" in text.stdout and "locked" in text.stdout

    # `kiln verify` checks the NEFF headers too; `kiln show` prints one
    verify = kiln("verify", store=store)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    neff16 = (cache / VERSION_DIR / MODULE_16 / "model.neff").read_bytes()
    shown = kiln("show", str(Digest.of_bytes(neff16)), store=store)
    assert "NEFF 2.0" in shown.stdout and "name bert-s16" in shown.stdout, shown.stdout

    # the same HLO, compiler version and flags: `kiln plan` finds HLO hits
    env = kiln_env(world["bin"])
    plan = kiln_json("plan", world["spec"], store=store, env=env)
    assert [row["status"] for row in plan] == ["hlo-hit", "hlo-hit"]

    # ... and `kiln compile` publishes a NEFF release without compiling anything
    report = kiln_json("compile", world["spec"], store=store, env=env)
    assert report["hlo_hits"] == 2 and report["compiled"] == 0, report
    shown = kiln("show", "tinybert:latest", store=store)
    assert shown.stdout.count("NEFF 2.0") == 2, shown.stdout

    # export the release: the original folder names, flags files and NEFFs
    out = tmp_path / "exported"
    exported = kiln_json("export-neuron-cache", "tinybert:latest", out, store=store)
    assert sorted(e["folder"] for e in exported["entries"]) == sorted(
        f"{VERSION_DIR}/{m}" for m in (MODULE_16, MODULE_32)
    )
    files = tree(out)
    original = tree(cache)
    for module, hlo_name in ((MODULE_16, "model.hlo_module.pb"), (MODULE_32, "model.hlo.pb")):
        prefix = f"{VERSION_DIR}/{module}/"
        for name in ("compile_flags.json", "model.neff", "model.done"):
            assert files[prefix + name] == original[prefix + name], name
        # the HLO comes back as stored: the same graph without debug metadata
        assert files[prefix + hlo_name] == hlo_digest_bytes(original[prefix + hlo_name])
    assert len(files) == 8

    # export -> import into another store -> export again: same names, same bytes
    second = tmp_path / "store2"
    assert _import(out, second)["counts"]["imported"] == 2
    again_out = tmp_path / "exported2"
    for entry in exported["entries"]:
        kiln_json("export-neuron-cache", entry["hlo_key"], again_out, store=second)
    assert tree(again_out) == files
    # exporting onto an existing entry leaves it alone
    repeat = kiln_json("export-neuron-cache", "tinybert:latest", out, store=store)
    assert {e["status"] for e in repeat["entries"]} == {"present"}


def test_the_compiler_version_is_part_of_the_key(world: dict[str, Any], tmp_path: Path) -> None:
    """The same entries under another neuronxcc-<version> folder are other compilations."""
    other = tmp_path / "cache"
    shutil.copytree(world["cache"] / VERSION_DIR, other / "neuronxcc-2.16.372.0+4a9b2326")
    with Store.open(str(tmp_path / "store")) as store:
        first = import_neuron_cache(store, str(world["cache"]))
        second = import_neuron_cache(store, str(other))
    assert first.count("imported") == second.count("imported") == 2
    assert not {e.hlo_key for e in first.entries} & {e.hlo_key for e in second.entries} - {None}
    assert second.bytes == 0  # the HLO and NEFF blobs themselves are shared


def test_bad_entries_are_reported_not_imported(world: dict[str, Any], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    hlo = world["hlo"][(1, 16)]
    neff = neff_bytes()
    write_entry(cache, Entry("MODULE_trunc", hlo, FLAGS_16, neff[:-7], done=True))
    write_entry(cache, Entry("MODULE_flags", hlo, ["--target=tpu"], neff, done=True))
    write_entry(cache, Entry("MODULE_noneff", hlo, FLAGS_16, None, done=True))
    with Store.open(str(tmp_path / "store")) as store:
        report = import_neuron_cache(store, str(cache))
    details = {e.folder.split("/")[1]: (e.status, e.detail) for e in report.entries}
    assert details["MODULE_trunc"][0] == "invalid"
    assert "follow the header" in details["MODULE_trunc"][1]
    assert details["MODULE_flags"] == ("invalid", "unknown --target 'tpu' in compile_flags.json")
    assert details["MODULE_noneff"][0] == "invalid"
    assert report.count("imported") == 0


def test_trn2_entry_keeps_its_target(world: dict[str, Any], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    flags = ["--target=trn2", "--model-type=transformer", "--lnc=2", "--execute-repetition=1"]
    write_entry(cache, Entry("MODULE_t2", world["hlo"][(1, 16)], flags, neff_bytes(), done=True))
    with Store.open(str(tmp_path / "store")) as store:
        (entry,) = import_neuron_cache(store, str(cache)).entries
        assert entry.status == "imported" and entry.target == "trn2"
        assert entry.flags == ("--model-type=transformer", "--lnc=2", "--execute-repetition=1")
        neff = store.read_bytes(
            Digest.of_bytes((cache / VERSION_DIR / "MODULE_t2" / "model.neff").read_bytes())
        )
        assert NeffHeader.parse(neff).compressed


def test_import_from_s3(world: dict[str, Any], tmp_path: Path, s3_server: Any) -> None:
    """The same cache on a real S3 server (SeaweedFS), read through list + get."""
    url = s3_server.new_url("neuron-cache")
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    client = s3_server.client()
    for path, data in tree(world["cache"]).items():
        client.put_object(Bucket=bucket, Key=f"{prefix}/{path}", Body=data)
    source = S3CacheSource(bucket, prefix)
    flags = json.loads(source.read(f"{VERSION_DIR}/{MODULE_16}/compile_flags.json"))
    assert flags == FLAGS_16
    with Store.open(str(tmp_path / "store")) as store:
        first = import_neuron_cache(store, url)
        assert [first.count(s) for s in ("imported", "incomplete", "failed", "locked")] == [
            2,
            1,
            1,
            1,
        ]
        again = import_neuron_cache(store, f"{url}/{VERSION_DIR}")  # one version folder
        assert again.count("present") == 2 and again.bytes == 0
        local = import_neuron_cache(store, str(world["cache"]))
        assert local.count("present") == 2  # the same entries, keyed the same way


def test_export_of_a_cpu_release_is_refused(tmp_path: Path, make_release: Any) -> None:
    from pipeline.neuron_cache import NeuronCacheError, export_neuron_cache

    digest = make_release(tag="m:cpu")
    with Store.open(str(tmp_path / "store")) as store, pytest.raises(NeuronCacheError):
        export_neuron_cache(store, str(digest), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_without_provenance_uses_the_hlo_key(store: Store, tmp_path: Path) -> None:
    """A NEFF compiled by Kiln itself has no cache folder name: MODULE_<hlo key hex[:20]>."""
    from artifacts.digest import canonical_json
    from artifacts.index.db import write_transaction
    from artifacts.records import COMPILATION_MEDIA_TYPE
    from artifacts.reindex import index_compilation
    from pipeline.neuron_cache import export_neuron_cache

    neff = store.put_bytes(neff_bytes(), kind="executable")
    hlo = store.put_bytes(b"", kind="hlo")
    key = "sha256:" + "ab" * 32
    record = {
        "mediaType": COMPILATION_MEDIA_TYPE,
        "hlo_key": key,
        "status": "ok",
        "compiler": "neuronx-cc",
        "compiler_version": NEURON_VERSION,
        "flags": ["--model-type=transformer"],
        "target": "trn1",
        "hlo_digest": str(hlo.digest),
        "executable_digest": str(neff.digest),
        "executable_format": "neff",
        "seconds": 12.0,
        "created_at": 1.0,
        "provenance": {"host": "builder", "pid": 1},
    }
    put = store.put_bytes(canonical_json(record), kind="compilation")
    with write_transaction(store.engine) as conn:
        index_compilation(conn, str(put.digest), record)
    report = export_neuron_cache(store, str(put.digest)[:20], tmp_path / "out")
    folder = f"{VERSION_DIR}/MODULE_{'ab' * 10}"
    assert [e.folder for e in report.entries] == [folder]
    files = tree(tmp_path / "out")
    assert json.loads(files[f"{folder}/compile_flags.json"]) == [
        "--target=trn1",
        "--model-type=transformer",
    ]
    assert files[f"{folder}/model.done"] == b"" and files[f"{folder}/model.hlo_module.pb"] == b""
