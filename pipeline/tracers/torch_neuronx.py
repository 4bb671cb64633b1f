"""The `torch-neuronx` tracer: HLO through torch-neuronx's own lowering.

`torch_neuronx.xla_impl.trace.generate_hlo(func, example_inputs, inline_weights_to_neff=False,
return_weights=False, output_aliased_tensor=False, cpu_backend=True)` is the path NxD
Inference's ModelBuilder uses: weights stay HLO parameters (`weight_name_to_idx` maps each
state-dict name to its parameter index) and the remaining parameters are the example inputs,
in order. The HLO is what torch-neuronx would hand to neuronx-cc.

torch-neuronx comes from the AWS Neuron SDK's package index; PyPI's `torch-neuronx` is a
placeholder whose import fails. Where it cannot be imported, `require()` raises a
PipelineError naming the package.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import inspect
from functools import lru_cache
from typing import Any

from pipeline.errors import PipelineError, TraceError
from pipeline.signature import ParameterKind, ParameterSpec, Signature, TensorSpec
from pipeline.trace import TracedGraph, _program_shape

PACKAGE = "torch-neuronx"
MODULE = "torch_neuronx"
_INNER = "graph"  # the wrapper's attribute holding the traced module
_OPTIONS = {
    "inline_weights_to_neff": False,
    "return_weights": False,
    "output_aliased_tensor": False,
    "cpu_backend": True,
}


@lru_cache(maxsize=1)
def import_problem() -> str | None:
    """Why torch-neuronx cannot be used here, or None when it can."""
    if importlib.util.find_spec(MODULE) is None:
        return "it is not installed"
    try:
        importlib.import_module(f"{MODULE}.xla_impl.trace")
    except Exception as exc:  # noqa: BLE001 - the placeholder raises ImportError; others differ
        return f"importing it failed: {type(exc).__name__}: {exc}"
    return None


def require() -> None:
    problem = import_problem()
    if problem is not None:
        raise PipelineError(
            f"tracer torch-neuronx needs the {PACKAGE} package of the AWS Neuron SDK (from"
            f" Neuron's package index; PyPI's {PACKAGE} is a placeholder), but {problem}:"
            " install the Neuron SDK, or use `tracer: torch-xla`"
        )


def package_version() -> str:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def _positional(module: Any, names: list[str]) -> Any:
    """A module whose forward takes the inputs positionally (as generate_hlo passes them)."""
    import torch  # noqa: PLC0415

    class PositionalInputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            setattr(self, _INNER, module)

        def forward(self, *args: Any) -> tuple[Any, ...]:
            return tuple(getattr(self, _INNER)(**dict(zip(names, args, strict=True))))

    return PositionalInputs().eval()


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def trace_graph(
    module: Any, example_inputs: dict[str, Any], output_names: list[str]
) -> TracedGraph:
    """Lower `module.forward(**example_inputs)` with torch-neuronx (weights as parameters)."""
    require()
    import torch  # noqa: PLC0415
    from torch_neuronx.xla_impl import trace as nx_trace  # noqa: PLC0415

    names = list(example_inputs)
    accepted = inspect.signature(nx_trace.generate_hlo).parameters
    options = {k: v for k, v in _OPTIONS.items() if k in accepted}
    with torch.no_grad():
        artifacts = nx_trace.generate_hlo(
            _positional(module, names), tuple(example_inputs[n] for n in names), **options
        )
    proto = artifacts.hlo_module.SerializeToString()
    weights = getattr(artifacts, "weight_name_to_idx", None)
    if not weights:
        raise TraceError(
            "torch-neuronx returned no weight_name_to_idx: the weights would be inlined into"
            " the graph; this torch-neuronx is too old for Kiln's torch-neuronx tracer"
        )
    hlo_params, hlo_results = _program_shape(proto)
    kinds: dict[int, tuple[ParameterKind, str]] = {}
    for name, index in weights.items():
        kinds.setdefault(int(index), ("weight", name.removeprefix(f"{_INNER}.")))
    free = [i for i in range(len(hlo_params)) if i not in kinds]
    if len(free) != len(names):
        raise TraceError(
            f"torch-neuronx HLO has {len(hlo_params)} parameters, {len(kinds)} of them weights,"
            f" which leaves {len(free)} for the {len(names)} inputs {names}"
        )
    kinds.update({i: ("input", n) for i, n in zip(free, names, strict=True)})

    parameters = tuple(
        ParameterSpec(
            index=i,
            name=kinds[i][1],
            dtype=d,
            shape=s,
            kind=kinds[i][0],
        )
        for i, (d, s) in enumerate(hlo_params)
    )
    if len(hlo_results) != len(output_names):
        raise TraceError(
            f"torch-neuronx HLO has {len(hlo_results)} results, expected {output_names}"
        )
    outputs = tuple(
        TensorSpec(n, d, s) for n, (d, s) in zip(output_names, hlo_results, strict=True)
    )
    inputs = tuple(
        TensorSpec(n, _dtype_name(t.dtype), tuple(t.shape)) for n, t in example_inputs.items()
    )
    signature = Signature(inputs=inputs, outputs=outputs, parameters=parameters)
    return TracedGraph(hlo_proto=proto, hlo_text="", signature=signature)
