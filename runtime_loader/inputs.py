"""Checks on what a caller hands a loaded model: token ids, attention masks, `.npz` files and
generation options. Each failure is a `BadInput` naming the input, the position and the value.

They run before anything executes, because XLA clamps out-of-range gather indices: an id past
the vocabulary (or negative, or a float cut to an integer) would otherwise give a plausible,
wrong answer instead of an error.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from runtime_loader.errors import BadInput

INT64_LIMIT = 2**63


def vocab_size(config: dict[str, Any]) -> int | None:
    """The model's vocabulary size from its config, or None when the config does not say."""
    value = config.get("vocab_size")
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def _id_range(vocab: int | None) -> str:
    return f"0..{vocab - 1} (a vocabulary of {vocab})" if vocab else f"0..{INT64_LIMIT - 1}"


def token_ids(value: Any, vocab: int | None, name: str = "input_ids") -> np.ndarray:
    """A [batch, seq] array of token ids as int64: integers, every one in the vocabulary."""
    ids = np.asarray(value)
    if ids.dtype.kind not in "iu":
        raise BadInput(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    if ids.ndim != 2:
        raise BadInput(f"{name} must be [batch, seq], got shape {ids.shape}")
    if ids.shape[0] == 0:
        raise BadInput(f"{name} has batch 0 (shape {ids.shape}): give at least one row")
    if ids.shape[1] == 0:
        raise BadInput(f"{name} has sequence length 0 (shape {ids.shape}): give at least one token")
    upper = vocab or INT64_LIMIT
    bad = (ids < 0) | (ids >= upper)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise BadInput(
            f"{name}[{', '.join(map(str, where))}] = {ids[where]} is not a token id:"
            f" expected {_id_range(vocab)}"
        )
    return ids.astype(np.int64, copy=False)


def attention_mask(value: Any, shape: tuple[int, ...], name: str = "attention_mask") -> np.ndarray:
    """A mask of 0s and 1s with the ids' shape, as int64."""
    mask = np.asarray(value)
    if mask.dtype.kind not in "biuf":
        raise BadInput(f"{name} must hold 0 and 1, got dtype {mask.dtype}")
    if mask.shape != shape:
        raise BadInput(f"{name} shape {mask.shape} != input_ids shape {shape}")
    bad = (mask != 0) & (mask != 1)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise BadInput(f"{name}[{', '.join(map(str, where))}] = {mask[where]}: expected 0 or 1")
    return mask.astype(np.int64, copy=False)


def is_int(value: Any) -> bool:
    """An integer that is not a bool (numpy integers included)."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def prompts(value: Any, vocab: int | None, name: str = "input_ids") -> list[list[int]]:
    """Prompts for generation: one row of ids, or several (lists or a numpy array); each row
    non-empty and every id an integer in the vocabulary."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "iu":
            raise BadInput(f"{name} must hold integer token ids, got dtype {value.dtype}")
        if value.ndim not in (1, 2):
            raise BadInput(f"{name} must be [seq] or [batch, seq], got shape {value.shape}")
        rows: list[Any] = [value] if value.ndim == 1 else list(value)
    elif isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise BadInput(f"{name} must be token ids (a list of ints, or of rows), got {value!r}")
    else:
        items = list(value)
        rows = [items] if items and is_int(items[0]) else items
    if not rows:
        raise BadInput(f"{name} holds no prompt: give at least one row of token ids")
    upper = vocab or INT64_LIMIT
    out = []
    for r, row in enumerate(rows):
        if isinstance(row, str | bytes) or not isinstance(row, Iterable):
            raise BadInput(f"{name}[{r}] = {row!r} is not a row of token ids")
        checked = []
        for c, token in enumerate(row):
            if not is_int(token):
                raise BadInput(f"{name}[{r}][{c}] = {token!r} is not an integer token id")
            if not 0 <= int(token) < upper:
                raise BadInput(
                    f"{name}[{r}][{c}] = {int(token)} is not a token id:"
                    f" expected {_id_range(vocab)}"
                )
            checked.append(int(token))
        if not checked:
            raise BadInput(f"{name}[{r}] is empty: every prompt needs at least one token")
        out.append(checked)
    return out


def option(name: str) -> str:
    """`top_k (--top-k)`: the keyword and its command-line flag, for messages."""
    return f"{name} (--{name.replace('_', '-')})"


def generation(
    max_new_tokens: Any, eos_token_id: Any, seed: Any, pad_token_id: Any, vocab: int | None
) -> None:
    """The options of `generate` that are not about sampling (see SamplingConfig for those).
    The pad token only fills finished rows and padding, so it need not be in the vocabulary."""
    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise BadInput(
            f"{option('max_new_tokens')} must be an integer >= 1, got {max_new_tokens!r}"
        )
    if eos_token_id is not None and (
        not is_int(eos_token_id) or not 0 <= eos_token_id < (vocab or INT64_LIMIT)
    ):
        raise BadInput(
            f"{option('eos_token_id')} = {eos_token_id!r} is not a token id:"
            f" expected {_id_range(vocab)}"
        )
    if seed is not None and (not is_int(seed) or seed < 0):
        raise BadInput(f"{option('seed')} must be an integer >= 0, got {seed!r}")
    if pad_token_id is not None and (
        not is_int(pad_token_id) or not -INT64_LIMIT <= pad_token_id < INT64_LIMIT
    ):
        raise BadInput(f"pad_token_id must be an int64 integer, got {pad_token_id!r}")


def real(value: Any, name: str) -> float:
    """A finite float (ints accepted), else BadInput naming the option."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise BadInput(f"{option(name)} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise BadInput(f"{option(name)} must be finite, got {value!r}")
    return number


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an `.npz` file; BadInput naming the file for anything else (a text file,
    a single `.npy` array, a pickle, arrays of Python objects: nothing is unpickled)."""
    try:
        with open(path, "rb") as handle:
            magic = handle.read(6)
        if not magic.startswith((b"PK\x03\x04", b"PK\x05\x06")):
            what = "a single .npy array" if magic == b"\x93NUMPY" else "not a zip file"
            raise BadInput(
                f"{path}: not an .npz archive of named arrays ({what}); make one with"
                " np.savez(path, input_ids=ids, attention_mask=mask)"
            )
        with np.load(path, allow_pickle=False) as loaded:
            return {name: _array(loaded, name, path) for name in loaded.files}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        if isinstance(exc, BadInput):
            raise
        raise BadInput(f"{path}: not a readable .npz file ({exc})") from None


def _array(npz: Any, name: str, path: Path) -> np.ndarray:
    try:
        return np.asarray(npz[name])
    except ValueError:
        raise BadInput(
            f"{path}: array {name!r} holds Python objects (dtype object), which are never"
            " unpickled; save integer arrays instead"
        ) from None
