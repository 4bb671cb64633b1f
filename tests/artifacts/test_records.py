"""Typed record documents (issue 12): compile and run records write the same bytes as the
dicts they replace, records of older shapes still parse and index, a tag move is one
TagEvent from `kiln tag` to `kiln history`, and statuses are enums of the same strings."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from artifacts.digest import Digest, canonical_json
from artifacts.errors import InvalidManifest, ReindexRefused
from artifacts.records import (
    COMPILATION_MEDIA_TYPE,
    RUN_MEDIA_TYPE,
    CompilationRecord,
    ItemStatus,
    RunRecord,
    RunStatus,
    TagEvent,
)
from artifacts.reindex import reindex
from artifacts.store import Store
from artifacts.tagrefs import read_tag_ref
from pipeline.jobs import GraphJob
from pipeline.planview import PlanRow, PlanStatus
from pipeline.spec import Bucket
from tests.conftest import build_release

HLO_KEY = "sha256:" + "1" * 64
HLO = "sha256:" + "2" * 64
EXE = "sha256:" + "3" * 64
LOG = "sha256:" + "4" * 64
PROVENANCE = {"host": "builder", "pid": 7, "peak_rss_bytes": 1 << 30, "bucket": "[1,32]"}
RECIPE = {"direct_key": "sha256:" + "5" * 64, "signature": {"inputs": [], "outputs": []}}


# The dict pipeline/tasks.py built before the typed record, as it was written.
OLD_COMPILE_RECORD = {
    "mediaType": COMPILATION_MEDIA_TYPE,
    "hlo_key": HLO_KEY,
    "status": "ok",
    "compiler": "xla-cpu",
    "compiler_version": "jaxlib-0.4",
    "flags": ["--a", "--b"],
    "target": "cpu",
    "hlo_digest": HLO,
    "executable_digest": EXE,
    "executable_format": "xla-cpu",
    "log_digest": LOG,
    "seconds": 1.25,
    "error": None,
    "reason": None,
    "created_at": 1700000000.5,
    "provenance": PROVENANCE,
    "recipe": RECIPE,
}


def _compiled(**changes: object) -> CompilationRecord:
    fields = {k: v for k, v in OLD_COMPILE_RECORD.items() if k != "mediaType"}
    fields |= {"status": RunStatus.OK, "flags": ("--a", "--b")} | changes
    return CompilationRecord(**fields)  # type: ignore[arg-type]


def test_a_compile_record_writes_the_bytes_of_the_dict_it_replaces() -> None:
    """The same bytes, with and without triage."""
    assert _compiled().to_bytes() == canonical_json(OLD_COMPILE_RECORD)
    triage = {"cause": "oom", "code": None, "summary": "out of memory"}
    failure = {
        "executable_digest": None,
        "executable_format": None,
        "error": "boom",
        "reason": "exit",
        "triage": triage,
    }
    failed = _compiled(status=RunStatus.FAILED, **failure)
    old_failed = OLD_COMPILE_RECORD | failure | {"status": "failed"}
    assert failed.to_bytes() == canonical_json(old_failed)


def test_an_imported_neuron_cache_record_has_no_recipe_key() -> None:
    """The dict pipeline/neuron_cache.py built before: no recipe, no triage."""
    record = _compiled(compiler="neuronx-cc", executable_format="neff", recipe=None)
    value = json.loads(record.to_bytes())
    assert "recipe" not in value and "triage" not in value
    assert value["flags"] == ["--a", "--b"] and value["status"] == "ok"


def test_an_older_compile_record_parses() -> None:
    """Records written before reason, error, provenance and recipe were always there."""
    old = {
        "mediaType": COMPILATION_MEDIA_TYPE,
        "hlo_key": HLO_KEY,
        "status": "ok",
        "compiler": "neuronx-cc",
        "compiler_version": "2.14",
        "flags": [],
        "target": "inf2",
        "hlo_digest": HLO,
        "executable_digest": EXE,
        "executable_format": "neff",
        "seconds": 1,
        "created_at": 1.0,
    }
    record = CompilationRecord.from_json(old, "old record")
    assert record.ok and record.seconds == 1.0 and record.flags == ()
    assert record.log_digest is None and record.provenance is None and record.recipe is None
    assert CompilationRecord.from_json(json.loads(record.to_bytes()), "again") == record
    assert CompilationRecord.from_json(json.loads(_compiled().to_bytes()), "new") == _compiled()


def test_a_compile_record_without_its_status_is_refused_naming_the_field() -> None:
    value = json.loads(_compiled().to_bytes())
    del value["status"]
    with pytest.raises(InvalidManifest, match=r"^record X: status: required field is missing$"):
        CompilationRecord.from_json(value, "record X")


def _run(**changes: object) -> RunRecord:
    fields: dict[str, object] = {
        "id": "a" * 32,
        "started_at": 10.0,
        "finished_at": 12.5,
        "status": RunStatus.OK,
        "spec_digest": "sha256:" + "6" * 64,
        "host": "builder",
        "user": "kiln",
        "summary": {"jobs": 1, "failed": 0},
        "items": ({"model": "m", "status": ItemStatus.HIT_DIRECT, "hit_kind": "direct-hit"},),
    }
    fields.update(changes)
    return RunRecord(**fields)  # type: ignore[arg-type]


def test_a_run_record_writes_the_bytes_of_the_dict_it_replaces() -> None:
    old = {
        "mediaType": RUN_MEDIA_TYPE,
        "id": "a" * 32,
        "started_at": 10.0,
        "finished_at": 12.5,
        "status": "ok",
        "spec_digest": "sha256:" + "6" * 64,
        "host": "builder",
        "user": "kiln",
        "summary": {"jobs": 1, "failed": 0},
        "items": [{"model": "m", "status": "direct-hit", "hit_kind": "direct-hit"}],
    }
    assert _run().to_bytes() == canonical_json(old)
    assert RunRecord.from_json(old, "old run") == _run()
    interrupted = _run(status=RunStatus.INTERRUPTED, items=())
    assert json.loads(interrupted.to_bytes())["status"] == "interrupted"
    assert json.loads(interrupted.to_bytes())["items"] == []


def test_statuses_are_their_strings() -> None:
    """JSON output and index rows hold the same strings as before the enums."""
    assert json.dumps([RunStatus.INTERRUPTED, ItemStatus.HIT_HLO]) == '["interrupted", "hlo-hit"]'
    assert f"{ItemStatus.COMPILED}" == "compiled" and RunStatus.FAILED == "failed"


def test_reindex_indexes_older_records_and_refuses_one_it_cannot_index(store_dir: Path) -> None:
    """Reindex parses records through the typed classes: an older record indexes as before;
    one without a field its row needs stops reindex naming it (it used to fail half-way in
    the database with a NOT NULL error)."""
    url = f"sqlite:///{store_dir / 'index.db'}"
    with Store.open(str(store_dir), url) as store:
        hlo = store.put_bytes(b"hlo", kind="hlo")
        exe = store.put_bytes(b"exe", kind="executable")
        old = {
            "mediaType": COMPILATION_MEDIA_TYPE,
            "hlo_key": HLO_KEY,
            "status": "ok",
            "compiler": "xla-cpu",
            "compiler_version": "jaxlib-test",
            "flags": [],
            "target": "cpu",
            "hlo_digest": str(hlo.digest),
            "executable_digest": str(exe.digest),
            "executable_format": "xla-cpu",
            "seconds": 1.0,
            "created_at": 5.0,
        }
        store.put_bytes(canonical_json(old), kind="compilation")
        run = _run(items=()).to_json() | {"summary": {}}
        del run["finished_at"]
        store.put_bytes(canonical_json(run), kind="run")
    report = reindex(str(store_dir), url)
    assert (report.compilations, report.runs) == (1, 1)
    with Store.open(str(store_dir), url) as store:
        (row,) = store.compilations(hlo_key=HLO_KEY)
        assert row.ok and row.executable_digest == str(exe.digest) and row.provenance is None
        bad = dict(old, hlo_key="sha256:" + "9" * 64)
        del bad["compiler"]
        put = store.backend.put(io.BytesIO(canonical_json(bad)))
    with pytest.raises(ReindexRefused, match=f"{put.digest} .*compiler: required field"):
        reindex(str(store_dir), url)


def test_a_tag_move_is_the_tag_event_it_stored(store_dir: Path) -> None:
    """`Store.tag` returns the TagEvent whose blob the ref object names, and history from the
    index gives each move's link to the one before, as walking the chain does."""
    with Store.open(str(store_dir)) as store:
        first = store.put_release(build_release(store, seqs=(32,), weights=b"one"))
        second = store.put_release(build_release(store, seqs=(32,), weights=b"two"))
        one = store.tag(str(first), "m:prod")
        two = store.tag(str(second), "m:prod", reason="promote")
        ref = read_tag_ref(store.backend, "m", "prod")  # type: ignore[arg-type]
        assert ref is not None and ref.event == str(Digest.of_bytes(two.to_bytes()))
        assert two.previous_event == str(Digest.of_bytes(one.to_bytes()))
        assert store.history("m:prod") == [two, one]
        assert TagEvent.from_json(json.loads(two.to_bytes()), "event") == two
    assert set(two.to_move_json()) == {
        "name", "tag", "digest", "previous", "at", "user", "host", "reason"
    }


def test_plan_rows_print_their_kind_and_detail_as_before() -> None:
    """`kiln plan` statuses are a kind and a detail (no more splitting the printed text)."""
    key = "sha256:" + "7" * 64
    job = GraphJob("m", "encoder", Bucket(1, 32), "cpu", (), "xla-cpu", "jaxlib", "float32", key)
    rows = [
        PlanRow(job, PlanStatus.DIRECT_HIT),
        PlanRow(job, PlanStatus.COMPILE, "(not traced)"),
        PlanRow(job, PlanStatus.UNAVAILABLE, "neuronx-cc is not installed"),
        PlanRow(job, PlanStatus.TRACE_FAILED, "trace failed: ValueError: x"),
    ]
    assert [r.status for r in rows] == [
        "direct-hit",
        "compile (not traced)",
        "unavailable: neuronx-cc is not installed",
        "trace-failed: trace failed: ValueError: x",
    ]
    assert json.loads(json.dumps([r.to_json() for r in rows]))[2]["status"] == rows[2].status
    assert [str(r.kind) for r in rows] == ["direct-hit", "compile", "unavailable", "trace-failed"]
