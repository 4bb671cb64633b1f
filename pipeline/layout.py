"""Weight layouts: each weight is stored as the compiled graph reads it.

torch's ``nn.Linear`` keeps its weight ``[out, in]`` and computes ``x @ W.T``. Traced as is,
every weight reaches its dot through a ``transpose`` + ``copy`` in the optimized XLA CPU
module, on every call (a decode step then moves about three times the weight bytes). Here
each Linear weight is stored and traced ``[in, out]`` (layout ``transposed``) and the module
computes ``x @ Wt``: the HLO parameter is the stored tensor and feeds the dot directly.
(Neuron's inference libraries do the same, "weight layout optimization".)

The decision depends on the module structure only, so every fine-tune of one architecture
gets the same layouts and shares the compiled graphs. A weight tied to a non-Linear user
(e.g. an lm_head tied to the token embedding, read ``[vocab, hidden]`` by the gather) keeps
its natural layout. The layout of every weight is recorded in the graph signature.

``stored_tensor`` is a pure per-tensor function: weight writers call it on each tensor as
they write it (torch tensors or numpy arrays).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

NATURAL = "natural"
TRANSPOSED = "transposed"  # a 2-D [out, in] weight stored as [in, out]
LAYOUTS = (NATURAL, TRANSPOSED)


def stored_tensor(name: str, tensor: Any, layout: str) -> Any:
    """``tensor`` (as the model holds it) in the stored ``layout``, contiguous."""
    if layout == NATURAL:
        return tensor
    if layout != TRANSPOSED:
        raise ValueError(f"weight {name}: unknown layout {layout!r}; expected one of {LAYOUTS}")
    if tensor.ndim != 2:
        raise ValueError(f"weight {name}: layout {layout} needs a 2-D tensor, got {tensor.ndim}-D")
    transposed = tensor.T
    if hasattr(transposed, "contiguous"):
        return transposed.contiguous()
    import numpy as np  # noqa: PLC0415

    return np.ascontiguousarray(transposed)


def decide_layouts(module: torch.nn.Module) -> dict[str, str]:
    """Parameter name (every alias of a tied weight) -> its stored layout, for the weights
    that are not stored as the model holds them. Names as ``named_parameters`` of ``module``.
    """
    from torch import nn  # noqa: PLC0415

    users: dict[int, list[tuple[str, bool]]] = {}
    for prefix, sub in module.named_modules(remove_duplicate=False):
        for attr, param in sub.named_parameters(recurse=False, remove_duplicate=False):
            name = f"{prefix}.{attr}" if prefix else attr
            is_linear_weight = isinstance(sub, nn.Linear) and attr == "weight"
            users.setdefault(id(param), []).append((name, is_linear_weight))
    layouts: dict[str, str] = {}
    for named in users.values():
        if all(linear for _, linear in named):
            layouts.update({name: TRANSPOSED for name, _ in named})
    return layouts


# Output columns per dot of a half-precision weight (see _transposed_linear_forward).
HALF_DOT_COLUMNS = 4096


def _transposed_linear_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """``x @ Wt``. A bfloat16/float16 weight wider than ``HALF_DOT_COLUMNS`` is multiplied a
    block of output columns at a time: XLA CPU has no half-precision dot, so each weight
    becomes a float32 temporary first, and blocks keep that temporary to 4096 columns (a
    Llama's 32000-column lm_head: 33 MB instead of 262 MB live at once). Every output
    column is the same sum either way."""
    import torch  # noqa: PLC0415

    weight = self.weight
    columns = weight.shape[-1]
    if weight.dtype == torch.float32 or columns <= HALF_DOT_COLUMNS:
        out = torch.matmul(x, weight)
    else:
        blocks = [
            torch.matmul(x, weight[:, i : i + HALF_DOT_COLUMNS])
            for i in range(0, columns, HALF_DOT_COLUMNS)
        ]
        out = torch.cat(blocks, dim=-1)
    return out if self.bias is None else out + self.bias


class _TransposedLinear:
    """Mixin class swapped onto converted ``nn.Linear`` modules: ``weight`` is ``[in, out]``."""

    kiln_layout = TRANSPOSED
    forward = _transposed_linear_forward


def apply_layouts(module: torch.nn.Module) -> dict[str, str]:
    """Convert ``module`` in place to the stored layouts (idempotent) and return them.

    Each Linear chosen by ``decide_layouts`` gets its weight replaced by the stored tensor
    (one weight at a time, so no second copy of the model is held) and computes ``x @ Wt``;
    the module computes the same function as before."""
    import torch  # noqa: PLC0415

    layouts = {**decide_layouts(module), **stored_layouts(module)}
    converted: dict[int, torch.nn.Parameter] = {}
    for prefix, sub in module.named_modules(remove_duplicate=False):
        name = f"{prefix}.weight" if prefix else "weight"
        if layouts.get(name) != TRANSPOSED or getattr(sub, "kiln_layout", None) == TRANSPOSED:
            continue
        weight = sub.weight
        if id(weight) not in converted:
            # A view, not a copy: the model (often pages mapped from the checkpoint) is never
            # held twice; the weight writer makes each tensor contiguous as it streams it.
            stored = weight.detach().T
            converted[id(weight)] = torch.nn.Parameter(stored, requires_grad=False)
        sub.weight = converted[id(weight)]
        sub.__class__ = _converted_class(type(sub))
    return layouts


_CONVERTED: dict[type, type] = {}


def _converted_class(cls: type) -> type:
    if cls not in _CONVERTED:
        _CONVERTED[cls] = type(f"Transposed{cls.__name__}", (_TransposedLinear, cls), {})
    return _CONVERTED[cls]


def stored_layouts(module: torch.nn.Module) -> dict[str, str]:
    """Parameter name -> layout of the weights ``apply_layouts`` converted (others natural)."""
    out: dict[str, str] = {}
    for prefix, sub in module.named_modules(remove_duplicate=False):
        if getattr(sub, "kiln_layout", None) == TRANSPOSED:
            out[f"{prefix}.weight" if prefix else "weight"] = TRANSPOSED
    return out
