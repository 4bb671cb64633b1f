"""The runtime loader against real compiled releases (the two example specs, compiled once per
session): numerics against eager transformers, generation token for token, pulling, the
local cache (resume, offline, corruption, pruning) and the light-import promise."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import runtime_loader
from artifacts.digest import Digest
from runtime_loader.cache import LocalCache
from runtime_loader.errors import CorruptCachedBlob, InputTooLarge, MissingFromCache
from runtime_loader.model import Bucket
from tests.helpers.loader_helpers import (
    HEAVY,
    LLAMA_REF,
    MINILM_REF,
    REPO,
    blob_path,
    build_only_digests,
    cached_digests,
    copy_store,
    eager_embeddings,
    eager_greedy,
    eager_minilm,
    flip_byte,
    imported_modules,
    kiln,
    kiln_env,
    kiln_ok,
    needed_digests,
    pull_json,
    pulled_cache,
    python,
    release_of,
    sha256_file,
    top_level,
    verify_cache,
)

SHORT = "Kiln compiles models ahead of time for AWS Neuron."
MEDIUM = (
    "An inference host resolves a tag in the store, pulls only the executables and weights it "
    "needs into a local content-addressed cache, verifies every blob against its digest and "
    "then runs the smallest compiled bucket that holds its input."
)
LONG = (
    "Scheduled compile jobs run against a shared store, and only what changed is compiled: a "
    "direct key over the architecture, graph kind, bucket shapes, library versions and "
    "compiler flags lets a job skip tracing entirely, while a second key over the lowered HLO "
    "lets two different models that produce identical graphs share a single compile. Weights "
    "are graph parameters rather than constants, so fine-tuned checkpoints of one architecture "
    "reuse the same executables, and every release manifest records the parameter order."
)
OTHERS = [
    "A short one.",
    "Deployment hosts load executables without a compiler or torch.",
    "Buckets are chosen at run time; inputs are padded with the pad token and a zero mask.",
    "Tags keep their history, so a rollback is one command.",
]


def cache_for(tmp_path: Path, name: str = "cache") -> Path:
    return tmp_path / name


def spy_buckets(model: Any, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Bucket]]:
    """Record the (graph kind, bucket) of every graph the model runs, in order."""
    chosen: list[tuple[str, Bucket]] = []
    original = model._execute

    def execute(kind: str, bucket: Bucket, *args: Any, **kwargs: Any) -> list[Any]:
        chosen.append((kind, bucket))
        return original(kind, bucket, *args, **kwargs)

    monkeypatch.setattr(model, "_execute", execute)
    return chosen


@pytest.fixture(scope="module")
def minilm_cache(minilm_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache with minilm pulled (tests copy it before changing it)."""
    return pulled_cache(tmp_path_factory, "minilm-cache", (MINILM_REF, minilm_store))


@pytest.fixture(scope="module")
def minilm(minilm_store: Path, minilm_cache: Path) -> Any:
    return runtime_loader.load(MINILM_REF, store=minilm_store, cache_dir=minilm_cache)


@pytest.fixture(scope="module")
def llama(llama_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    cache = tmp_path_factory.mktemp("llama-cache")
    return runtime_loader.load(LLAMA_REF, store=llama_store, cache_dir=cache)


# -- 1. MiniLM embeddings against eager transformers -----------------------------------------
@pytest.mark.parametrize(
    ("text", "bucket_seq"),
    [(SHORT, 32), (MEDIUM, 64), (LONG, 128)],
    ids=["short-32", "medium-64", "long-128"],
)
def test_minilm_embedding_matches_eager_per_bucket(
    minilm: Any, monkeypatch: pytest.MonkeyPatch, text: str, bucket_seq: int
) -> None:
    tokens = len(minilm.tokenizer().encode(text).ids)
    assert min(s for s in (32, 64, 128) if s >= tokens) == bucket_seq, tokens
    chosen = spy_buckets(minilm, monkeypatch)
    ours = minilm.encode([text])
    assert chosen == [("encode", Bucket(1, bucket_seq))]
    assert ours.shape == (1, 384) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, eager_embeddings([text]), atol=1e-4, rtol=0)


