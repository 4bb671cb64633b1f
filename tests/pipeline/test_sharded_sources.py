"""Sharded Hugging Face checkpoints as sources, releases whose weights are several blobs, and
clear failures for an index naming an absent shard or a checkpoint missing a tensor."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from artifacts.digest import Digest
from artifacts.store import Store
from tests.helpers.pipeline_helpers import (
    MICRO_LLAMA,
    blob_count,
    compile_json,
    kiln,
    kiln_env,
    release,
    write_spec,
)

BUCKETS = {"batch": [1], "seq": [16]}
PROMPT = [5, 9, 3, 17, 2]
SMALL_BLOBS = kiln_env() | {"KILN_WEIGHTS_BLOB_BYTES": "30000"}


def _save(folder: Path, shard: str | None = None, seed: int = 3) -> Any:
    import torch
    import transformers

    config = transformers.LlamaConfig(**MICRO_LLAMA)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(folder, **kwargs)
    return model


def _spec(path: Path, name: str, folder: Path) -> Path:
    model = {"name": name, "task": "causal-lm", "source": {"path": str(folder)}}
    return write_spec(path, {**model, "buckets": BUCKETS})


def _eager_greedy(model: Any, steps: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([PROMPT]), max_new_tokens=steps, do_sample=False, pad_token_id=0
        )
    return out[0, len(PROMPT) :].tolist()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("sharded")
    model = _save(root / "ckpt", shard="20KB")
    store = root / "store"
    spec = _spec(root / "sharded.yaml", "sharded", root / "ckpt")
    report = compile_json(spec, store, workers=1, env=SMALL_BLOBS)
    return {"root": root, "model": model, "store": store, "report": report}


def test_sharded_checkpoint_compiles_into_several_weight_blobs(sharded: dict[str, Any]) -> None:
    shards = sorted(p.name for p in (sharded["root"] / "ckpt").glob("*.safetensors"))
    assert len(shards) > 2
    assert (sharded["root"] / "ckpt" / "model.safetensors.index.json").is_file()
    assert sharded["report"]["failed"] == 0
    _, rel = release(sharded["store"], "sharded:latest")
    names = [w.name for w in rel.source.weights]
    assert len(names) > 1 and names[0] == f"model-00001-of-{len(names):05d}.safetensors"
    assert all(w.size <= 30000 + 4096 for w in rel.source.weights)


def test_several_weight_blobs_load_and_generate_like_transformers(
    sharded: dict[str, Any], tmp_path: Path
) -> None:
    import runtime_loader

    model = runtime_loader.load(
        "sharded:latest", store=str(sharded["store"]), cache_dir=tmp_path / "cache"
    )
    ours = model.generate([PROMPT], max_new_tokens=6)
    assert ours[0].tolist() == _eager_greedy(sharded["model"], 6)


def test_second_compile_of_a_sharded_source_stores_nothing(sharded: dict[str, Any]) -> None:
    before = blob_count(sharded["store"], "weights")
    spec = sharded["root"] / "sharded.yaml"
    report = compile_json(spec, sharded["store"], workers=1, env=SMALL_BLOBS)
    assert report["direct_hits"] == report["jobs"] and report["releases"][0]["unchanged"]
    assert blob_count(sharded["store"], "weights") == before


def test_index_naming_an_absent_shard_fails_before_anything_is_written(tmp_path: Path) -> None:
    _save(tmp_path / "ckpt", shard="20KB")
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    gone = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / "ckpt" / gone).unlink()
    store = tmp_path / "store"
    proc = kiln("compile", _spec(tmp_path / "s.yaml", "broken", tmp_path / "ckpt"), store=store)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kiln: error: "), proc.stderr
    assert gone in lines[0] and "model.safetensors.index.json" in lines[0]
    assert not [p for p in store.glob("blobs/**/*") if p.is_file()]


def test_checkpoint_missing_a_tensor_fails_naming_it(tmp_path: Path) -> None:
    """transformers would warn and initialise the tensor at random; Kiln refuses."""
    from safetensors.torch import load_file, save_file

    from pipeline.jobs import plan_model
    from pipeline.spec import load_spec
    from pipeline.tasks import trace_model

    _save(tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.norm.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    (model,) = load_spec(_spec(tmp_path / "s.yaml", "holey", tmp_path / "ckpt")).models
    store_url = str(tmp_path / "store")
    index_url = f"sqlite:///{tmp_path / 'store' / 'index.db'}"
    with Store.open(store_url, index_url) as store:
        plan = plan_model(model, "auto", store, None)
    outcome = trace_model(store_url, index_url, model, plan.misses, plan.weights_key)
    assert outcome.weights is None and not outcome.traced
    errors = {message for _, message in outcome.failed}
    assert len(outcome.failed) == len(plan.misses) > 0 and len(errors) == 1
    (error,) = errors
    assert "has no tensor model.norm.weight" in error and "\n" not in error
    assert blob_count(tmp_path / "store", "weights") == 0


@pytest.mark.parametrize("after", ["gc", "reindex"])
def test_several_weight_blobs_stay_reusable_after_gc_and_reindex(
    tmp_path: Path, after: str
) -> None:
    """A release's weights-set record (what maps its weights key to several blobs) lives as
    long as the release: neither `kiln gc` nor `kiln reindex` makes a warm compile of the
    unchanged spec read and store the weights again (`--recheck`: past the no-op shortcut,
    which needs only the release's own blobs)."""
    _save(tmp_path / "ckpt", shard="20KB")
    store = tmp_path / "store"
    spec = _spec(tmp_path / "s.yaml", "kept", tmp_path / "ckpt")
    first = compile_json(spec, store, workers=1, env=SMALL_BLOBS)
    assert first["failed"] == 0 and first["weights_stored"] == 1
    assert blob_count(store, "weights-set") == 1
    if after == "gc":
        proc = kiln("gc", "--min-age-hours", "0", "--grace-days", "0", store=store)
    else:
        proc = kiln("reindex", store=store)
    assert proc.returncode == 0, proc.stderr
    with Store.open(str(store)) as opened:
        _, rel = release(store, "kept:latest")
        entry = opened.weights_entry(rel.annotations["io.kiln.weights_key"])
        assert entry is not None and opened.backend.stat(Digest.parse(entry.digest)) is not None
    again = compile_json(spec, store, "--recheck", workers=1, env=SMALL_BLOBS)
    assert again["direct_hits"] == again["jobs"] and again["releases"][0]["unchanged"]
    assert again["weights_stored"] == 0
