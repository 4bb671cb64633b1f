"""Decoder graphs (context_encoding / token_generation) against transformers' own generate(),
then traced to HLO on torch-xla's CPU device."""

from __future__ import annotations

import os

import pytest
import torch

from pipeline.graphs.causal_lm import (
    ContextEncodingGraph,
    TokenGenerationGraph,
    build_causal_lm_graphs,
    build_model_from_config,
    kv_cache_shape,
    pad_prompts,
    reference_greedy,
    tiny_llama_config,
)

os.environ.setdefault("PJRT_DEVICE", "CPU")

NEW_TOKENS = 32


def _prompts(lengths: list[int], seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 256, (n,), generator=gen).tolist() for n in lengths]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_model_from_config(tiny_llama_config(), seed=0)


@pytest.mark.parametrize(
    ("seq", "lengths"),
    [(64, [7]), (128, [50]), (64, [7, 30]), (128, [7, 50]), (128, [50, 7, 1])],
)
def test_greedy_matches_generate(model: torch.nn.Module, seq: int, lengths: list[int]) -> None:
    graphs = build_causal_lm_graphs(model, len(lengths), seq)
    context = graphs["context_encoding"][0]
    token_gen = graphs["token_generation"][0]
    prompts = _prompts(lengths)

    got = reference_greedy(context, token_gen, prompts, seq, NEW_TOKENS)

    assert got.shape == (len(lengths), NEW_TOKENS)
    for row, prompt in enumerate(prompts):
        # generate() one row at a time: no padding at all on the reference side.
        ids = torch.tensor([prompt])
        with torch.no_grad():
            want = model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False,
                max_new_tokens=NEW_TOKENS,
            )[0, len(prompt):]
        assert got[row].tolist() == want.tolist(), f"row {row} ({len(prompt)} tokens)"


def test_context_logits_and_cache_match_unpadded_forward(model: torch.nn.Module) -> None:
    seq, prompts = 64, _prompts([7, 30], seed=2)
    context = ContextEncodingGraph(model)
    input_ids, attention_mask = pad_prompts(prompts, seq)
    with torch.no_grad():
        logits, *kv = context(input_ids, attention_mask)
        for row, prompt in enumerate(prompts):
            out = model(torch.tensor([prompt]), use_cache=True)
            torch.testing.assert_close(logits[row], out.logits[0, -1], atol=1e-5, rtol=1e-5)
            n = len(prompt)
            for layer in range(len(kv) // 2):
                ref = out.cache.layers[layer]
                torch.testing.assert_close(kv[2 * layer][row, :, :n], ref.keys[0])
                torch.testing.assert_close(kv[2 * layer + 1][row, :, :n], ref.values[0])


def test_token_generation_writes_only_each_rows_position(model: torch.nn.Module) -> None:
    batch, seq = 2, 16
    graphs = build_causal_lm_graphs(model, batch, seq)
    module, example, names = graphs["token_generation"]
    gen = torch.Generator().manual_seed(3)
    past = {n: torch.randn(t.shape, generator=gen) for n, t in example.items() if "past" in n}
    position = torch.tensor([3, 11])
    with torch.no_grad():
        # Keyword call, as tracers make it.
        outs = module(input_ids=torch.tensor([[5], [9]]), position=position, **past)
    for name, new in zip(names[1:], outs[1:], strict=True):
        old = past[name]
        for row, pos in enumerate(position.tolist()):
            changed = (new[row] != old[row]).any(dim=-1).any(dim=0)  # per slot
            assert changed.nonzero().flatten().tolist() == [pos], name


def test_build_causal_lm_graphs_bucket_contract(model: torch.nn.Module) -> None:
    batch, seq = 2, 32
    graphs = build_causal_lm_graphs(model, batch, seq)
    assert list(graphs) == ["context_encoding", "token_generation"]
    kv_names = ["past_key_0", "past_value_0", "past_key_1", "past_value_1"]
    kv_shape = kv_cache_shape(model, batch, seq)
    assert kv_shape == (batch, 2, seq, 16)

    context, ctx_inputs, ctx_names = graphs["context_encoding"]
    assert isinstance(context, ContextEncodingGraph)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in ctx_inputs.items()} == {
        "input_ids": (torch.int64, (batch, seq)),
        "attention_mask": (torch.int64, (batch, seq)),
    }
    assert ctx_names == ["logits", *kv_names]

    token_gen, tg_inputs, tg_names = graphs["token_generation"]
    assert isinstance(token_gen, TokenGenerationGraph)
    assert list(tg_inputs) == ["input_ids", "position", *kv_names]
    assert tg_inputs["input_ids"].shape == (batch, 1) and tg_inputs["position"].shape == (batch,)
    assert all(tg_inputs[n].shape == kv_shape and tg_inputs[n].dtype == torch.float32
               for n in kv_names)
    assert tg_names == ["logits", *kv_names]

    # Deterministic example inputs; outputs match the declared names and shapes.
    again = build_causal_lm_graphs(model, batch, seq)
    for kind, (module, inputs, names) in graphs.items():
        assert all(torch.equal(inputs[k], again[kind][1][k]) for k in inputs)
        with torch.no_grad():
            outs = module(*inputs.values())
        assert len(outs) == len(names)
        assert outs[0].shape == (batch, model.config.vocab_size)
        assert all(t.shape == kv_shape for t in outs[1:])


