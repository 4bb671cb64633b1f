"""`kiln pull / run / generate / cache` as an inference host runs them: real releases (the
example specs compiled once per session), fresh processes, results equal to the library's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import runtime_loader
from runtime_loader.errors import WrongTarget
from tests.helpers.cli_helpers import assert_one_line_error as one_line_error
from tests.helpers.loader_helpers import (
    LLAMA_REF,
    MINILM_REF,
    blob_path,
    cached_digests,
    kiln,
    kiln_env,
    kiln_ok,
    pulled_cache,
    release_of,
)

TEXT = "Kiln compiles models ahead of time for AWS Neuron."


@pytest.fixture(scope="module")
def cache(minilm_store: Path, llama_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One host cache with both releases pulled."""
    pulls = ((MINILM_REF, minilm_store), (LLAMA_REF, llama_store))
    return pulled_cache(tmp_path_factory, "cli-cache", *pulls)


@pytest.fixture(scope="module")
def minilm(minilm_store: Path, cache: Path) -> Any:
    return runtime_loader.load(MINILM_REF, store=minilm_store, cache_dir=cache)


@pytest.fixture(scope="module")
def llama(llama_store: Path, cache: Path) -> Any:
    return runtime_loader.load(LLAMA_REF, store=llama_store, cache_dir=cache)


def first_values(line: str) -> np.ndarray:
    assert line.strip().startswith("first values:"), line
    return np.array([float(v) for v in line.split(":", 1)[1].split()])


def assert_one_line_error(proc: Any, *expected: str) -> None:
    one_line_error(proc, *expected, prefix="kiln: error:")


def test_pull_text_report(minilm_store: Path, tmp_path: Path) -> None:
    digest, release = release_of(minilm_store, MINILM_REF)
    common = ("--store", minilm_store, "--cache-dir", tmp_path / "c")
    proc = kiln_ok("pull", MINILM_REF, "--target", "cpu", *common)
    blobs = len(release.graphs) + len(release.source.weights) + len(release.source.files)
    assert f"pulled {MINILM_REF} ({digest}) for cpu: {blobs} blobs fetched" in proc.stdout
    assert "0 already cached" in proc.stdout


def test_run_text_prints_the_embedding(minilm_store: Path, cache: Path, minilm: Any) -> None:
    proc = kiln_ok("run", MINILM_REF, "--text", TEXT, "--store", minilm_store, "--cache-dir", cache)
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "embeddings: shape (1, 384) float32"
    expected = minilm.encode([TEXT])[0, :8]
    np.testing.assert_allclose(first_values(lines[1]), expected, atol=2e-6, rtol=0)


def test_run_offline_from_the_environment(cache: Path, minilm: Any, tmp_path: Path) -> None:
    env = kiln_env(KILN_OFFLINE="1", KILN_CACHE_DIR=str(cache))
    proc = kiln_ok("run", MINILM_REF, "--text", TEXT, "--text", "two", "--json", env=env)
    summary = json.loads(proc.stdout)
    assert summary["embeddings"]["shape"] == [2, 384]
    np.testing.assert_allclose(
        summary["embeddings"]["first"], minilm.encode([TEXT])[0, :8], atol=2e-6, rtol=0
    )


def test_run_input_npz(minilm_store: Path, cache: Path, minilm: Any, tmp_path: Path) -> None:
    tokenizer = minilm.tokenizer()
    encodings = tokenizer.encode_batch([TEXT, "A short one."])
    length = max(len(e.ids) for e in encodings)
    ids = np.zeros((2, length), dtype=np.int64)
    mask = np.zeros((2, length), dtype=np.int64)
    for row, encoding in enumerate(encodings):
        ids[row, : len(encoding.ids)] = encoding.ids
        mask[row, : len(encoding.ids)] = 1
    inputs, outputs = tmp_path / "in.npz", tmp_path / "out.npz"
    np.savez(inputs, input_ids=ids, attention_mask=mask)
    proc = kiln_ok(
        "run",
        MINILM_REF,
        "--input",
        inputs,
        "--output",
        outputs,
        "--store",
        minilm_store,
        "--cache-dir",
        cache,
    )
    assert f"last_hidden_state: shape (2, {length}, 384) float32" in proc.stdout
    expected = minilm(ids, mask)
    with np.load(outputs) as saved:
        assert set(saved.files) == set(expected)
        for name, value in expected.items():
            np.testing.assert_allclose(saved[name], value, atol=1e-6, rtol=0)


