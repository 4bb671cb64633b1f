"""`kiln generate` and CausalLM.generate: options and prompts that used to raise a traceback or
quietly return tokens (ids past the vocabulary, max_new_tokens <= 0) now fail with one line
naming the option; temperature 0 means greedy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import runtime_loader
from runtime_loader.errors import BadInput
from tests.helpers.cli_helpers import assert_one_line_error_here, kiln_here
from tests.helpers.loader_helpers import (
    LLAMA_REF,
    cached_digests,
    kiln,
    kiln_ok,
    pulled_cache,
)
from tests.runtime_loader.test_loader_cli import assert_one_line_error

VOCAB = 256  # tiny-llama


@pytest.fixture(scope="module")
def cache(llama_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pulled_cache(tmp_path_factory, "generate-cache", (LLAMA_REF, llama_store))


@pytest.fixture(scope="module")
def llama(llama_store: Path, cache: Path) -> Any:
    return runtime_loader.load(LLAMA_REF, store=llama_store, cache_dir=cache)


def test_temperature_zero_is_greedy(llama_store: Path, cache: Path, llama: Any) -> None:
    greedy = llama.generate([[1, 2, 3], [9, 8, 7, 6]], max_new_tokens=6)
    for seed in (0, 1):
        sampled = llama.generate(
            [[1, 2, 3], [9, 8, 7, 6]], max_new_tokens=6, do_sample=True, temperature=0, seed=seed
        )
        np.testing.assert_array_equal(sampled, greedy)
    proc = kiln_ok(
        "generate", LLAMA_REF, "--prompt-ids", "1,2,3", "--max-new-tokens", "6", "--do-sample",
        "--temperature", "0", "--top-k", "5", "--seed", "4", "--store", llama_store,
        "--cache-dir", cache,
    )  # fmt: skip
    assert proc.stdout.strip() == ",".join(str(int(t)) for t in greedy[0])


BAD_OPTIONS = [
    (("--temperature", "-1"), "temperature (--temperature) must be >= 0"),
    (("--temperature", "nan"), "temperature (--temperature) must be finite"),
    (("--top-k", "0"), "top_k (--top-k) must be an integer >= 1, got 0"),
    (("--top-k", "-3"), "top_k (--top-k)"),
    (("--top-p", "0"), "top_p (--top-p) must be in (0, 1], got 0.0"),
    (("--top-p", "1.5"), "top_p (--top-p)"),
    (("--max-new-tokens", "0"), "max_new_tokens (--max-new-tokens) must be an integer >= 1"),
    (("--max-new-tokens", "-5"), "got -5"),
    (("--seed", "-1"), "seed (--seed) must be an integer >= 0"),
    (("--eos-token-id", str(VOCAB)), f"eos_token_id (--eos-token-id) = {VOCAB} is not a token"),
]


@pytest.mark.parametrize(
    ("option", "expected"), BAD_OPTIONS, ids=[" ".join(o) for o, _ in BAD_OPTIONS]
)
def test_bad_option_is_one_line(
    option: tuple[str, ...],
    expected: str,
    llama_store: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cache = tmp_path / "cache"
    result = kiln_here(
        capsys, "generate", LLAMA_REF, "--prompt-ids", "1,2", "--do-sample", *option,
        "--store", llama_store, "--cache-dir", cache,
    )  # fmt: skip
    assert_one_line_error_here(result, expected)
    assert result.stdout == ""
    if "eos" not in option[0]:  # refused before anything is pulled (the vocabulary is not needed)
        assert not cache.exists() or cached_digests(cache) == set()


BAD_PROMPTS = [
    ("999999", "--prompt-ids[0][0] = 999999 is not a token id: expected 0..255"),
    (str(VOCAB), f"--prompt-ids[0][0] = {VOCAB} is not a token id"),
    (f"1,2;3,{2**64}", f"--prompt-ids[1][1] = {2**64} is not a token id"),
    (str(2**63), f"= {2**63} is not a token id"),
]


@pytest.mark.parametrize(("ids", "expected"), BAD_PROMPTS, ids=["999999", "vocab", "2^64", "2^63"])
def test_prompt_ids_outside_the_vocabulary(
    ids: str, expected: str, llama_store: Path, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = kiln_here(
        capsys, "generate", LLAMA_REF, "--prompt-ids", ids, "--store", llama_store,
        "--cache-dir", cache,
    )  # fmt: skip
    assert_one_line_error_here(result, expected)
    assert result.stdout == ""


def test_refusals_in_a_fresh_process(llama_store: Path, cache: Path) -> None:
    """The whole stderr of a real `kiln generate` is the one line."""
    common = ("--store", llama_store, "--cache-dir", cache)
    proc = kiln("generate", LLAMA_REF, "--prompt-ids", "999999", *common)
    assert_one_line_error(proc, "--prompt-ids[0][0] = 999999")
    proc = kiln("generate", LLAMA_REF, "--prompt-ids", "1", "--max-new-tokens", "0", *common)
    assert_one_line_error(proc, "max_new_tokens (--max-new-tokens)")
    assert proc.stdout == ""


LIBRARY_OPTIONS: list[tuple[dict[str, Any], str]] = [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": -5}, "max_new_tokens"),
    ({"max_new_tokens": 2.5}, "max_new_tokens"),
    ({"do_sample": True, "temperature": -0.5}, "temperature"),
    ({"do_sample": True, "temperature": float("inf")}, "temperature"),
    ({"do_sample": True, "temperature": "hot"}, "temperature"),
    ({"do_sample": True, "top_k": 0}, "top_k"),
    ({"do_sample": True, "top_k": 2.5}, "top_k"),
    ({"do_sample": True, "top_p": 0.0}, "top_p"),
    ({"do_sample": True, "top_p": float("nan")}, "top_p"),
    ({"do_sample": True, "seed": -1}, "seed"),
    ({"eos_token_id": -1}, "eos_token_id"),
    ({"eos_token_id": 10**6}, "eos_token_id"),
    ({"pad_token_id": 2**70}, "pad_token_id"),
]


@pytest.mark.parametrize(
    ("options", "expected"), LIBRARY_OPTIONS, ids=[str(o) for o, _ in LIBRARY_OPTIONS]
)
def test_library_refuses_bad_options(llama: Any, options: dict[str, Any], expected: str) -> None:
    with pytest.raises(BadInput, match=expected):
        llama.generate([[1, 2, 3]], **options)
    with pytest.raises(BadInput, match=expected):
        llama.generate_stream([[1, 2, 3]], **options)  # at the call, not at the first next()


LIBRARY_PROMPTS: list[tuple[str, Any, str]] = [
    ("past-vocab", [[999999]], r"input_ids\[0\]\[0\] = 999999 is not a token id: expected 0\.\."),
    ("past-int64", [1, 2, 2**63], r"input_ids\[0\]\[2\] = 9223372036854775808"),
    ("negative", [[1, 2], [3, -4]], r"input_ids\[1\]\[1\] = -4"),
    ("floats", [1.0, 2.0], "not a row of token ids"),
    ("float-token", [[1, 2.5]], r"input_ids\[0\]\[1\] = 2.5 is not an integer"),
    ("bool-token", [[1, True]], r"input_ids\[0\]\[1\] = True is not an integer"),
    ("empty-row", [[1, 2], []], r"input_ids\[1\] is empty"),
    ("no-rows", [], "holds no prompt"),
    ("string", "1,2", "must be token ids"),
    ("float-array", np.array([[1.0, 2.0]]), "dtype float64"),
    ("uint16-past-vocab", np.array([[1, 300]], dtype=np.uint16), r"input_ids\[0\]\[1\] = 300"),
    ("3-d", np.zeros((1, 2, 3), dtype=np.int64), r"\[seq\] or \[batch, seq\]"),
]


@pytest.mark.parametrize(
    ("prompt", "expected"), [c[1:] for c in LIBRARY_PROMPTS], ids=[c[0] for c in LIBRARY_PROMPTS]
)
def test_library_refuses_bad_prompts(llama: Any, prompt: Any, expected: str) -> None:
    with pytest.raises(BadInput, match=expected):
        llama.generate(prompt, max_new_tokens=2)


def test_valid_prompt_forms_agree(llama: Any) -> None:
    """One row as a list, as a 1-d array of another integer dtype, and as rows: same tokens."""
    expected = llama.generate([[5, 6, 255]], max_new_tokens=3)
    for prompt in ([5, 6, 255], np.array([5, 6, 255], dtype=np.uint8), np.array([[5, 6, 255]])):
        np.testing.assert_array_equal(llama.generate(prompt, max_new_tokens=3), expected)