def test_reference_greedy_rejects_overflowing_bucket(model: torch.nn.Module) -> None:
    graphs = build_causal_lm_graphs(model, 1, 64)
    with pytest.raises(ValueError, match="does not fit"):
        reference_greedy(graphs["context_encoding"][0], graphs["token_generation"][0],
                         _prompts([50]), 64, NEW_TOKENS)


# --- torch-xla --------------------------------------------------------------------------


def _trace_inputs(kind: str, seq: int) -> dict[str, torch.Tensor]:
    """Realistic inputs (two right-padded prompts of different lengths) for one graph."""
    prompts = _prompts([7, 20], seed=4)
    input_ids, attention_mask = pad_prompts(prompts, seq)
    if kind == "context_encoding":
        return {"input_ids": input_ids, "attention_mask": attention_mask}
    gen = torch.Generator().manual_seed(5)
    shape = (2, 2, seq, 16)
    inputs = {"input_ids": torch.tensor([[17], [42]]), "position": torch.tensor([7, 20])}
    for layer in range(2):
        inputs[f"past_key_{layer}"] = torch.randn(shape, generator=gen)
        inputs[f"past_value_{layer}"] = torch.randn(shape, generator=gen)
    return inputs


@pytest.mark.parametrize("kind", ["context_encoding", "token_generation"])
def test_graph_traces_on_xla_without_mid_trace_execution(kind: str) -> None:
    import torch_xla
    import torch_xla.debug.metrics as met

    seq = 32
    config = tiny_llama_config(tie_word_embeddings=True)
    eager = build_causal_lm_graphs(build_model_from_config(config, seed=0), 2, seq)[kind][0]
    xla_model = build_model_from_config(config, seed=0)
    module, _, names = build_causal_lm_graphs(xla_model, 2, seq)[kind]
    inputs = _trace_inputs(kind, seq)

    device = torch_xla.device()
    module.to(device)
    # Module.to() gives each slot its own XLA Parameter: tied weights come apart.
    assert xla_model.lm_head.weight is not xla_model.model.embed_tokens.weight
    xla_model.tie_weights()
    assert xla_model.lm_head.weight is xla_model.model.embed_tokens.weight
    xla_inputs = [t.to(device) for t in inputs.values()]
    torch_xla.sync(wait=True)  # sync() is asynchronous: wait, or its execution shows up below
    met.clear_all()

    with torch.no_grad():
        outs = list(module(*xla_inputs))
    proto = torch_xla._XLAC._get_xla_tensors_hlo_proto(outs)

    assert met.metric_data("ExecuteTime") is None, "a graph ran mid-trace: the HLO was cut"
    assert isinstance(proto, bytes) and len(proto) > 1000
    assert len(outs) == len(names)
    # Weights are HLO parameters: 21 distinct tensors (rotary inv_freq included, the tied
    # lm_head counted once), not constants baked into the graph.
    param_ids, _ = torch_xla._XLAC._get_tensors_xla_device_data_node(outs)
    weight_ids = {torch_xla._XLAC._xla_get_tensor_id(t)
                  for t in [*xla_model.parameters(), *xla_model.buffers()]}
    assert len(weight_ids & set(param_ids)) == 21

    # Executing the lowered graph reproduces eager PyTorch.
    with torch.no_grad():
        want = eager(*inputs.values())
    for name, got_t, want_t in zip(names, outs, want, strict=True):
        torch.testing.assert_close(got_t.cpu(), want_t, atol=1e-5, rtol=1e-5, msg=name)


def test_pipeline_tracer_traces_both_graphs() -> None:
    from pipeline import trace
    seq = 64
    config = tiny_llama_config(tie_word_embeddings=True)
    traced: dict[int, dict[str, bytes]] = {}
    for seed in (0, 1):
        model = build_model_from_config(config, seed=seed)
        traced[seed] = {}
        for kind, (module, inputs, names) in build_causal_lm_graphs(model, 2, seq).items():
            result = trace.trace_graph(module, inputs, names)
            sig = result.signature
            assert [t.name for t in sig.inputs] == list(inputs)
            assert [t.name for t in sig.outputs] == names
            assert {p.name for p in sig.parameters if p.kind == "input"} == set(inputs)
            weights = set(sig.weight_names)
            assert "model.model.embed_tokens.weight" in weights
            assert "model.lm_head.weight" not in weights  # tied: one parameter, not two
            assert "model.model.rotary_emb.inv_freq" in weights
            assert len(weights) == 21
            traced[seed][kind] = trace.hlo_digest_bytes(result.hlo_proto)
            assert len(traced[seed][kind]) > 1000
    # Weights are parameters: other weights, same HLO.
    assert traced[0] == traced[1]
    assert traced[0]["context_encoding"] != traced[0]["token_generation"]