def test_minilm_batch_larger_than_every_bucket_is_chunked(
    minilm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = [SHORT, MEDIUM, LONG, *OTHERS]
    assert len(texts) == 7 > minilm.max_batch == 4
    chosen = spy_buckets(minilm, monkeypatch)
    ours = minilm.encode(texts)
    assert [b for _, b in chosen] == [Bucket(4, 128), Bucket(4, 128)]  # 4 + 3 (padded) rows
    assert ours.shape == (7, 384)
    np.testing.assert_allclose(ours, eager_embeddings(texts), atol=1e-4, rtol=0)
    # The same rows embedded one by one (other buckets, other padding) agree too.
    singles = np.concatenate([minilm.encode([t]) for t in texts])
    np.testing.assert_allclose(ours, singles, atol=1e-4, rtol=0)


def test_minilm_call_trims_outputs_to_the_input_shape(minilm: Any) -> None:
    tokenizer, _ = eager_minilm()
    batch = tokenizer([SHORT, OTHERS[0], OTHERS[1]], padding=True, return_tensors="np")
    out = minilm(batch["input_ids"], batch["attention_mask"])
    rows, seq = batch["input_ids"].shape
    assert out["last_hidden_state"].shape == (rows, seq, 384)


def test_sequence_longer_than_every_bucket(minilm: Any) -> None:
    import torch

    _, eager = eager_minilm()
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 20000, size=(1, 150)).astype(np.int64)
    ids[0, 0], ids[0, -1] = 101, 102  # [CLS] ... [SEP]
    with pytest.raises(InputTooLarge) as info:
        minilm(ids)
    message = str(info.value)
    assert "150" in message and "32, 64, 128" in message and "truncate" in message
    with pytest.raises(InputTooLarge):
        minilm.encode([LONG * 3], truncate=False)

    out = minilm(ids, truncate=True)["last_hidden_state"]
    assert out.shape == (1, 128, 384)
    with torch.no_grad():
        ref = eager(input_ids=torch.from_numpy(ids[:, :128])).last_hidden_state.numpy()
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
    # encode truncates by default
    assert len(minilm.tokenizer().encode(LONG * 3).ids) > 128
    assert minilm.encode([LONG * 3]).shape == (1, 384)


# -- 2. tiny-llama generation against transformers' generate ---------------------------------
def prompt(length: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 256, size=length).tolist()


# (prompt length, context_encoding seq, token_generation seq): the spec's `context: [16]`
# encodes a 7-token prompt at 16 positions; a 50-token one is encoded at 64 and decoded at 128.
@pytest.mark.parametrize(
    ("length", "context_seq", "bucket_seq"), [(7, 16, 64), (20, 64, 64), (50, 64, 128)]
)
def test_greedy_generation_matches_transformers(
    llama: Any, monkeypatch: pytest.MonkeyPatch, length: int, context_seq: int, bucket_seq: int
) -> None:
    ids = prompt(length, seed=length)
    chosen = spy_buckets(llama, monkeypatch)
    ours = llama.generate([ids], max_new_tokens=32)
    assert list(dict.fromkeys(chosen)) == [
        ("context_encoding", Bucket(1, context_seq)),
        ("token_generation", Bucket(1, bucket_seq)),
    ]
    assert ours.shape == (1, 32)
    np.testing.assert_array_equal(ours[0], eager_greedy(ids, 32))


@pytest.mark.parametrize(
    ("lengths", "context_seq", "bucket_seq"), [((7, 50), 64, 128), ((7, 12), 16, 64)]
)
def test_greedy_batch_of_two_matches_per_row_generate(
    llama: Any,
    monkeypatch: pytest.MonkeyPatch,
    lengths: tuple[int, int],
    context_seq: int,
    bucket_seq: int,
) -> None:
    prompts = [prompt(n, seed=100 + n) for n in lengths]
    chosen = spy_buckets(llama, monkeypatch)
    ours = llama.generate(prompts, max_new_tokens=32)
    assert list(dict.fromkeys(chosen)) == [
        ("context_encoding", Bucket(2, context_seq)),
        ("token_generation", Bucket(2, bucket_seq)),
    ]
    assert ours.shape == (2, 32)
    for row, ids in enumerate(prompts):
        np.testing.assert_array_equal(ours[row], eager_greedy(ids, 32), err_msg=f"row {row}")


