"""Next-token choice on the host with numpy: greedy, or temperature / top-k / top-p sampling.

`temperature=0` means greedy decoding even with `do_sample` (the limit of sampling as the
temperature falls, and what OpenAI-style APIs do), instead of dividing by zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime_loader.errors import BadInput
from runtime_loader.inputs import is_int, option, real


@dataclass(frozen=True)
class SamplingConfig:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        """BadInput (a ValueError) naming the option, for values sampling cannot use."""
        if real(self.temperature, "temperature") < 0:
            raise BadInput(
                f"{option('temperature')} must be >= 0 (0 means greedy), got {self.temperature}"
            )
        if self.top_k is not None and (not is_int(self.top_k) or self.top_k < 1):
            raise BadInput(f"{option('top_k')} must be an integer >= 1, got {self.top_k!r}")
        if self.top_p is not None and not 0 < real(self.top_p, "top_p") <= 1:
            raise BadInput(f"{option('top_p')} must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


def next_tokens(logits: np.ndarray, config: SamplingConfig, rng: np.random.Generator) -> np.ndarray:
    """One token per row of `logits` [B, V]."""
    if config.greedy:
        return logits.argmax(axis=-1)
    scores = logits.astype(np.float64) / config.temperature
    if config.top_k is not None and config.top_k < scores.shape[-1]:
        kth = np.partition(scores, -config.top_k, axis=-1)[:, -config.top_k][:, None]
        scores = np.where(scores < kth, -np.inf, scores)
    scores = scores - scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    if config.top_p is not None and config.top_p < 1:
        order = np.argsort(-probs, axis=-1)
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        cumulative = np.cumsum(sorted_probs, axis=-1)
        drop_sorted = cumulative - sorted_probs >= config.top_p  # keep the token crossing top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        probs = np.where(drop, 0.0, probs)
        probs /= probs.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(probs.shape[-1], p=row) for row in probs])
