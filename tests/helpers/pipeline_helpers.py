"""Helpers for the end-to-end pipeline tests: run `kiln` as a subprocess, write specs, read
stores back, and run stored executables with stored weights."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from artifacts.digest import Digest
from artifacts.manifest import Graph, Release
from artifacts.store import Store

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "workflows" / "examples"

# A one-layer Llama: every graph traces and compiles in well under a second.
MICRO_LLAMA: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "vocab_size": 64,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
}
MICRO_BUCKETS = {"batch": [1], "seq": [16, 32]}  # x 2 graph kinds = 4 graphs per target


def micro_model(name: str = "micro", seed: int = 0, **config: Any) -> dict[str, Any]:
    return {
        "name": name,
        "task": "causal-lm",
        "source": {"seed": seed, "config": {**MICRO_LLAMA, **config}},
        "buckets": MICRO_BUCKETS,
    }


def write_spec(path: Path, *models: dict[str, Any], **defaults: Any) -> Path:
    data: dict[str, Any] = {"models": list(models)}
    if defaults:
        data["defaults"] = defaults
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def example_spec(name: str, tmp_path: Path, **changes: Any) -> Path:
    """A copy of an example spec with fields of its first model changed (deep for source)."""
    data = yaml.safe_load((EXAMPLES / name).read_text())
    model = data["models"][0]
    for key, value in changes.items():
        if key == "config":
            model["source"]["config"] = {**model["source"]["config"], **value}
        elif key == "seed":
            model["source"]["seed"] = value
        else:
            model[key] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def kiln_env(extra_path: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("KILN_STORE", "KILN_INDEX_URL")}
    env["PJRT_DEVICE"] = "CPU"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["PYTHONPATH"] = str(REPO)
    if extra_path is not None:
        env["PATH"] = f"{extra_path}{os.pathsep}{env.get('PATH', '')}"
    return env


def kiln(
    *args: str | Path,
    store: Path,
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """`python -m kiln COMMAND --store STORE ARGS...` (the store option after the command)."""
    command, *rest = (str(a) for a in args)
    return subprocess.run(
        [sys.executable, "-m", "kiln", command, "--store", str(store), *rest],
        cwd=REPO,
        env=env or kiln_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def kiln_json(
    *args: str | Path, store: Path, env: dict[str, str] | None = None, ok: bool = True
) -> Any:
    proc = kiln(*args, "--json", store=store, env=env)
    if ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"not JSON: {proc.stdout[-2000:]}\n{proc.stderr[-2000:]}") from None


def compile_json(
    spec: Path, store: Path, *extra: str, workers: int | None = None, **kwargs: Any
) -> dict[str, Any]:
    """`kiln compile SPEC --json`; workers=1 suits the micro model (worker start-up, not the
    compiles, dominates its run time on a small machine)."""
    options = ("--workers", str(workers)) if workers else ()
    return kiln_json("compile", spec, *options, *extra, store=store, **kwargs)


def plan_statuses(spec: Path, store: Path, *extra: str) -> list[str]:
    return [row["status"] for row in kiln_json("plan", spec, *extra, store=store)]


def copy_store(source: Path, dest: Path) -> Path:
    """A private copy of a store (blobs + its SQLite index) for a test that changes it."""
    shutil.copytree(source, dest)
    return dest


def release(store_path: Path, ref: str) -> tuple[str, Release]:
    with Store.open(str(store_path)) as store:
        digest = store.resolve(ref).digest
        return str(digest), store.load_release(digest)


def read_blob(store_path: Path, digest: str | Digest) -> bytes:
    with Store.open(str(store_path)) as store:
        return store.read_bytes(Digest.parse(str(digest)))


def load_weights(store_path: Path, rel: Release) -> dict[str, np.ndarray]:
    from safetensors.numpy import load

    (ref,) = rel.source.weights
    return load(read_blob(store_path, ref.digest))


def graph_of(rel: Release, kind: str, batch: int, seq: int) -> Graph:
    (graph,) = [
        g for g in rel.graphs if g.kind == kind and g.bucket == {"batch": batch, "seq": seq}
    ]
    return graph


def run_graph(
    store_path: Path, graph: Graph, weights: dict[str, np.ndarray], inputs: dict[str, Any]
) -> dict[str, np.ndarray]:
    """Run a stored xla-cpu executable: parameters in signature (HLO) order, inputs by name
    and weights from the stored safetensors; outputs by the signature's output names."""
    from runtime_loader.executors.xla_cpu import XlaCpuExecutable

    assert graph.format == "xla-cpu"
    exe = XlaCpuExecutable.load(read_blob(store_path, graph.executable.digest))
    args = []
    for param in graph.signature["parameters"]:
        value = inputs[param["name"]] if param["kind"] == "input" else weights[param["name"]]
        value = np.asarray(value)
        assert str(value.dtype) == param["dtype"], (param["name"], value.dtype)
        assert list(value.shape) == param["shape"], (param["name"], value.shape)
        args.append(value)
    outputs = exe.run(args)
    names = [o["name"] for o in graph.signature["outputs"]]
    assert len(outputs) == len(names)
    return {name: np.array(out) for name, out in zip(names, outputs, strict=True)}


FAKE_NEURONX_CC = """#!/bin/sh
# Test double for the AWS Neuron SDK's `neuronx-cc`, which cannot be installed here (it needs
# Neuron's package index and an Inferentia/Trainium toolchain). It answers `--version` like
# the real compiler and fails every `compile` with exit 1 and a log, as a real compiler
# failure would.
if [ "$1" = "--version" ]; then
    echo "NeuronX Compiler version 2.10.0.34+6c8792c6f"
    exit 0
fi
echo "ERROR: unsupported operator (kiln test stand-in)" > "${10}"
echo "Compiler status ERROR"
exit 1
"""


def install_failing_neuronx_cc(bin_dir: Path) -> Path:
    """Put the failing `neuronx-cc` stand-in (a test double, see FAKE_NEURONX_CC) in bin_dir."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "neuronx-cc"
    script.write_text(FAKE_NEURONX_CC)
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return bin_dir


def blob_count(store_path: Path, kind: str) -> int:
    from sqlalchemy import func, select

    from artifacts.index.models import BlobRow

    with Store.open(str(store_path)) as store, store.engine.connect() as conn:
        return conn.execute(
            select(func.count()).select_from(BlobRow).where(BlobRow.kind == kind)
        ).scalar_one()


def runs(store_path: Path) -> list[dict[str, Any]]:
    """Every run row with its items (as dicts), oldest first."""
    from sqlalchemy import select

    from artifacts.index.models import RunItemRow, RunRow

    with Store.open(str(store_path)) as store, store.engine.connect() as conn:
        rows = [
            dict(r._mapping)
            for r in conn.execute(select(RunRow.__table__).order_by(RunRow.started_at))  # type: ignore[arg-type]
        ]
        for row in rows:
            row["items"] = [
                dict(i._mapping)
                for i in conn.execute(
                    select(RunItemRow.__table__).where(RunItemRow.run_id == row["id"])  # type: ignore[arg-type]
                )
            ]
    return rows
