"""Compiler backends, chosen by target: cpu -> xla-cpu, inf2/trn1/trn1n/trn2 -> neuronx-cc.
Importing this package loads no jaxlib and no compiler."""

from __future__ import annotations

from artifacts.targets import (
    COMPILERS,
    CPU_TARGETS,
    NEURON_TARGETS,
    NEURONX_CC,
    TARGET_NAMES,
    TARGETS,
    XLA_CPU,
)
from pipeline.compile.base import Compiler, CompileResult
from pipeline.compile.neuronx_cc import NeuronxCcCompiler
from pipeline.compile.xla_cpu import XlaCpuCompiler
from pipeline.errors import PipelineError

BACKENDS = COMPILERS

__all__ = [
    "BACKENDS",
    "CPU_TARGETS",
    "NEURON_TARGETS",
    "CompileResult",
    "Compiler",
    "backend_for_target",
    "get_compiler",
]


def get_compiler(name: str) -> Compiler:
    if name == XLA_CPU:
        return XlaCpuCompiler()
    if name == NEURONX_CC:
        return NeuronxCcCompiler()
    raise PipelineError(f"unknown compiler backend {name!r}; choose one of {BACKENDS}")


def backend_for_target(target: str, requested: str = "auto") -> str:
    """The backend that compiles for ``target``. A Neuron target always gets neuronx-cc
    (missing neuronx-cc fails the compile; it is never replaced by xla-cpu)."""
    if target not in TARGETS:
        raise PipelineError(f"unknown target {target!r}; choose one of {TARGET_NAMES}")
    backend = TARGETS[target].compiler
    if requested not in ("auto", backend):
        if requested not in BACKENDS:
            raise PipelineError(
                f"unknown backend {requested!r}; choose 'auto' or one of {BACKENDS}"
            )
        raise PipelineError(
            f"backend {requested!r} cannot compile for target {target!r}; "
            f"use --backend auto or {backend}"
        )
    return backend
