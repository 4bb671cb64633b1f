"""Fixed-shape decoder-LLM graphs: ``context_encoding`` and ``token_generation``.

Both graphs run transformers' own model code; only the KV cache and the attention mask are
supplied from outside, so that every shape is fixed per bucket (batch ``B``, ``S_max``):

- ``context_encoding``: ``input_ids [B, S_max]`` (right-padded), ``attention_mask [B, S_max]``
  -> logits of each row's last real token ``[B, V]``, then every layer's K and V
  ``[B, kv_heads, S_max, head_dim]``.
- ``token_generation``: ``input_ids [B, 1]``, ``position [B]`` and every layer's K/V ->
  logits ``[B, V]`` and the updated K/V (same names, so outputs feed the next step's inputs).

transformers' ``StaticCache`` writes every row at one shared offset, which breaks batches of
right-padded prompts of different lengths. Here each row's new K/V goes to its own
``position[b]`` (a one-hot select, equivalent to a per-row scatter) and a 4D additive mask,
which transformers passes to attention unchanged, hides every slot after ``position[b]``.
Because the 4D mask short-circuits ``create_causal_mask``, none of its data-dependent checks
run, so tracing does not force a graph execution.

torch and transformers are imported at module import: only the build side imports this module
(the graph classes subclass torch and transformers classes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.cache_utils import Cache, StaticLayer

from pipeline.layout import use_in_place_dots

GraphSpec = tuple[nn.Module, dict[str, torch.Tensor], list[str]]

_SUPPORTED_ATTENTION = ("eager", "sdpa")


class _RowPositionLayer(StaticLayer):
    """One layer's fixed-size KV cache whose rows are written at per-row positions.

    ``positions is None`` means prefill: the keys/values of the whole ``S_max`` window are
    taken as they are. Otherwise the single new token of row ``b`` replaces slot
    ``positions[b]``. Updates are out of place, so traced graphs return new tensors.
    """

    def __init__(
        self,
        max_cache_len: int,
        keys: torch.Tensor | None = None,
        values: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> None:
        super().__init__(max_cache_len=max_cache_len)
        self.keys = keys
        self.values = values
        self.positions = positions
        self.is_initialized = keys is not None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.positions is None:
            if key_states.shape[-2] != self.max_cache_len:
                got = key_states.shape[-2]
                raise ValueError(f"prefill covers {got} tokens, cache holds {self.max_cache_len}")
            self.keys, self.values = key_states, value_states
        else:
            if self.keys is None or self.values is None:
                raise ValueError("token generation needs the past keys and values")
            if key_states.shape[-2] != 1:
                raise ValueError("token generation takes exactly one new token per row")
            slots = torch.arange(self.max_cache_len, device=key_states.device)
            hit = (slots[None, :] == self.positions[:, None])[:, None, :, None]  # [B,1,S,1]
            self.keys = torch.where(hit, key_states, self.keys)
            self.values = torch.where(hit, value_states, self.values)
        self.is_initialized = True
        return self.keys, self.values


def _text_config(model: nn.Module) -> Any:
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _check_model(model: nn.Module) -> None:
    config = _text_config(model)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        raise NotImplementedError(
            "only full-attention decoders are supported, got layer types "
            f"{sorted(set(layer_types))}"
        )
    attn = getattr(model.config, "_attn_implementation", None)
    if attn not in _SUPPORTED_ATTENTION:
        raise NotImplementedError(
            f"attention implementation {attn!r} does not take an additive 4D mask; "
            f"load the model with attn_implementation='eager'"
        )


def kv_cache_shape(model: nn.Module, batch: int, seq: int) -> tuple[int, int, int, int]:
    """``(batch, kv_heads, seq, head_dim)`` of one layer's K (or V) cache."""
    config = _text_config(model)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return (batch, kv_heads, seq, head_dim)


def _num_layers(model: nn.Module) -> int:
    return int(_text_config(model).num_hidden_layers)


