"""Shared pieces of the compile-farm tests (Ray executor, shards, scheduled workflows): a tiny
BERT spec (2 buckets, real tracing and compiles), one single-process reference compile of it,
and release comparison.

Two compiles of one HLO give different executable bytes (and logs that carry timings), so
releases are compared as manifest JSON without provenance, compile_seconds, executable
digests and logs, and then every graph's executables are run on the same inputs, whose
outputs must be identical."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from artifacts.manifest import Release
from tests.helpers.model_helpers import TINY_BERT
from tests.helpers.pipeline_helpers import (
    REPO,
    compile_json,
    kiln_env,
    load_weights,
    release,
    run_graph,
    write_spec,
)

REF = "tiny-bert:latest"


def tiny_bert_spec(path: Path) -> Path:
    """One encoder, two buckets (b1xs16, b1xs32): two graphs for target cpu."""
    model = {
        "name": "tiny-bert",
        "task": "encoder",
        "source": {"seed": 0, "config": TINY_BERT},
        "buckets": {"batch": [1], "seq": [16, 32]},
    }
    return write_spec(path, model, targets=["cpu"])


_SINGLE: dict[str, Path] = {}


def single_run(factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(spec, store): the spec compiled once by one plain local `kiln compile` (memoized for
    the whole pytest session, shared by the Ray, shard and workflow tests)."""
    if not _SINGLE:
        root = factory.mktemp("farm-single")
        spec = tiny_bert_spec(root / "tiny-bert.yaml")
        report = compile_json(spec, root / "store", workers=1)
        assert report["compiled"] == 2 and report["failed"] == 0, report
        _SINGLE.update(spec=spec, store=root / "store")
    return _SINGLE["spec"], _SINGLE["store"]


def comparable(rel: Release) -> dict[str, Any]:
    """The manifest JSON less what differs between two compiles of the same graphs."""
    data = rel.to_json()
    data.pop("provenance")
    for graph in data["graphs"]:
        graph.pop("compile_seconds")
        graph.pop("log", None)
        graph["executable"].pop("digest")
    return data


def _inputs(graph: Any) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for param in graph.signature["parameters"]:
        if param["kind"] != "input":
            continue
        dtype, shape = np.dtype(param["dtype"]), param["shape"]
        if np.issubdtype(dtype, np.integer):
            high = 2 if "mask" in param["name"] or "type" in param["name"] else 64
            value = rng.integers(0, high, size=shape).astype(dtype)
            if "mask" in param["name"]:
                value[..., 0] = 1
        else:
            value = rng.standard_normal(shape).astype(dtype)
        out[param["name"]] = value
    return out


def outputs(store: Path, rel: Release) -> dict[str, dict[str, np.ndarray]]:
    """Each graph's outputs (by graph kind and bucket) on fixed inputs."""
    weights = load_weights(store, rel)
    return {
        f"{g.kind} {g.bucket_label}": run_graph(store, g, weights, _inputs(g)) for g in rel.graphs
    }


def assert_same_release(store: Path, reference: Path, ref: str = REF) -> None:
    """`ref` in `store` holds what it holds in `reference`: same manifest up to per-compile
    fields, and executables that compute identical outputs."""
    _, got = release(store, ref)
    _, want = release(reference, ref)
    assert comparable(got) == comparable(want)
    got_out, want_out = outputs(store, got), outputs(reference, want)
    assert got_out.keys() == want_out.keys()
    for graph, values in want_out.items():
        for name, value in values.items():
            assert np.array_equal(got_out[graph][name], value), (graph, name)


def kiln_argv(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "kiln", *(str(a) for a in args)]


def run_parallel(
    commands: Sequence[Sequence[str]],
    envs: Sequence[dict[str, str]] | None = None,
    cwd: Path = REPO,
    timeout: float = 300,
) -> list[subprocess.CompletedProcess[str]]:
    """Start every command at once (as machines of a farm would), wait for all."""
    envs = envs or [kiln_env() for _ in commands]
    procs = [
        subprocess.Popen(
            list(c), cwd=cwd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for c, e in zip(commands, envs, strict=True)
    ]
    done = []
    for command, proc in zip(commands, procs, strict=True):
        out, err = proc.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(list(command), proc.returncode, out, err))
    return done


def json_report(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.returncode == 0, (proc.args, proc.stderr[-3000:])
    return json.loads(proc.stdout)


def check_shards_then_final(shards: Sequence[dict[str, Any]], final: dict[str, Any]) -> None:
    """Shard reports split the plan (disjoint, none empty here, nothing published) and the
    final run found every graph cached and published the release."""
    keys = [{item["direct_key"] for item in r["items"]} for r in shards]
    for i, report in enumerate(shards):
        assert report["shard"] == {"index": i, "count": len(shards)}
        assert report["failed"] == 0 and report["releases"] == [], report
        assert keys[i], f"shard {i} got no job"
    assert sum(len(k) for k in keys) == len(set().union(*keys))
    assert {item["status"] for item in final["items"]} == {"direct-hit"}
    assert {item["direct_key"] for item in final["items"]} == set().union(*keys)
    assert [r["ref"] for r in final["releases"]] == [REF]
