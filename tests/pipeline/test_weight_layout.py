"""Stored weight layouts (pipeline.layout): no per-call weight transposes or copies remain in
the optimized xla-cpu HLO, the layout is recorded in the signature, and outputs still match
eager transformers on an unconverted copy of the model."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch_xla")
pytest.importorskip("jaxlib")

import torch  # noqa: E402

from pipeline.compile import get_compiler  # noqa: E402
from pipeline.graphs.causal_lm import (  # noqa: E402
    build_causal_lm_graphs,
    build_model_from_config,
    tiny_llama_config,
)
from pipeline.graphs.encoder import build_encoder_graph  # noqa: E402
from pipeline.layout import (  # noqa: E402
    NATURAL,
    TRANSPOSED,
    apply_layouts,
    decide_layouts,
    stored_layouts,
    stored_tensor,
)
from pipeline.signature import Signature  # noqa: E402
from pipeline.trace import TracedGraph, trace_graph  # noqa: E402
from runtime_loader.executors.xla_cpu import DeviceBuffers, XlaCpuExecutable  # noqa: E402
from tests.helpers.hlo_helpers import moved_parameters  # noqa: E402
from tests.helpers.model_helpers import eager, hlo_args, random_inputs, tiny_bert, upload_weights  # noqa: E402

os.environ.setdefault("PJRT_DEVICE", "CPU")


def _compile(traced: TracedGraph, tmp_path: Path) -> XlaCpuExecutable:
    result = get_compiler("xla-cpu").compile(traced.hlo_proto, "cpu", (), tmp_path, 300)
    return XlaCpuExecutable.load(result.executable)


def _weight_moves(traced: TracedGraph, exe: XlaCpuExecutable) -> dict[str, list[str]]:
    weights = {p.index: p.name for p in traced.signature.parameters if p.kind == "weight"}
    moved = moved_parameters(exe.optimized_hlo(), sorted(weights))
    return {weights[i]: hits for i, hits in moved.items() if hits}


@pytest.mark.parametrize("kind", ["context_encoding", "token_generation"])
def test_decoder_graphs_read_every_weight_in_place(kind: str, tmp_path: Path) -> None:
    model = build_model_from_config(tiny_llama_config(), seed=0)
    module, inputs, outputs = build_causal_lm_graphs(model, 2, 16)[kind]
    traced = trace_graph(module, inputs, outputs)
    exe = _compile(traced, tmp_path)

    assert _weight_moves(traced, exe) == {}
    layouts = {p.name: p.layout for p in traced.signature.parameters if p.kind == "weight"}
    linear = {n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {n for n, lay in layouts.items() if lay == TRANSPOSED} == {f"{n}.weight" for n in linear}
    q = next(p for p in traced.signature.parameters if p.name.endswith("0.self_attn.q_proj.weight"))
    assert q.shape == (64, 64) and q.layout == TRANSPOSED
    gate = next(p for p in traced.signature.parameters if p.name.endswith("0.mlp.gate_proj.weight"))
    assert gate.shape == (64, 128)  # [in=hidden, out=intermediate]


def test_untransformed_trace_is_caught_by_the_hlo_check(tmp_path: Path) -> None:
    """The check above can fail: tracing the torch layout leaves a transpose per Linear."""
    from pipeline.graphs.causal_lm import TokenGenerationGraph

    model = build_model_from_config(tiny_llama_config(), seed=0)
    reference = build_causal_lm_graphs(copy.deepcopy(model), 1, 16)["token_generation"]
    traced = trace_graph(TokenGenerationGraph(model), reference[1], reference[2])
    assert all(p.layout == NATURAL for p in traced.signature.parameters)
    moved = _weight_moves(traced, _compile(traced, tmp_path))
    assert any(name.endswith("q_proj.weight") for name in moved)


def test_encoder_reads_every_weight_in_place_and_matches_eager(tmp_path: Path) -> None:
    original = tiny_bert(seed=3)
    module, example, outputs = build_encoder_graph(copy.deepcopy(original), 2, 12)
    traced = trace_graph(module, example, outputs)
    exe = _compile(traced, tmp_path)

    assert _weight_moves(traced, exe) == {}
    inputs = random_inputs(2, 12, vocab=100)
    weights = upload_weights(module, traced, DeviceBuffers())
    got = exe.run(hlo_args(traced, weights, inputs))
    want = eager(build_encoder_graph(original, 2, 12)[0], inputs)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-4)


def test_decoder_graph_with_stored_weights_matches_unconverted_eager(tmp_path: Path) -> None:
    original = build_model_from_config(tiny_llama_config(), seed=0)
    converted = copy.deepcopy(original)
    module, inputs, outputs = build_causal_lm_graphs(converted, 1, 16)["context_encoding"]
    traced = trace_graph(module, inputs, outputs)
    ids = np.array([[5, 9, 200, 17] + [0] * 12], dtype=np.int64)
    mask = (ids != 0).astype(np.int64)
    weights = upload_weights(module, traced, DeviceBuffers())
    got = _compile(traced, tmp_path).run(
        hlo_args(traced, weights, {"input_ids": ids, "attention_mask": mask})
    )
    with torch.no_grad():
        want = original(torch.from_numpy(ids[:, :4])).logits[0, -1].numpy()
    np.testing.assert_allclose(got[0][0], want, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_wide_half_precision_linear_in_column_blocks_keeps_the_function(
    dtype: torch.dtype,
) -> None:
    """A bfloat16/float16 lm_head wider than HALF_DOT_COLUMNS multiplies a block of columns
    at a time (bounding XLA CPU's float32 temporary); the logits stay those of the model."""
    from pipeline.layout import HALF_DOT_COLUMNS

    config = tiny_llama_config(vocab_size=2 * HALF_DOT_COLUMNS + 100)
    original = build_model_from_config(config, seed=2).to(dtype)
    model = apply_layouts_copy(original)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        want, got = original(ids).logits, model(ids).logits
    assert got.shape == want.shape == (1, 8, config.vocab_size)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def apply_layouts_copy(model: torch.nn.Module) -> torch.nn.Module:
    converted = copy.deepcopy(model)
    apply_layouts(converted)
    return converted


def test_tied_lm_head_keeps_its_natural_layout() -> None:
    model = build_model_from_config(tiny_llama_config(tie_word_embeddings=True), seed=0)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    layouts = decide_layouts(model)
    assert "lm_head.weight" not in layouts and "model.embed_tokens.weight" not in layouts
    assert layouts["model.layers.0.self_attn.q_proj.weight"] == TRANSPOSED
    apply_layouts(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert tuple(model.lm_head.weight.shape) == (256, 64)


def test_apply_layouts_is_idempotent_and_keeps_the_function() -> None:
    original = build_model_from_config(tiny_llama_config(), seed=1)
    model = copy.deepcopy(original)
    first = apply_layouts(model)
    q = model.model.layers[0].self_attn.q_proj.weight
    assert apply_layouts(model) == first == stored_layouts(model)
    assert model.model.layers[0].self_attn.q_proj.weight is q  # not transposed twice
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits)


def test_stored_tensor_for_torch_and_numpy() -> None:
    w = torch.arange(6.0).reshape(2, 3)
    t = stored_tensor("w", w, TRANSPOSED)
    assert t.shape == (3, 2) and t.is_contiguous() and torch.equal(t, w.T)
    a = np.arange(6.0).reshape(2, 3)
    n = stored_tensor("w", a, TRANSPOSED)
    assert n.shape == (3, 2) and n.flags.c_contiguous and np.array_equal(n, a.T)
    assert stored_tensor("w", a, NATURAL) is a
    with pytest.raises(ValueError, match="weight b: layout transposed needs a 2-D"):
        stored_tensor("b", np.zeros(3), TRANSPOSED)
    with pytest.raises(ValueError, match="weight w: unknown layout 'sideways'"):
        stored_tensor("w", a, "sideways")


def test_layout_round_trips_through_signature_json() -> None:
    model = build_model_from_config(tiny_llama_config(), seed=0)
    module, inputs, outputs = build_causal_lm_graphs(model, 1, 8)["token_generation"]
    signature = trace_graph(module, inputs, outputs).signature
    data = signature.to_json()
    weights = [p for p in data["parameters"] if p["kind"] == "weight"]
    assert {p["layout"] for p in weights} == {NATURAL, TRANSPOSED}
    assert all("layout" not in p for p in data["parameters"] if p["kind"] == "input")
    assert Signature.from_json(data) == signature
    legacy = {**data, "parameters": [{k: v for k, v in p.items() if k != "layout"}
                                     for p in data["parameters"]]}
    assert {p.layout for p in Signature.from_json(legacy).parameters} == {NATURAL}


def test_fine_tunes_share_the_traced_graph() -> None:
    digests = set()
    for seed in (0, 1):
        model = build_model_from_config(tiny_llama_config(), seed=seed)
        module, inputs, outputs = build_causal_lm_graphs(model, 1, 8)["token_generation"]
        digests.add(trace_graph(module, inputs, outputs).hlo_proto)
    assert len(digests) == 1