def test_seeded_sampling_is_reproducible(llama: Any) -> None:
    ids = [prompt(7, 1), prompt(12, 2)]
    options = dict(max_new_tokens=24, do_sample=True, top_k=50, top_p=0.9, temperature=0.8)
    first = llama.generate(ids, seed=123, **options)
    again = llama.generate(ids, seed=123, **options)
    other = llama.generate(ids, seed=124, **options)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert first.shape == (2, 24) and ((first >= 0) & (first < 256)).all()
    # top_k=1 keeps only the argmax: sampling degenerates to greedy whatever the seed.
    greedy = llama.generate(ids, max_new_tokens=24)
    top1 = llama.generate(ids, max_new_tokens=24, do_sample=True, top_k=1, seed=7)
    np.testing.assert_array_equal(top1, greedy)


@pytest.mark.parametrize(
    "sampling", [{}, {"do_sample": True, "top_p": 0.8, "seed": 5}], ids=["greedy", "sampled"]
)
def test_generate_stream_yields_the_same_tokens(llama: Any, sampling: dict[str, Any]) -> None:
    ids = [prompt(9, 3), prompt(30, 4)]
    whole = llama.generate(ids, max_new_tokens=16, **sampling)
    steps = list(llama.generate_stream(ids, max_new_tokens=16, **sampling))
    assert len(steps) == 16 and all(s.shape == (2,) for s in steps)
    np.testing.assert_array_equal(np.stack(steps, axis=1), whole)


def test_eos_stops_a_row_and_pads_the_rest(llama: Any) -> None:
    ids = [prompt(7, 7), prompt(11, 8)]
    greedy = llama.generate(ids, max_new_tokens=16)
    eos = int(greedy[0, 3])
    first = int(np.flatnonzero(greedy[0] == eos)[0])
    assert eos not in greedy[1]  # only row 0 stops
    single = llama.generate([ids[0]], max_new_tokens=16, eos_token_id=eos)
    np.testing.assert_array_equal(single[0], greedy[0, : first + 1])  # stops at EOS
    both = llama.generate(ids, max_new_tokens=16, eos_token_id=eos)
    np.testing.assert_array_equal(both[1], greedy[1])
    np.testing.assert_array_equal(both[0, : first + 1], greedy[0, : first + 1])
    assert (both[0, first + 1 :] == llama.pad_token_id).all()


# -- 3. pulling, resuming, offline, corruption, pruning ---------------------------------------
def test_pull_fetches_only_what_the_target_needs(minilm_store: Path, tmp_path: Path) -> None:
    cache = cache_for(tmp_path)
    digest, release = release_of(minilm_store, MINILM_REF)
    needed = needed_digests(release)
    report = pull_json(MINILM_REF, minilm_store, cache)
    assert report["digest"] == str(digest) and report["target"] == "cpu"
    assert report["blobs"] == len(needed) + 1 and report["fetched"] == len(needed)
    assert report["bytes_fetched"] == sum(
        r.size for r in (*release.source.weights, *release.source.files)
    ) + sum(g.executable.size for g in release.graphs)
    cached = cached_digests(cache)
    assert cached == needed | {str(digest)}
    assert not cached & build_only_digests(release)  # no HLO, no compile logs
    assert verify_cache(cache) == len(needed) + 1

    again = pull_json(MINILM_REF, minilm_store, cache)
    assert again["fetched"] == 0 and again["bytes_fetched"] == 0
    assert again["cached"] == len(needed)


def test_pull_resumes_after_blobs_went_missing(minilm_store: Path, tmp_path: Path) -> None:
    cache = cache_for(tmp_path)
    _, release = release_of(minilm_store, MINILM_REF)
    pull_json(MINILM_REF, minilm_store, cache)
    lost = [release.source.weights[0].digest, release.graphs[0].executable.digest]
    for digest in lost:
        blob_path(cache, digest).unlink()
    report = pull_json(MINILM_REF, minilm_store, cache)
    assert report["fetched"] == 2 < report["blobs"]
    assert (
        report["bytes_fetched"]
        == release.source.weights[0].size + release.graphs[0].executable.size
    )
    assert verify_cache(cache) == report["blobs"]


