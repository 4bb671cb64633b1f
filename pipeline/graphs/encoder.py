"""The ``encode`` graph of encoder models (BERT-like transformers AutoModels).

This module imports torch: it is only imported on the tracing path."""

from __future__ import annotations

import torch

from pipeline.layout import use_in_place_dots

GRAPH_KIND = "encode"
INPUT_NAMES = ("input_ids", "attention_mask")


class EncoderGraph(torch.nn.Module):
    """forward(input_ids, attention_mask) -> (last_hidden_state[, pooler_output]).

    The wrapped model is the submodule ``model``, so weight names carry a ``model.`` prefix.
    Token type ids are left to the model's default (its zero buffer)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.has_pooler = getattr(model, "pooler", None) is not None

    @property
    def output_names(self) -> list[str]:
        return ["last_hidden_state", "pooler_output"] if self.has_pooler else ["last_hidden_state"]

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        if self.has_pooler:
            return out.last_hidden_state, out.pooler_output
        return (out.last_hidden_state,)


def build_encoder_graph(
    model: torch.nn.Module, batch: int, seq: int
) -> tuple[EncoderGraph, dict[str, torch.Tensor], list[str]]:
    """(module, example inputs, output names) for one (batch, seq) bucket.

    Example values do not matter to the HLO (inputs are parameters), only shapes and the
    int64 dtype; they are fixed anyway so a trace is reproducible. ``model``'s Linears are
    converted in place to read their weights in place (pipeline.layout; same function)."""
    if batch < 1 or seq < 1:
        raise ValueError(f"bucket must be positive, got batch={batch} seq={seq}")
    use_in_place_dots(model)
    graph = EncoderGraph(model).eval()
    example = {
        "input_ids": torch.zeros((batch, seq), dtype=torch.int64),
        "attention_mask": torch.ones((batch, seq), dtype=torch.int64),
    }
    return graph, example, graph.output_names
