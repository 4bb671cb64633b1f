"""Encoder inputs the loader must refuse with one line, from `kiln run --input` and from the
library: files that are not an .npz of integer arrays, empty batches, and token ids that XLA
would silently clamp (floats, complex, negative, past the vocabulary, uint64 past int64)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import runtime_loader
from runtime_loader.errors import BadInput, LoaderError
from tests.helpers.cli_helpers import assert_one_line_error_here, kiln_here
from tests.helpers.loader_helpers import MINILM_REF, kiln, pulled_cache
from tests.runtime_loader.test_loader_cli import assert_one_line_error

VOCAB = 30522  # all-MiniLM-L6-v2


@pytest.fixture(scope="module")
def cache(minilm_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pulled_cache(tmp_path_factory, "inputs-cache", (MINILM_REF, minilm_store))


@pytest.fixture(scope="module")
def minilm(minilm_store: Path, cache: Path) -> Any:
    return runtime_loader.load(MINILM_REF, store=minilm_store, cache_dir=cache)


def ids_with(value: Any, dtype: Any = np.int64) -> np.ndarray:
    """A real sentence's ids ([CLS] kiln ... [SEP]) with the third one replaced."""
    ids = np.array([[101, 12849, 2078, 102]], dtype=np.int64).astype(dtype)
    ids[0, 2] = value
    return ids


# (name, arrays for np.savez or raw bytes, fragments the one error line must hold)
BAD_FILES: list[tuple[str, Any, tuple[str, ...]]] = [
    ("string-dtype", {"input_ids": np.array([["a", "b"]])}, ("input_ids", "integer", "<U1")),
    (
        "object-dtype",
        {"input_ids": np.array([[101, None]], dtype=object)},
        ("'input_ids'", "Python objects"),
    ),
    ("batch-0", {"input_ids": np.zeros((0, 4), dtype=np.int64)}, ("input_ids", "batch 0")),
    ("seq-0", {"input_ids": np.zeros((2, 0), dtype=np.int64)}, ("input_ids", "length 0")),
    ("text-file", b"101, 2023, 102\n", ("not an .npz", "not a zip file")),
    ("npy-file", "npy", ("not an .npz", "single .npy array")),
    ("no-input-ids", {"ids": np.ones((1, 3), dtype=np.int64)}, ("needs an input_ids", "ids")),
    ("float", {"input_ids": ids_with(2078.6, np.float64)}, ("input_ids", "float64")),
    ("complex", {"input_ids": ids_with(2078, np.complex128)}, ("input_ids", "complex128")),
    ("negative", {"input_ids": ids_with(-5)}, ("input_ids[0, 2] = -5", f"0..{VOCAB - 1}")),
    ("past-vocab", {"input_ids": ids_with(VOCAB)}, (f"input_ids[0, 2] = {VOCAB}", "vocabulary")),
    (
        "uint64-past-int64",
        {"input_ids": ids_with(2**64 - 1, np.uint64)},
        (f"input_ids[0, 2] = {2**64 - 1}",),
    ),
    (
        "mask-not-0-1",
        {"input_ids": ids_with(2078), "attention_mask": np.array([[1, 1, 2, 1]])},
        ("attention_mask[0, 2] = 2", "0 or 1"),
    ),
    (
        "mask-shape",
        {"input_ids": ids_with(2078), "attention_mask": np.ones((1, 3), dtype=np.int64)},
        ("attention_mask shape (1, 3)",),
    ),
]


def write_input(path: Path, content: Any) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "npy":
        with open(path, "wb") as handle:  # np.save would append .npy to the name
            np.save(handle, ids_with(2078))
    else:
        np.savez(path, **content)
    return path


@pytest.mark.parametrize(
    ("content", "expected"), [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES]
)
def test_run_input_refuses_with_one_line(
    content: Any,
    expected: tuple[str, ...],
    minilm_store: Path,
    cache: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = write_input(tmp_path / "in.npz", content)
    out = tmp_path / "out.npz"
    result = kiln_here(
        capsys, "run", MINILM_REF, "--input", path, "--output", out,
        "--store", minilm_store, "--cache-dir", cache,
    )  # fmt: skip
    assert_one_line_error_here(result, str(path), *expected)
    assert result.stdout == "" and not out.exists()


@pytest.mark.parametrize("case", ["text-file", "past-vocab"])
def test_run_input_refusal_in_a_fresh_process(
    case: str, minilm_store: Path, cache: Path, tmp_path: Path
) -> None:
    """The whole stderr of a real `kiln run` is the one line."""
    content = next(c[1] for c in BAD_FILES if c[0] == case)
    path = write_input(tmp_path / "in.npz", content)
    proc = kiln("run", MINILM_REF, "--input", path, "--store", minilm_store, "--cache-dir", cache)
    assert_one_line_error(proc, str(path))


LIBRARY_CASES: list[tuple[str, Any, Any, str]] = [
    ("string", np.array([["a", "b"]]), None, "dtype <U1"),
    ("object", np.array([[101, None]], dtype=object), None, "dtype object"),
    ("float", ids_with(2078.6, np.float64), None, "dtype float64"),
    ("complex", ids_with(2078, np.complex64), None, "dtype complex64"),
    ("bool", np.ones((1, 3), dtype=bool), None, "dtype bool"),
    ("batch-0", np.zeros((0, 4), dtype=np.int64), None, "batch 0"),
    ("1-d", np.array([101, 102]), None, "[batch, seq]"),
    ("negative", ids_with(-1, np.int32), None, "input_ids[0, 2] = -1"),
    ("past-vocab", ids_with(VOCAB + 7), None, f"input_ids[0, 2] = {VOCAB + 7}"),
    ("uint64", ids_with(2**63 + 5, np.uint64), None, f"input_ids[0, 2] = {2**63 + 5}"),
    ("float-mask", ids_with(2078), np.array([[1.0, 1.0, 0.5, 1.0]]), "= 0.5: expected 0 or 1"),
    ("string-mask", ids_with(2078), np.array([["1", "1", "1", "1"]]), "attention_mask"),
]


@pytest.mark.parametrize(
    ("ids", "mask", "expected"), [c[1:] for c in LIBRARY_CASES], ids=[c[0] for c in LIBRARY_CASES]
)
def test_model_call_refuses_bad_inputs(minilm: Any, ids: Any, mask: Any, expected: str) -> None:
    with pytest.raises(BadInput) as caught:
        minilm(ids, mask)
    assert expected in str(caught.value)
    assert isinstance(caught.value, LoaderError) and isinstance(caught.value, ValueError)


def test_valid_inputs_of_any_integer_dtype_give_the_int64_answer(minilm: Any) -> None:
    """Small uint64 / int32 ids and a bool mask are fine: the same outputs as int64."""
    ids = ids_with(2078)
    expected = minilm(ids, np.ones_like(ids))["last_hidden_state"]
    for dtype in (np.int32, np.uint16, np.uint64):
        got = minilm(ids.astype(dtype), np.ones(ids.shape, dtype=bool))["last_hidden_state"]
        np.testing.assert_array_equal(got, expected)
