"""Tracers: what turns a wrapped model into an HloModuleProto + Signature.

- `torch-xla` (default): pipeline.trace, torch-xla on the CPU (weights as parameters).
- `torch-neuronx`: torch-neuronx's own HLO path (`torch_neuronx.xla_impl.trace.generate_hlo`
  with weights not inlined), so the graphs are the ones torch-neuronx hands to neuronx-cc.
  Needs the AWS Neuron SDK's torch-neuronx; elsewhere planning fails with a clear error.

Importing this package imports no torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipeline.errors import PipelineError
from pipeline.trace import TracedGraph, trace_graph
from pipeline.tracers.torch_neuronx import package_version, require
from pipeline.tracers.torch_neuronx import trace_graph as neuronx_trace
from pipeline.tracers.versions import tracer_versions

DEFAULT_TRACER = "torch-xla"
TRACERS = (DEFAULT_TRACER, "torch-neuronx")

TraceFn = Callable[[Any, dict[str, Any], list[str]], "TracedGraph"]


def _unknown(name: str) -> PipelineError:
    return PipelineError(f"unknown tracer {name!r}; choose one of {', '.join(TRACERS)}")


def require_tracer(name: str) -> None:
    """Raise PipelineError (naming the missing package) if `name` cannot trace here."""
    if name == DEFAULT_TRACER:
        return
    if name == "torch-neuronx":
        require()
        return
    raise _unknown(name)


def get_tracer(name: str) -> TraceFn:
    """The trace function of tracer `name` (its package is checked, not yet imported)."""
    require_tracer(name)
    if name == "torch-neuronx":
        return neuronx_trace
    return trace_graph


def tracer_identity(name: str) -> dict[str, str]:
    """What identifies the tracer in the direct key. The default tracer's identity is the
    library versions alone, as before tracers were selectable (its keys do not change)."""
    versions = dict(tracer_versions())
    if name == DEFAULT_TRACER:
        return versions
    if name == "torch-neuronx":
        return {**versions, "tracer": name, "torch-neuronx": package_version()}
    raise _unknown(name)
