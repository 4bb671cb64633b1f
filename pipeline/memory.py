"""A plan-time lower bound on the memory one graph needs, from the model config's shapes.

Counted: the weights, the graph's inputs and outputs (token ids, masks, every layer's KV
cache) and its largest intermediate (attention scores or the MLP's hidden layer, with one
hidden state beside it). Not counted: the framework, fusion buffers, tracing copies. So the
estimate is what running the graph needs at least: a bucket whose estimate exceeds the
machine's memory cannot work, and is refused before anything is traced (a worker killed by
the kernel's OOM killer only says "process pool was terminated abruptly").

No torch here: the numbers come from the config JSON (`pipeline.sources.raw_config`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from artifacts.table import human_size
from pipeline.errors import MemoryEstimateError
from pipeline.spec import Bucket, ModelSpec

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
INT64 = 8



@dataclass(frozen=True)
class Shapes:
    """The config numbers the estimate uses (absent fields count as 0: a smaller bound)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Shapes:
        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else None
        c = text or config
        hidden = _int(c, "hidden_size", "n_embd", "d_model")
        heads = _int(c, "num_attention_heads", "n_head", "num_heads") or 1
        return cls(
            hidden=hidden,
            layers=_int(c, "num_hidden_layers", "n_layer", "num_layers"),
            heads=heads,
            kv_heads=_int(c, "num_key_value_heads") or heads,
            head_dim=_int(c, "head_dim") or hidden // heads,
            intermediate=_int(c, "intermediate_size", "n_inner", "ffn_dim") or 4 * hidden,
            vocab=_int(c, "vocab_size"),
            tied=bool(c.get("tie_word_embeddings", True)),
        )

    @property
    def weight_count(self) -> int:
        attention = 2 * self.hidden * self.heads * self.head_dim
        attention += 2 * self.hidden * self.kv_heads * self.head_dim
        mlp = 2 * self.hidden * self.intermediate
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * (attention + mlp) + embeddings


@dataclass(frozen=True)
class GraphMemory:
    """Bytes one graph needs at least, by kind of buffer."""

    weights: int
    inputs: int
    outputs: int
    activations: int

    @property
    def total(self) -> int:
        """To run the graph (on the CPU, for target cpu)."""
        return self.weights + self.inputs + self.outputs + self.activations

    @property
    def trace(self) -> int:
        """To trace it: tracing holds the weights and the example inputs, nothing lazy."""
        return self.weights + self.inputs


def estimate_graph(
    config: dict[str, Any], task: str, graph_kind: str, bucket: Bucket, dtype: str
) -> GraphMemory:
    """The lower bound for one graph of `task` ("encoder" | "causal-lm") at `bucket`."""
    s = Shapes.from_config(config)
    width = DTYPE_BYTES.get(dtype, 4)
    b, q = bucket.batch, bucket.seq
    weights = s.weight_count * width
    if graph_kind == "token_generation":
        tokens, keys = b, q  # one new token per row, attending to the whole cache
    else:
        tokens, keys = b * q, q
    attention = b * s.heads * (tokens // b) * keys * width
    mlp = tokens * s.intermediate * width * (2 if task == "causal-lm" else 1)
    activations = tokens * s.hidden * width + max(attention, mlp)
    if task == "causal-lm":
        kv = 2 * s.layers * b * s.kv_heads * q * s.head_dim * width
        logits = b * s.vocab * width
        if graph_kind == "token_generation":
            return GraphMemory(weights, 2 * b * INT64 + kv, logits + kv, activations)
        return GraphMemory(weights, 2 * tokens * INT64, logits + kv, activations)
    return GraphMemory(weights, 2 * tokens * INT64, tokens * s.hidden * width, activations)


def host_memory_bytes() -> int | None:
    """This machine's memory, capped by a cgroup (container) limit; None if unknown."""
    limits = []
    try:
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = Path(path).read_text().strip()
        except OSError:
            continue
        if raw.isdigit() and int(raw) < 1 << 60:
            limits.append(int(raw))
    return min(limits) if limits else None


def check_model(model: ModelSpec, config: dict[str, Any], limit: int | None) -> None:
    """Raise MemoryEstimateError for the first graph of `model` whose estimate exceeds
    `limit` bytes (None: no limit). Graphs for target cpu run here: all of `total` counts;
    for Neuron targets only what tracing holds here (`trace`)."""
    if limit is None:
        return

    runs_here = "cpu" in model.targets
    for kind, bucket in model.graph_buckets():
        need = estimate_graph(config, model.task, kind, bucket, model.dtype)
        bound = need.total if runs_here else need.trace
        if bound > limit:
            parts = f"inputs {human_size(need.inputs)}, weights {human_size(need.weights)}"
            if runs_here:
                parts += (
                    f", outputs {human_size(need.outputs)},"
                    f" activations {human_size(need.activations)}"
                )
            raise MemoryEstimateError(
                f"model {model.name}, graph {kind}, bucket {bucket.label}: needs at least"
                f" {human_size(bound)} of memory ({parts}), more than the"
                f" {human_size(limit)} this machine has; use a smaller bucket"
            )


def _int(config: dict[str, Any], *names: str) -> int:
    for name in names:
        value = config.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 0