def test_pull_from_a_local_store_links_its_blobs(llama_store: Path, tmp_path: Path) -> None:
    """On the cache's filesystem a pull hard-links the store's blob files (verified, never
    copied); a blob corrupted in the store is refused and leaves nothing behind."""
    store = copy_store(llama_store, tmp_path / "store")
    digest, release = release_of(store, LLAMA_REF)
    cache = cache_for(tmp_path)
    report = pull_json(LLAMA_REF, store, cache)
    assert report["fetched"] == len(needed_digests(release))
    store_backend = LocalCache(store).backend  # the same blob layout as a store
    for blob in needed_digests(release) | {str(digest)}:
        cached, stored = blob_path(cache, blob).stat(), store_backend.path_of(Digest.parse(blob))
        assert cached.st_ino == stored.stat().st_ino, blob
    model = runtime_loader.load(LLAMA_REF, store=store, cache_dir=cache)
    expected = runtime_loader.load(LLAMA_REF, store=llama_store, cache_dir=tmp_path / "copied")
    ids = prompt(9, seed=3)
    np.testing.assert_array_equal(
        model.generate([ids], max_new_tokens=6), expected.generate([ids], max_new_tokens=6)
    )

    weights = release.source.weights[0].digest
    bad_store = copy_store(llama_store, tmp_path / "bad-store")
    weights_file = store_backend.path_of(weights)
    bad_file = bad_store / weights_file.relative_to(store)
    data = bytearray(bad_file.read_bytes())
    data[len(data) // 2] ^= 1
    bad_file.unlink()  # a new file: the other stores' links keep the good bytes
    bad_file.write_bytes(bytes(data))
    bad_cache = cache_for(tmp_path, "bad-cache")
    proc = kiln("pull", LLAMA_REF, "--store", bad_store, "--cache-dir", bad_cache)
    assert proc.returncode != 0 and str(weights) in proc.stderr
    assert str(weights) not in cached_digests(bad_cache)
    assert not list((bad_cache / "tmp").iterdir())


def _pull_process(ref: str, store: Path, cache: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "kiln", "pull", ref, "--store", str(store)]
        + ["--cache-dir", str(cache), "--json"],
        cwd=REPO,
        env=kiln_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(condition: Any, proc: subprocess.Popen[str], timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    return False


def test_pull_killed_while_blocked_on_a_blob_resumes(llama_store: Path, tmp_path: Path) -> None:
    """The weights blob of a store copy is a FIFO nobody writes: the pull blocks opening it
    while every other blob lands. SIGKILL, restore the blob, pull again."""
    store = copy_store(llama_store, tmp_path / "store")
    cache = cache_for(tmp_path)
    digest, release = release_of(store, LLAMA_REF)
    weights = release.source.weights[0].digest
    weights_file = store / "blobs" / "sha256" / weights.hex[:2] / weights.hex[2:]
    weights_file.unlink()
    os.mkfifo(weights_file)
    others = needed_digests(release) - {str(weights)}

    proc = _pull_process(LLAMA_REF, store, cache)
    try:
        landed = _wait_for(lambda: others | {str(digest)} <= cached_digests(cache), proc)
        assert landed, proc.communicate(timeout=10)
        time.sleep(0.2)
        assert proc.poll() is None  # still blocked on the weights
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert cached_digests(cache) == others | {str(digest)}

    weights_file.unlink()
    os.link(llama_store / weights_file.relative_to(store), weights_file)
    report = pull_json(LLAMA_REF, store, cache)
    assert report["fetched"] == 1 and report["bytes_fetched"] == release.source.weights[0].size
    assert report["cached"] == len(others) and report["blobs"] == len(others) + 2
    assert verify_cache(cache) == report["blobs"]
    model = runtime_loader.load(LLAMA_REF, cache_dir=cache, offline=True)
    assert model.generate([[5, 6, 7]], max_new_tokens=3).shape == (1, 3)


def test_pull_sigkilled_mid_weights_resumes(minilm_store: Path, tmp_path: Path) -> None:
    """A real interruption: SIGKILL while the 90 MB weights blob is being written."""
    _, release = release_of(minilm_store, MINILM_REF)
    needed = needed_digests(release)
    weights = str(release.source.weights[0].digest)
    biggest_other = max(g.executable.size for g in release.graphs)
    biggest_other = max([biggest_other, *(f.size for f in release.source.files)])

    def weights_partly_written(cache: Path) -> bool:
        temps = list((cache / "tmp").glob("*.incomplete")) if (cache / "tmp").is_dir() else []
        sizes = []
        for temp in temps:
            try:
                sizes.append(temp.stat().st_size)
            except FileNotFoundError:
                pass
        return any(size > biggest_other for size in sizes)  # only the weights get this big

    for attempt in range(3):
        cache = cache_for(tmp_path, f"cache{attempt}")
        proc = _pull_process(MINILM_REF, minilm_store, cache)
        try:
            caught = _wait_for(lambda c=cache: weights_partly_written(c), proc)
            if caught:
                proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        if caught and proc.returncode == -signal.SIGKILL:
            break
    else:
        pytest.skip("the pull always finished before it could be interrupted")

    at_kill = cached_digests(cache)
    assert weights not in at_kill
    assert list((cache / "tmp").glob("*.incomplete"))  # the abandoned partial write
    verify_cache(cache)  # whatever landed is whole
    report = pull_json(MINILM_REF, minilm_store, cache)
    assert report["fetched"] == len(needed - at_kill) >= 1
    assert report["fetched"] < report["blobs"]
    assert report["cached"] == len(needed & at_kill)
    assert verify_cache(cache) == report["blobs"]


def test_offline_load_uses_only_the_cache(
    minilm: Any, minilm_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = shutil.copytree(minilm_cache, tmp_path / "cache")
    nowhere = tmp_path / "no-store"  # offline never opens a store
    expected = minilm.encode([SHORT])
    model = runtime_loader.load(MINILM_REF, store=nowhere, cache_dir=cache, offline=True)
    np.testing.assert_array_equal(model.encode([SHORT]), expected)
    assert model.digest == minilm.digest

    monkeypatch.setenv("KILN_OFFLINE", "1")
    model = runtime_loader.load(MINILM_REF, store=nowhere, cache_dir=cache)
    np.testing.assert_array_equal(model.encode([SHORT]), expected)
    by_digest = runtime_loader.load(f"minilm@{minilm.digest}", cache_dir=cache)
    assert by_digest.digest == minilm.digest
    assert not nowhere.exists()


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_offline_names_exactly_the_missing_blobs(
    minilm_store: Path,
    minilm_cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    how: str,
) -> None:
    cache = shutil.copytree(minilm_cache, tmp_path / "cache")
    _, release = release_of(minilm_store, MINILM_REF)
    lost = {str(release.graphs[-1].executable.digest), str(release.source.files[0].digest)}
    for digest in lost:
        blob_path(cache, digest).unlink()
    kwargs: dict[str, Any] = {"offline": True}
    if how == "environment":
        monkeypatch.setenv("KILN_OFFLINE", "1")
        kwargs = {}
    with pytest.raises(MissingFromCache) as info:
        runtime_loader.load(MINILM_REF, store=minilm_store, cache_dir=cache, **kwargs)
    assert set(info.value.missing) == lost
    assert all(d in str(info.value) for d in lost)
    assert "2 blob(s)" in str(info.value)
    assert cached_digests(cache).isdisjoint(lost)  # nothing was fetched

    with pytest.raises(MissingFromCache, match="never pulled"):
        runtime_loader.load("tiny-llama:latest", cache_dir=cache, offline=True)


def test_corrupt_cached_weights_detected_and_healed(
    minilm: Any, minilm_store: Path, minilm_cache: Path, tmp_path: Path
) -> None:
    cache = shutil.copytree(minilm_cache, tmp_path / "cache")
    weights = minilm.release.source.weights[0].digest
    path = blob_path(cache, weights)
    flip_byte(path)
    assert sha256_file(path) != str(weights)

    with pytest.raises(CorruptCachedBlob) as info:
        runtime_loader.load(MINILM_REF, cache_dir=cache, offline=True)
    assert str(weights) in str(info.value)
    assert sha256_file(path) != str(weights)  # offline: left as it was

    model = runtime_loader.load(MINILM_REF, store=minilm_store, cache_dir=cache)
    assert sha256_file(path) == str(weights)  # healed from the store
    assert oct(path.stat().st_mode & 0o777) == oct(0o444)
    np.testing.assert_array_equal(model.encode([SHORT]), minilm.encode([SHORT]))
    assert verify_cache(cache) == len(needed_digests(minilm.release)) + 1


def test_corrupt_cached_executable_detected_when_used_and_healed(
    minilm: Any, minilm_store: Path, minilm_cache: Path, tmp_path: Path
) -> None:
    cache = shutil.copytree(minilm_cache, tmp_path / "cache")
    graph = minilm.graphs[("encode", 1, 32)]
    path = blob_path(cache, graph.executable.digest)
    flip_byte(path, offset=100)

    offline = runtime_loader.load(MINILM_REF, cache_dir=cache, offline=True)
    with pytest.raises(CorruptCachedBlob, match=str(graph.executable.digest)):
        offline.encode([SHORT])  # executables load lazily: detected on first use

    online = runtime_loader.load(MINILM_REF, store=minilm_store, cache_dir=cache)
    np.testing.assert_array_equal(online.encode([SHORT]), minilm.encode([SHORT]))
    assert sha256_file(path) == str(graph.executable.digest)


def test_corrupt_cached_manifest_healed_online(
    minilm: Any, minilm_store: Path, minilm_cache: Path, tmp_path: Path
) -> None:
    cache = shutil.copytree(minilm_cache, tmp_path / "cache")
    path = blob_path(cache, minilm.digest)
    flip_byte(path, offset=10)
    with pytest.raises(CorruptCachedBlob, match=str(minilm.digest)):
        runtime_loader.load(MINILM_REF, cache_dir=cache, offline=True)
    model = runtime_loader.load(MINILM_REF, store=minilm_store, cache_dir=cache)
    assert model.digest == minilm.digest
    assert sha256_file(path) == str(minilm.digest)


def _set_mtimes(cache: Path, digests: list[str], start: float) -> None:
    for i, digest in enumerate(digests):
        os.utime(blob_path(cache, digest), (start + i, start + i))


def test_prune_removes_least_recently_used_first(
    minilm_store: Path, llama_store: Path, tmp_path: Path
) -> None:
    cache = cache_for(tmp_path)
    pull_json(MINILM_REF, minilm_store, cache)
    pull_json(LLAMA_REF, llama_store, cache)
    llama_digest, llama_release = release_of(llama_store, LLAMA_REF)
    llama_blobs = needed_digests(llama_release) | {str(llama_digest)}
    minilm_blobs = sorted(cached_digests(cache) - llama_blobs)
    now = time.time()
    _set_mtimes(cache, sorted(llama_blobs), now - 20_000)  # all older than minilm's
    _set_mtimes(cache, minilm_blobs, now - 10_000)

    # Using tiny-llama (encoded at 16, decoded at 64) makes exactly the blobs it read the
    # most recent.
    model = runtime_loader.load(LLAMA_REF, store=llama_store, cache_dir=cache)
    model.generate([[4, 5, 6]], max_new_tokens=2)
    used = {str(llama_digest), str(llama_release.source.weights[0].digest)}
    used |= {
        str(g.executable.digest)
        for g in llama_release.graphs
        if (g.kind, g.bucket["batch"], g.bucket["seq"])
        in {("context_encoding", 1, 16), ("token_generation", 1, 64)}
    }
    assert len(used) == 4
    fresh = {b.digest for b in model._cache.blobs() if b.last_used > now - 60}
    assert fresh == used

    sizes = {b.digest: b.size for b in model._cache.blobs()}
    keep = sum(sizes[d] for d in used) + sizes[minilm_blobs[-1]]
    proc = kiln_ok("cache", "prune", "--max-size", str(keep), "--cache-dir", cache, "--json")
    result = json.loads(proc.stdout)
    unused_llama = sorted(llama_blobs - used)
    assert result["removed"] == [*unused_llama, *minilm_blobs[:-1]]  # oldest first
    assert result["bytes"] == sum(sizes[d] for d in result["removed"])
    assert cached_digests(cache) == used | {minilm_blobs[-1]}

    dry = kiln_ok("cache", "prune", "--max-size", "0", "--dry-run", "--cache-dir", cache, "--json")
    assert len(json.loads(dry.stdout)["removed"]) == 5
    assert len(cached_digests(cache)) == 5
    # Offline, the pruned release is incomplete: the error names exactly what was pruned.
    with pytest.raises(MissingFromCache) as info:
        runtime_loader.load(LLAMA_REF, cache_dir=cache, offline=True)
    assert set(info.value.missing) == set(unused_llama)


# -- 4. light by design -------------------------------------------------------------------------
def test_importing_the_loader_is_light() -> None:
    code = "import runtime_loader, runtime_loader.api, runtime_loader.cli"
    proc = python("-X", "importtime", "-c", code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    modules = top_level(imported_modules(proc.stderr))
    assert "runtime_loader" in modules
    assert modules.isdisjoint({*HEAVY, "jaxlib", "pipeline"}), modules & {*HEAVY, "jaxlib"}


def test_kiln_pull_is_light(minilm_store: Path, tmp_path: Path) -> None:
    proc = kiln_ok(
        "pull",
        MINILM_REF,
        "--store",
        minilm_store,
        "--cache-dir",
        tmp_path / "cache",
        python_flags=("-X", "importtime"),
    )
    modules = top_level(imported_modules(proc.stderr))
    assert "runtime_loader" in modules and "artifacts" in modules
    assert modules.isdisjoint({*HEAVY, "pipeline"}), modules & {*HEAVY, "pipeline"}


LOAD_AND_RUN = """
import json, sys
import runtime_loader
model = runtime_loader.load(sys.argv[1], store=sys.argv[2], cache_dir=sys.argv[3])
if hasattr(model, "encode"):
    model.encode(["hello world"])
else:
    model.generate([[1, 2, 3]], max_new_tokens=4)
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


def test_loading_a_tag_reads_its_ref_object_without_the_index(
    llama_store: Path, tmp_path: Path
) -> None:
    """A tag with a ref object resolves through DeployStore: no SQLAlchemy, no index opened
    (the store's index file is made unreadable to prove it), the same release loaded."""
    proc = python("-c", LOAD_AND_RUN, LLAMA_REF, llama_store, tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    modules = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert "sqlalchemy" not in modules
    assert "artifacts" in modules and "jaxlib" in modules

    store = copy_store(llama_store, tmp_path / "store")
    (store / "index.db").write_bytes(b"not a database")
    model = runtime_loader.load(LLAMA_REF, store=store, cache_dir=tmp_path / "cache2")
    assert str(model.digest) == str(release_of(llama_store, LLAMA_REF)[0])
    # A digest prefix is not a ref object: it still goes through Store (and its index).
    prefix = str(model.digest).removeprefix("sha256:")[:12]
    by_prefix = runtime_loader.load(prefix, store=llama_store, cache_dir=tmp_path / "cache3")
    assert by_prefix.digest == model.digest


@pytest.mark.parametrize("ref", [MINILM_REF, LLAMA_REF])
def test_running_an_xla_cpu_model_imports_jaxlib_but_not_jax(
    ref: str, minilm_store: Path, llama_store: Path, tmp_path: Path
) -> None:
    store = minilm_store if ref == MINILM_REF else llama_store
    proc = python("-c", LOAD_AND_RUN, ref, store, tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    modules = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert "jaxlib" in modules
    assert modules.isdisjoint({*HEAVY, "pipeline"}), modules & {*HEAVY, "pipeline"}
