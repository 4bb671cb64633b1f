"""Errors raised by the build side. Every message says what went wrong and what to do."""

from __future__ import annotations

from typing import Literal

from artifacts.errors import KilnError

CompileFailure = Literal["exit", "timeout", "oom", "unavailable"]


class PipelineError(KilnError):
    """Root of every error the pipeline raises on purpose."""


class TraceError(PipelineError):
    """Tracing a model to HLO failed or produced an unusable graph (e.g. a cut graph)."""


class CompileError(PipelineError):
    """A compiler run failed. ``reason`` is one of "exit", "timeout", "oom", "unavailable";
    ``log`` holds the compiler's log text (possibly empty) so it can be recorded."""

    def __init__(
        self,
        message: str,
        *,
        reason: CompileFailure,
        log: str = "",
        returncode: int | None = None,
    ) -> None:
        super().__init__(message)
        self.reason: CompileFailure = reason
        self.log = log
        self.returncode = returncode


class BackendUnavailableError(CompileError):
    """The compiler a target needs is not installed (never silently replaced)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="unavailable")


class SpecError(PipelineError):
    """A spec file that cannot be used; the message names the file and the YAML path."""

class ShardError(PipelineError):
    """A shard option or index variable is malformed or out of range."""

class NeuronFlagError(PipelineError):
    """A neuronx-cc flag that cannot work for the target; the message names the flag."""

class NeuronCacheError(PipelineError):
    """A Neuron cache that cannot be read or written."""

class MemoryEstimateError(PipelineError):
    """A graph that needs more memory than the limit; the message names model, graph, bucket."""
