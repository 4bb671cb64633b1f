"""How Linear weights are traced: read in place, in the layout the model holds them.

torch's ``nn.Linear`` keeps its weight ``[out, in]`` and computes ``x @ W.T``. Traced as is,
torch-xla emits ``transpose(W)`` + ``dot``, and the optimized XLA CPU module moves every
weight through a ``transpose`` + ``copy`` on every call (a decode step then moves about three
times the weight bytes). Here every Linear computes the same function from the stored
tensor, ``[out, in]`` as in the checkpoint, which is the HLO parameter and feeds the
computation directly: a ``dot_general`` contracting the weight's own input dimension
(``einsum("bk,nk->bn")``; for one token XLA CPU's row-major matrix-vector product, its
fastest gemv), or, for a half-precision weight and a few rows, a fused float32
multiply-reduce (``_in_place_linear_forward`` says which, and why).

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

# Half-precision Linears over at most this many rows (batch x positions) run as a fused
# multiply-reduce, wider ones as dots of HALF_DOT_ROWS output rows at a time.
HALF_REDUCE_MAX_ROWS = 16
HALF_DOT_ROWS = 4096


def _in_place_linear_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """``x @ W.T``, reading ``W`` where it is.

    A float32 weight is one dot contracting its input dimension: for one row with the
    weight as the right operand (XLA CPU's row-major matrix-vector product), for more with
    it as the left operand, behind a barrier (``_fenced`` says why). XLA CPU has no
    half-precision dot: it converts the whole bfloat16/float16 weight to a float32
    temporary first, then multiplies (about 1 Gparam/s). So for up to
    ``HALF_REDUCE_MAX_ROWS`` rows the product is written as a multiply and a row-wise sum in
    float32, which XLA fuses into one kernel that converts each weight element as it reads
    it: about 7x the speed on one token. Wider inputs use dots over blocks of
    ``HALF_DOT_ROWS`` output rows, keeping the temporary to 4096 rows (a Llama's 32000-row
    lm_head: 33 MB instead of 262 MB live at once). Each output is the same float32 sum of
    products, rounded once to the weight's dtype, as torch's own half-precision Linear.

    Why only a few rows: XLA shares the input's broadcast ``[out, rows, in]`` between
    Linears of one width reading one input (k and v) and sometimes materializes it, so the
    graph's scratch grows with the rows (the 1.1B Llama: 2 MiB a row, 33 MiB at 16, 266 MiB
    at 128). In float32, where no convert separates the broadcast from its producer, it
    materialized gate and up's too (704 MiB at 16 rows), so float32 Linears stay dots.
    Eager torch always materializes those products: Kiln only traces this forward (tests
    run it eagerly on small models)."""
    import torch  # noqa: PLC0415

    weight = self.weight
    out_features, in_features = weight.shape
    flat = x.reshape(-1, in_features)
    rows = flat.shape[0]
    if weight.dtype == torch.float32:
        if rows == 1:
            out = torch.einsum("bk,nk->bn", flat, weight)
        else:
            out = _fenced(torch.einsum("nk,bk->nb", weight, flat)).T
    elif rows == 1:
        out = (weight.float() * flat.float()).sum(dim=-1)[None].to(weight.dtype)
    elif rows <= HALF_REDUCE_MAX_ROWS:
        # [out, rows]: each weight row is read once for every input row.
        products = weight.float()[:, None, :] * flat.float()[None, :, :]
        out = products.sum(dim=-1).T.to(weight.dtype)
    else:
        out = torch.cat(
            [
                _fenced(torch.einsum("nk,bk->nb", weight[i : i + HALF_DOT_ROWS], flat))
                for i in range(0, out_features, HALF_DOT_ROWS)
            ],
            dim=0,
        ).T
    out = out.reshape(*x.shape[:-1], out_features)
    return out if self.bias is None else out + self.bias


def _fenced(product: torch.Tensor) -> torch.Tensor:
    """``product`` behind an XLA optimization barrier (when traced; eagerly, as is).

    XLA's simplifier folds ``transpose(dot(W, x))`` back into ``dot(x, W)``, the form in which
    XLA CPU's YNNPACK kernels transpose the whole ``[out, in]`` weight on every call; the
    barrier keeps the weight as the dot's left operand, read in place, and only the small
    ``[out, rows]`` product is transposed. For 2 to 128 rows that made the dots 1.6x to 4.6x
    faster (the 1.1B Llama's 16-position context encoding, and decode at batch 2 and more)."""
    if product.device.type != "xla":
        return product
    import torch_xla.core.xla_model as xm  # noqa: PLC0415

    xm.optimization_barrier_([product])
    return product


class _InPlaceLinear:
    """Mixin class swapped onto converted ``nn.Linear`` modules."""

    kiln_in_place_dot = True
    forward = _in_place_linear_forward


def use_in_place_dots(module: torch.nn.Module) -> None:
    """Convert every ``nn.Linear`` in ``module`` (in place, idempotent) to compute its function
    reading the weight where it is (``_in_place_linear_forward``). No weight is copied or
    changed."""
    from torch import nn  # noqa: PLC0415

    for _, sub in module.named_modules(remove_duplicate=False):
        if isinstance(sub, nn.Linear) and not getattr(sub, "kiln_in_place_dot", False):
            sub.__class__ = _converted_class(type(sub))


_CONVERTED: dict[type, type] = {}


def _converted_class(cls: type) -> type:
    if cls not in _CONVERTED:
        _CONVERTED[cls] = type(f"InPlace{cls.__name__}", (_InPlaceLinear, cls), {})
    return _CONVERTED[cls]
