"""How Linear weights are traced: read in place, in the layout the model holds them.

torch's ``nn.Linear`` keeps its weight ``[out, in]`` and computes ``x @ W.T``. Traced as is,
torch-xla emits ``transpose(W)`` + ``dot``, and the optimized XLA CPU module moves every
weight through a ``transpose`` + ``copy`` on every call (a decode step then moves about three
times the weight bytes). Here every Linear computes the same function as a ``dot_general``
that contracts the weight's own input dimension (``einsum("bk,nk->bn")``): the HLO parameter
is the stored tensor, ``[out, in]`` as in the checkpoint, and feeds the dot directly. XLA CPU
runs that as a row-major matrix-vector product, its fastest gemv (bench/scale.py, decode).

Graph builder 2 stored these weights transposed (``[in, out]``, layout ``transposed`` in
older signatures; those releases still load, since the loader binds weights by name). Its
column-major gemv read weights at about 0.8 of the speed of the row-major one.

The conversion depends on the module structure only, so every fine-tune of one architecture
traces the same graph; tied weights (an lm_head tied to the token embedding) stay tied.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

NATURAL = "natural"  # the layout every weight is stored in: as the model holds it

# Output rows per dot of a half-precision weight (see _in_place_linear_forward).
HALF_DOT_ROWS = 4096


def _in_place_linear_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` as one dot contracting ``W``'s input dimension.

    A bfloat16/float16 weight with more than ``HALF_DOT_ROWS`` outputs is multiplied a block
    of output rows at a time: XLA CPU has no half-precision dot, so each weight becomes a
    float32 temporary first, and blocks keep that temporary to 4096 rows (a Llama's
    32000-row lm_head: 33 MB instead of 262 MB live at once). Every output is the same sum
    either way."""
    import torch  # noqa: PLC0415

    weight = self.weight
    out_features, in_features = weight.shape
    flat = x.reshape(-1, in_features)
    if weight.dtype == torch.float32 or out_features <= HALF_DOT_ROWS:
        out = torch.einsum("bk,nk->bn", flat, weight)
    else:
        out = torch.cat(
            [
                torch.einsum("bk,nk->bn", flat, weight[i : i + HALF_DOT_ROWS])
                for i in range(0, out_features, HALF_DOT_ROWS)
            ],
            dim=-1,
        )
    out = out.reshape(*x.shape[:-1], out_features)
    return out if self.bias is None else out + self.bias


class _InPlaceLinear:
    """Mixin class swapped onto converted ``nn.Linear`` modules."""

    kiln_in_place_dot = True
    forward = _in_place_linear_forward


def use_in_place_dots(module: torch.nn.Module) -> None:
    """Convert every ``nn.Linear`` in ``module`` (in place, idempotent) to compute its function
    as a dot that reads the weight where it is. No weight is copied or changed."""
    from torch import nn  # noqa: PLC0415

    for _, sub in module.named_modules(remove_duplicate=False):
        if isinstance(sub, nn.Linear) and not getattr(sub, "kiln_in_place_dot", False):
            sub.__class__ = _converted_class(type(sub))


_CONVERTED: dict[type, type] = {}


def _converted_class(cls: type) -> type:
    if cls not in _CONVERTED:
        _CONVERTED[cls] = type(f"InPlace{cls.__name__}", (_InPlaceLinear, cls), {})
    return _CONVERTED[cls]