def test_generate_prints_the_library_tokens(llama_store: Path, cache: Path, llama: Any) -> None:
    common = ("--store", llama_store, "--cache-dir", cache)
    proc = kiln_ok("generate", LLAMA_REF, "--prompt-ids", "1,2,3", "--max-new-tokens", "5", *common)
    expected = llama.generate([[1, 2, 3]], max_new_tokens=5)[0]
    assert proc.stdout.strip() == ",".join(str(int(t)) for t in expected)
    assert len(proc.stdout.strip().split(",")) == 5

    rows = [[1, 2, 3], [9, 8, 7, 6, 5, 4]]
    sampling = ("--do-sample", "--top-k", "20", "--top-p", "0.9", "--seed", "3")
    proc = kiln_ok(
        "generate", LLAMA_REF, "--prompt-ids", "1,2,3;9,8,7,6,5,4", "--max-new-tokens", "6",
        *sampling, "--json", *common,
    )  # fmt: skip
    expected = llama.generate(rows, max_new_tokens=6, do_sample=True, top_k=20, top_p=0.9, seed=3)
    assert json.loads(proc.stdout) == {"tokens": expected.tolist()}

    proc = kiln_ok(
        "generate", LLAMA_REF, "--prompt-ids", "1,2,3;9,8,7,6,5,4", "--max-new-tokens", "4",
        "--stream", *common,
    )  # fmt: skip
    steps = [[int(t) for t in line.split()] for line in proc.stdout.strip().splitlines()]
    np.testing.assert_array_equal(np.array(steps).T, llama.generate(rows, max_new_tokens=4))


@pytest.mark.parametrize(
    ("store_of", "args", "expected"),
    [
        ("minilm", ("run", "nope:latest", "--text", "hi"), ("unknown reference", "nope:latest")),
        ("llama", ("run", LLAMA_REF, "--text", "hi"), ("causal-lm", "kiln generate")),
        ("minilm", ("generate", MINILM_REF, "--prompt-ids", "1,2"), ("encoder", "kiln run")),
        ("llama", ("generate", LLAMA_REF, "--prompt-ids", "1,x,3"), ("--prompt-ids", "1,x,3")),
        ("llama", ("generate", LLAMA_REF, "--prompt-ids", "1,2;"), ("--prompt-ids",)),
        ("minilm", ("pull", MINILM_REF, "--target", "inf2"), ("target cpu", "inf2")),
    ],
    ids=["unknown-ref", "run-on-llm", "generate-on-encoder", "bad-ids", "empty-row", "target"],
)
def test_errors_are_one_line(
    store_of: str,
    args: tuple[str, ...],
    expected: tuple[str, ...],
    minilm_store: Path,
    llama_store: Path,
    cache: Path,
) -> None:
    store = minilm_store if store_of == "minilm" else llama_store
    proc = kiln(*args, "--store", store, "--cache-dir", cache)
    assert_one_line_error(proc, *expected)


def test_pull_for_another_target_fetches_nothing_but_the_manifest(
    minilm_store: Path, tmp_path: Path
) -> None:
    digest, _ = release_of(minilm_store, MINILM_REF)
    common = ("--store", minilm_store, "--cache-dir", tmp_path / "c")
    assert_one_line_error(kiln("pull", MINILM_REF, "--target", "inf2", *common), "inf2")
    assert cached_digests(tmp_path / "c") == {str(digest)}
    with pytest.raises(WrongTarget, match="compiled for target cpu, not trn1"):
        runtime_loader.load(MINILM_REF, store=minilm_store, cache_dir=tmp_path / "c", target="trn1")
    assert cached_digests(tmp_path / "c") == {str(digest)}


def test_offline_error_names_the_missing_digest(
    minilm_store: Path, cache: Path, tmp_path: Path
) -> None:
    private = shutil.copytree(cache, tmp_path / "cache")
    _, release = release_of(minilm_store, MINILM_REF)
    lost = str(release.graphs[0].executable.digest)
    blob_path(private, lost).unlink()
    proc = kiln("run", MINILM_REF, "--text", "hi", "--offline", "--cache-dir", private)
    assert_one_line_error(proc, "offline", "1 blob(s)", lost)
    assert lost not in cached_digests(private)


def test_cache_ls(cache: Path) -> None:
    proc = kiln_ok("cache", "ls", "--cache-dir", cache, "--json")
    listed = json.loads(proc.stdout)
    assert {b["digest"] for b in listed} == cached_digests(cache)
    times = [b["last_used"] for b in listed]
    assert times == sorted(times)  # least recently used first
    text = kiln_ok("cache", "ls", "--cache-dir", cache).stdout
    assert text.strip().splitlines()[-1].startswith(f"{len(listed)} blobs, ")
