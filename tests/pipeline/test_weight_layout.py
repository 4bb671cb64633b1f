"""Linears read their weights in place (pipeline.layout): no per-call weight transposes or
copies remain in the optimized xla-cpu HLO, weights are stored ``[out, in]`` as the
checkpoint holds them (recorded in the signature), and outputs still match eager
transformers on an unconverted copy of the model."""

from __future__ import annotations

import copy
import os
import re
from collections import Counter
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
from pipeline.layout import NATURAL, use_in_place_dots  # noqa: E402
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


@pytest.mark.parametrize(
    "kind,batch", [("context_encoding", 3), ("token_generation", 3), ("token_generation", 1)]
)
def test_decoder_graphs_read_every_weight_in_place(kind: str, batch: int, tmp_path: Path) -> None:
    seq = 16
    model = build_model_from_config(tiny_llama_config(), seed=0)
    module, inputs, outputs = build_causal_lm_graphs(model, batch, seq)[kind]
    traced = trace_graph(module, inputs, outputs)
    exe = _compile(traced, tmp_path)

    assert _weight_moves(traced, exe) == {}
    weights = [p for p in traced.signature.parameters if p.kind == "weight"]
    assert {p.layout for p in weights} == {NATURAL}
    gate = next(p for p in weights if p.name.endswith("0.mlp.gate_proj.weight"))
    assert gate.shape == (128, 64)  # [out=intermediate, in=hidden], as the checkpoint has it
    # Each Linear is one dot contracting the weight's own input dimension. For one row the
    # weight is the right operand (XLA CPU's row-major matrix-vector product: [1, out]); for
    # several it is the left one ([out, rows]: YNNPACK reads it in place, see layout._fenced).
    # Context encoding runs the lm_head on each sequence's last position only.
    rows = batch * seq if kind == "context_encoding" else batch
    expected = []
    for name, linear in module.named_modules():
        if isinstance(linear, torch.nn.Linear):
            n = batch if name.endswith("lm_head") else rows
            expected.append((linear.out_features, n) if n > 1 else (1, linear.out_features))
    dots = [
        line for line in exe.optimized_hlo().splitlines()
        if " dot(" in line and "batch_dims" not in line
    ]
    assert all("rhs_contracting_dims={1}" in d for d in dots)
    shapes = [tuple(map(int, re.search(r"f32\[(\d+),(\d+)\]", d).groups())) for d in dots]
    assert Counter(shapes) == Counter(expected)


def test_untransformed_trace_is_caught_by_the_hlo_check(tmp_path: Path) -> None:
    """The check above can fail: tracing torch's own Linear leaves a transpose per weight."""
    from pipeline.graphs.causal_lm import TokenGenerationGraph

    model = build_model_from_config(tiny_llama_config(), seed=0)
    reference = build_causal_lm_graphs(copy.deepcopy(model), 1, 16)["token_generation"]
    traced = trace_graph(TokenGenerationGraph(model), reference[1], reference[2])
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
@pytest.mark.parametrize("batch,seq", [(1, 1), (2, 8), (2, 80)])
def test_half_precision_linears_keep_the_function(dtype: torch.dtype, batch: int, seq: int) -> None:
    """Half-precision Linears run as a fused multiply-reduce over one row or up to
    HALF_REDUCE_MAX_ROWS rows, and as dots over blocks of HALF_DOT_ROWS output rows beyond
    (a wide lm_head); the logits stay the model's either way."""
    from pipeline.layout import HALF_DOT_ROWS, HALF_REDUCE_MAX_ROWS

    config = tiny_llama_config(vocab_size=2 * HALF_DOT_ROWS + 100)
    original = build_model_from_config(config, seed=2).to(dtype)
    model = converted_copy(original)
    seed = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=seed)
    assert (batch * seq > HALF_REDUCE_MAX_ROWS) == (seq == 80)
    with torch.no_grad():
        want, got = original(ids).logits, model(ids).logits
    assert got.shape == want.shape == (batch, seq, config.vocab_size)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def converted_copy(model: torch.nn.Module) -> torch.nn.Module:
    converted = copy.deepcopy(model)
    use_in_place_dots(converted)
    return converted


def test_conversion_keeps_weights_ties_and_the_function() -> None:
    """Converting changes how Linears compute, not what they hold: every weight is the same
    tensor (no copy), a tied lm_head stays tied, converting twice is converting once, and the
    logits are the unconverted model's."""
    original = build_model_from_config(tiny_llama_config(tie_word_embeddings=True), seed=1)
    model = copy.deepcopy(original)
    before = {name: t.data_ptr() for name, t in model.state_dict().items()}
    use_in_place_dots(model)
    cls = type(model.model.layers[0].self_attn.q_proj)
    use_in_place_dots(model)
    assert type(model.model.layers[0].self_attn.q_proj) is cls
    assert {name: t.data_ptr() for name, t in model.state_dict().items()} == before
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits)


def test_stored_weights_are_the_checkpoint_tensors(tmp_path: Path) -> None:
    """Every weight parameter of a traced graph has its checkpoint shape: nothing is
    transposed on the way into the store."""
    model = build_model_from_config(tiny_llama_config(), seed=0)
    named = [*model.named_parameters(), *model.named_buffers()]
    shapes = {name: tuple(t.shape) for name, t in named}
    module, inputs, outputs = build_causal_lm_graphs(model, 1, 8)["token_generation"]
    parameters = trace_graph(module, inputs, outputs).signature.parameters
    weights = [p for p in parameters if p.kind == "weight"]
    assert weights and all(p.shape == shapes[p.name.removeprefix("model.")] for p in weights)


def test_layout_round_trips_through_signature_json() -> None:
    model = build_model_from_config(tiny_llama_config(), seed=0)
    module, inputs, outputs = build_causal_lm_graphs(model, 1, 8)["token_generation"]
    signature = trace_graph(module, inputs, outputs).signature
    data = signature.to_json()
    weights = [p for p in data["parameters"] if p["kind"] == "weight"]
    assert {p["layout"] for p in weights} == {NATURAL}
    assert all("layout" not in p for p in data["parameters"] if p["kind"] == "input")
    assert Signature.from_json(data) == signature
    legacy = {**data, "parameters": [{k: v for k, v in p.items() if k != "layout"}
                                     for p in data["parameters"]]}
    assert {p.layout for p in Signature.from_json(legacy).parameters} == {NATURAL}
    # graph builder 2 recorded transposed weights; such signatures still read back
    builder2 = {**data, "parameters": [{**p, "layout": "transposed"} if p["kind"] == "weight"
                                       else p for p in data["parameters"]]}
    assert Signature.from_json(builder2).to_json() == builder2


def test_fine_tunes_share_the_traced_graph() -> None:
    digests = set()
    for seed in (0, 1):
        model = build_model_from_config(tiny_llama_config(), seed=seed)
        module, inputs, outputs = build_causal_lm_graphs(model, 1, 8)["token_generation"]
        digests.add(trace_graph(module, inputs, outputs).hlo_proto)
    assert len(digests) == 1
