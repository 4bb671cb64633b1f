"""`kiln compile --max-memory` / `defaults.max_memory`: compiles are admitted by estimated
memory (real workers, real xla-cpu compiles), over-budget graphs are refused in one line, and
measured peaks of earlier compiles become the estimates of later ones."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from artifacts.index.models import CompilationRow
from artifacts.store import Store
from pipeline.compile_budget import (
    WORKER_BASE_BYTES,
    compile_estimate,
    estimate_graph_bytes,
    human,
    parse_size,
)
from pipeline.errors import SpecError
from pipeline.jobs import plan_spec
from pipeline.spec import load_spec
from tests.helpers.pipeline_helpers import compile_json, kiln, micro_model, write_spec

EMPTY_SIGNATURE: dict[str, Any] = {"inputs": [], "outputs": []}


def _compilations(store: Path) -> list[dict[str, Any]]:
    with Store.open(str(store)) as opened, opened.engine.connect() as conn:
        rows = conn.execute(
            select(CompilationRow.created_at, CompilationRow.seconds, CompilationRow.provenance)
        ).all()
    return [
        {"start": r.created_at - r.seconds, "end": r.created_at, **json.loads(r.provenance)}
        for r in rows
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One store: first every graph refused (budget below any estimate), then compiled with a
    budget that holds one compile but not two, on two workers."""
    tmp = tmp_path_factory.mktemp("max-memory")
    store = tmp / "store"
    refused = kiln(
        "compile", write_spec(tmp / "refused.yaml", micro_model()), "--workers", "2",
        "--max-memory", "100M", "--json", store=store,
    )
    one_budget = int(WORKER_BASE_BYTES * 1.5)
    spec = write_spec(tmp / "one.yaml", micro_model(), max_memory=f"{one_budget >> 20}M")
    report = compile_json(spec, store, workers=2)
    return {"tmp": tmp, "store": store, "refused": refused, "report": report, "spec": spec}


def test_graph_over_the_whole_budget_is_refused_in_one_line(runs: dict[str, Any]) -> None:
    proc = runs["refused"]
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert (report["jobs"], report["failed"], report["compiled"]) == (4, 4, 0)
    errors = sorted(i["error"] for i in report["items"])
    assert errors[0].startswith("model micro graph context_encoding b1xs16 (cpu): estimated")
    for error in errors:
        assert "\n" not in error and error.endswith("exceeds --max-memory 100.0 MiB")
    assert report["not_released"] == ["micro:latest: 4 of 4 graphs failed"]


def test_budget_for_one_compile_runs_compiles_one_at_a_time(runs: dict[str, Any]) -> None:
    report = runs["report"]
    assert (report["compiled"], report["failed"]) == (4, 0)
    records = sorted(_compilations(runs["store"]), key=lambda r: r["start"])
    assert len(records) == 4  # the refused run compiled nothing
    for earlier, later in zip(records, records[1:], strict=False):
        assert later["start"] >= earlier["end"], (earlier, later)


def test_recorded_peaks_become_the_estimates(runs: dict[str, Any]) -> None:
    records = _compilations(runs["store"])
    for record in records:
        assert 50 << 20 < record["peak_rss_bytes"] < 16 << 30
        assert record["architecture"].startswith("sha256:")
    spec = load_spec(runs["spec"])
    with Store.open(str(runs["store"])) as store:
        jobs = plan_spec(spec, store)[0].jobs
        for job in jobs:
            want = max(
                r["peak_rss_bytes"]
                for r in records
                if (r["graph_kind"], r["bucket"]) == (job.graph_kind, job.bucket_json)
            )
            assert compile_estimate(store, job, 10, EMPTY_SIGNATURE) == want
        other = plan_spec(
            load_spec(write_spec(runs["tmp"] / "other.yaml", micro_model(hidden_size=64))),
            store,
        )[0].jobs[0]
        sized = estimate_graph_bytes(hlo_size=10, signature=EMPTY_SIGNATURE)
        assert compile_estimate(store, other, 10, EMPTY_SIGNATURE) == sized


def test_size_estimate_grows_with_hlo_and_io() -> None:
    sig = {"inputs": [{"dtype": "int64", "shape": [2, 128]}],
           "outputs": [{"dtype": "bfloat16", "shape": [2, 128, 64]}]}
    base = estimate_graph_bytes(hlo_size=1000, signature=EMPTY_SIGNATURE)
    assert base > WORKER_BASE_BYTES
    assert estimate_graph_bytes(hlo_size=2000, signature=EMPTY_SIGNATURE) > base
    io = 2 * 128 * 8 + 2 * 128 * 64 * 2
    assert estimate_graph_bytes(hlo_size=1000, signature=sig) == base + io


def test_sizes_parse_and_bad_sizes_fail_clearly(tmp_path: Path) -> None:
    assert parse_size("16G") == 16 << 30 and parse_size("512M") == 512 << 20
    assert parse_size("1.5GiB") == 3 << 29 and parse_size("1024") == 1024 and parse_size(7) == 7
    assert human(3 << 29) == "1.5 GiB"
    for bad in ("lots", "0", "-1G", "16X"):
        with pytest.raises(ValueError, match="size"):
            parse_size(bad)
    spec = write_spec(tmp_path / "spec.yaml", micro_model(), max_memory="lots")
    with pytest.raises(SpecError) as info:
        load_spec(spec)
    assert str(info.value) == (
        f"{spec}: defaults.max_memory: 'lots': expected a size like 16G, 512M or 1073741824"
    )
    ok = write_spec(tmp_path / "ok.yaml", micro_model(), max_memory="2G")
    assert load_spec(ok).max_memory == 2 << 30
    proc = kiln("compile", spec, "--max-memory", "lots", store=tmp_path / "store")
    assert proc.returncode == 2 and "--max-memory" in proc.stderr and "'lots'" in proc.stderr