def _kv_names(num_layers: int) -> list[str]:
    return [f"past_{kind}_{i}" for i in range(num_layers) for kind in ("key", "value")]


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean "may attend" -> additive mask (0 or the dtype's most negative value)."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, blocked)


class _CausalGraph(nn.Module):
    """What both graphs share: the wrapped model and its outputs (logits, then the KV cache)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        _check_model(model)
        self.model = model
        self.num_layers = _num_layers(model)

    def output_names(self) -> list[str]:
        return ["logits", *_kv_names(self.num_layers)]


class ContextEncodingGraph(_CausalGraph):
    """Prefill of a right-padded ``[B, S_max]`` batch into a fresh ``S_max`` KV cache."""

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        batch, seq = input_ids.shape
        device = input_ids.device
        dtype = self.model.dtype
        idx = torch.arange(seq, device=device)
        causal = idx[None, :] <= idx[:, None]  # [S(query), S(key)]
        allowed = causal[None, :, :] & (attention_mask[:, None, :] != 0)
        mask4d = _additive(allowed[:, None, :, :], dtype)  # [B,1,S,S]
        position_ids = idx[None, :].expand(batch, seq)
        # Each row's last real token; an all-padding row reads slot 0 instead of slot -1.
        last = (attention_mask.sum(dim=1) - 1).clamp(min=0)
        cache = Cache(
            layers=[_RowPositionLayer(max_cache_len=seq) for _ in range(self.num_layers)]
        )
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask4d,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            logits_to_keep=last[:, None],  # gathered before lm_head: [B,1,H] -> [B,1,V]
        )
        logits = out.logits[:, 0, :]
        kv = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        return (logits, *kv)


class TokenGenerationGraph(_CausalGraph):
    """One new token per row against an ``S_max`` KV cache; row ``b`` sits at ``position[b]``."""

    def forward(
        self,
        input_ids: torch.Tensor,
        position: torch.Tensor,
        *past_key_values: torch.Tensor,
        **named_past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        """The past K/V come positionally (``past_key_0, past_value_0, past_key_1, ...``) or by
        those names as keywords (how tracers call ``module(**example_inputs)``), not both."""
        names = _kv_names(self.num_layers)
        if named_past:
            if past_key_values or set(named_past) != set(names):
                raise ValueError(f"expected past K/V named {names}, got {sorted(named_past)}")
            past_key_values = tuple(named_past[n] for n in names)
        if len(past_key_values) != len(names):
            raise ValueError(f"expected {len(names)} past K/V tensors, got {len(past_key_values)}")
        seq = past_key_values[0].shape[-2]
        device = input_ids.device
        slots = torch.arange(seq, device=device)
        allowed = slots[None, :] <= position[:, None]  # [B,S]
        mask4d = _additive(allowed[:, None, None, :], self.model.dtype)  # [B,1,1,S]
        cache = Cache(
            layers=[
                _RowPositionLayer(
                    max_cache_len=seq,
                    keys=past_key_values[2 * i],
                    values=past_key_values[2 * i + 1],
                    positions=position,
                )
                for i in range(self.num_layers)
            ]
        )
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask4d,
            position_ids=position[:, None],  # rotary angles per row
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        logits = out.logits[:, -1, :]
        kv = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        return (logits, *kv)


def build_causal_lm_graphs(model: nn.Module, batch: int, seq: int) -> dict[str, GraphSpec]:
    """Both decoder graphs of one bucket: ``{kind: (module, example_inputs, output_names)}``.

    ``example_inputs`` are deterministic and in forward-argument order. The two modules share
    ``model``'s parameters. ``model``'s Linears are converted in place to read their
    weights in place (pipeline.layout; it computes the same function).
    """
    if batch < 1 or seq < 1:
        raise ValueError(f"bucket must be positive, got batch={batch}, seq={seq}")
    model.eval()
    use_in_place_dots(model)
    context = ContextEncodingGraph(model)
    token_gen = TokenGenerationGraph(model)
    kv_shape = kv_cache_shape(model, batch, seq)
    dtype = model.dtype
    context_inputs = {
        "input_ids": torch.zeros((batch, seq), dtype=torch.int64),
        "attention_mask": torch.ones((batch, seq), dtype=torch.int64),
    }
    token_inputs: dict[str, torch.Tensor] = {
        "input_ids": torch.zeros((batch, 1), dtype=torch.int64),
        "position": torch.zeros((batch,), dtype=torch.int64),
    }
    for name in _kv_names(context.num_layers):
        token_inputs[name] = torch.zeros(kv_shape, dtype=dtype)
    return {
        "context_encoding": (context, context_inputs, context.output_names()),
        "token_generation": (token_gen, token_inputs, token_gen.output_names()),
    }


def pad_prompts(
    prompts: Sequence[Sequence[int]], seq: int, pad_token_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists to ``[B, seq]`` ``input_ids`` and ``attention_mask`` (int64)."""
    input_ids = torch.full((len(prompts), seq), pad_token_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(prompts), seq), dtype=torch.int64)
    for row, prompt in enumerate(prompts):
        if not 0 < len(prompt) <= seq:
            raise ValueError(f"prompt {row} has {len(prompt)} tokens; the bucket holds {seq}")
        input_ids[row, : len(prompt)] = torch.as_tensor(list(prompt), dtype=torch.int64)
        attention_mask[row, : len(prompt)] = 1
    return input_ids, attention_mask


@torch.no_grad()
def reference_greedy(
    context: ContextEncodingGraph,
    token_generation: TokenGenerationGraph,
    prompts: Sequence[Sequence[int]],
    seq: int,
    max_new_tokens: int,
    pad_token_id: int = 0,
) -> torch.Tensor:
    """Greedy decoding with the two graphs in eager PyTorch -> new tokens ``[B, max_new_tokens]``.

    The prompts share one right-padded batch; context encoding runs once, then token
    generation runs with its K/V outputs fed back. No end-of-sequence stop: every row gets
    exactly ``max_new_tokens`` tokens.
    """
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.int64)
    if int(lengths.max()) + max_new_tokens - 1 > seq:
        raise ValueError(
            f"a {int(lengths.max())}-token prompt plus {max_new_tokens} new tokens "
            f"does not fit a {seq}-token bucket"
        )
    input_ids, attention_mask = pad_prompts(prompts, seq, pad_token_id)
    logits, *kv = context(input_ids, attention_mask)
    tokens = [logits.argmax(dim=-1)]
    for step in range(max_new_tokens - 1):
        logits, *kv = token_generation(tokens[-1][:, None], lengths + step, *kv)
        tokens.append(logits.argmax(dim=-1))
    return torch.stack(tokens, dim=1)


def tiny_llama_config(**overrides: Any) -> Any:
    """A small random-weight Llama config (2 layers, GQA 4/2 heads, vocab 256), eager attention.

    No end-of-sequence token, so ``generate`` always emits ``max_new_tokens`` tokens.
    """
    kwargs: dict[str, Any] = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    kwargs.update(overrides)
    config = LlamaConfig(**kwargs)
    config._attn_implementation = "eager"
    return config


def build_model_from_config(config: Any, seed: int = 0) -> nn.Module:
    """A causal LM from ``config``: seeded random weights, float32, eval mode, eager attention."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", dtype=torch.float32
    )
    return model.eval()
