"""Graph jobs and their keys, computed from the spec and the source files alone: no store,
no index, no torch (so `kiln compile` can tell a no-op rerun without importing SQLAlchemy)."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from pipeline.compile import backend_for_target
from pipeline.compile.neuronx_cc import NeuronxCcCompiler
from pipeline.compile.xla_cpu import xla_cpu_version
from pipeline.keys import architecture_digest, direct_key, weights_key
from pipeline.memory import check_model as check_model_memory
from pipeline.memory import host_memory_bytes
from pipeline.neuron_flags import NeuronFlagError, validate_flags
from pipeline.sources import raw_config, weights_identity
from pipeline.spec import Bucket, ModelSpec

if TYPE_CHECKING:
    from pipeline.weights import WeightBlobs


@dataclass(frozen=True)
class GraphJob:
    """One graph to produce: (model, graph kind, bucket, target, flags) and its direct key."""

    model: str
    graph_kind: str
    bucket: Bucket
    target: str
    flags: tuple[str, ...]
    compiler: str
    compiler_version: str
    dtype: str
    direct_key: str
    architecture: str = ""  # the model's architecture digest (memory estimates by history)

    @property
    def label(self) -> str:
        return f"{self.model} {self.graph_kind} {self.bucket.label} {self.target}"

    @property
    def bucket_json(self) -> dict[str, int]:
        return self.bucket.to_json()


@dataclass(frozen=True)
class CompiledGraph:
    """A successful compilation the cache holds: enough to write a release entry."""

    hlo_key: str
    hlo_digest: str
    hlo_size: int
    signature: dict[str, Any]
    executable_digest: str
    executable_size: int
    executable_format: str
    compiler: str
    compiler_version: str
    flags: tuple[str, ...]
    seconds: float
    log_digest: str | None
    log_size: int | None


@dataclass
class ModelPlan:
    model: ModelSpec
    architecture: str
    weights_key: str
    weights: WeightBlobs | None
    jobs: list[GraphJob] = field(default_factory=list)
    direct_hits: dict[GraphJob, CompiledGraph] = field(default_factory=dict)
    unavailable: dict[GraphJob, str] = field(default_factory=dict)

    @property
    def misses(self) -> list[GraphJob]:
        return [j for j in self.jobs if j not in self.direct_hits and j not in self.unavailable]


@lru_cache(maxsize=4)
def compiler_version(name: str) -> str | None:
    """The compiler's version without importing it; None when it is not installed."""
    if name == "xla-cpu":
        try:
            return xla_cpu_version(importlib.metadata.version("jaxlib"))
        except importlib.metadata.PackageNotFoundError:
            return None
    if name == "neuronx-cc":
        if shutil.which("neuronx-cc") is None:
            return None
        try:
            return NeuronxCcCompiler().version()
        except (OSError, subprocess.SubprocessError, RuntimeError, ValueError):
            return None
    return None


def unavailable_message(compiler: str, target: str) -> str:
    if compiler == "neuronx-cc":
        return (
            f"neuronx-cc is not installed here, so target {target} cannot be compiled:"
            " install the Neuron SDK (neuronx-cc) or compile for target cpu"
        )
    return f"{compiler} is not installed: pip install 'kiln[pipeline]'"


def plan_jobs(model: ModelSpec, backend: str, flags_override: tuple[str, ...] | None) -> ModelPlan:
    """The model's graph jobs and keys, with nothing looked up yet (no store, no index)."""
    from pipeline.tracers import require_tracer, tracer_identity  # noqa: PLC0415

    require_tracer(model.tracer)  # a missing tracer package fails the plan, not each graph
    tracer = tracer_identity(model.tracer)
    config = raw_config(model)
    check_model_memory(model, config, host_memory_bytes())  # before anything is traced
    arch = architecture_digest({**config, "_kiln_task": model.task})
    wkey = weights_key(source={"task": model.task, **weights_identity(model)}, dtype=model.dtype)
    plan = ModelPlan(model, arch, wkey, None)
    for target in model.targets:
        compiler = backend_for_target(target, backend)
        version = compiler_version(compiler)
        flags = flags_override if flags_override is not None else model.flags_for(target)
        if compiler == "neuronx-cc":  # checked and canonical before anything is compiled
            try:
                flags = validate_flags(target, flags)
            except NeuronFlagError as exc:
                raise NeuronFlagError(f"model {model.name}, target {target}: {exc}") from None
        for kind, bucket in model.graph_buckets():
            key = direct_key(
                architecture=arch,
                graph_kind=kind,
                bucket=bucket.to_json(),
                dtype=model.dtype,
                tracer=tracer,
                compiler=compiler,
                compiler_version=version or "missing",
                flags=flags,
                target=target,
            )
            job = GraphJob(
                model.name,
                kind,
                bucket,
                target,
                flags,
                compiler,
                version or "missing",
                model.dtype,
                key,
                arch,
            )
            plan.jobs.append(job)
            if version is None:
                plan.unavailable[job] = unavailable_message(compiler, target)
    return plan
