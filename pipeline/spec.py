"""The declarative compile spec (YAML): defaults, then models x buckets x targets x flags.

Validation errors name the file and the YAML path: `spec.yaml: models[1].buckets.seq[0]: ...`.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from artifacts.digest import Digest
from artifacts.refs import NAME_RULE, TAG_RULE, is_valid_name, is_valid_tag
from artifacts.targets import NEURON_TARGETS
from artifacts.targets import TARGET_NAMES as TARGETS
from pipeline.errors import NeuronFlagError, SpecError
from pipeline.neuron_flags import validate_flags
from pipeline.tracers import DEFAULT_TRACER, TRACERS

TASKS = ("encoder", "causal-lm")
DTYPES = ("float32", "bfloat16", "float16")
GRAPH_KINDS = {"encoder": ("encode",), "causal-lm": ("context_encoding", "token_generation")}
MAX_BUCKET = 1 << 20


@dataclass(frozen=True)
class ModelSource:
    """Where weights and config come from: a folder, a folder inside a package, or a config."""

    kind: str  # "folder" | "package" | "config"
    path: str | None = None
    package: str | None = None
    config: dict[str, Any] | None = None
    seed: int = 0

    def describe(self) -> str:
        if self.kind == "folder":
            return f"folder {self.path}"
        if self.kind == "package":
            return f"package {self.package}/{self.path or ''}"
        return f"config (seed {self.seed})"


@dataclass(frozen=True)
class Bucket:
    batch: int
    seq: int

    @property
    def label(self) -> str:
        return f"b{self.batch}xs{self.seq}"

    def to_json(self) -> dict[str, int]:
        return {"batch": self.batch, "seq": self.seq}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: ModelSource
    task: str
    batches: tuple[int, ...]
    seqs: tuple[int, ...]
    dtype: str
    targets: tuple[str, ...]
    flags: dict[str, tuple[str, ...]]
    tag: str
    tracer: str = DEFAULT_TRACER  # "torch-xla" or "torch-neuronx" (pipeline.tracers)
    context_seqs: tuple[int, ...] = ()  # buckets.context: prompt-only lengths (causal-lm)

    @property
    def buckets(self) -> tuple[Bucket, ...]:
        return tuple(Bucket(b, s) for b in self.batches for s in self.seqs)

    @property
    def graph_kinds(self) -> tuple[str, ...]:
        return GRAPH_KINDS[self.task]

    def kind_buckets(self, kind: str) -> tuple[Bucket, ...]:
        """The buckets one graph kind is compiled for. ``context_encoding`` also gets the
        ``buckets.context`` prompt lengths: a short prompt is encoded at its own length and
        its KV cache then padded to the token-generation bucket, as Neuron's inference
        libraries bucket context encoding apart from the cache length."""
        if kind != "context_encoding" or not self.context_seqs:
            return self.buckets
        seqs = sorted(set(self.seqs) | set(self.context_seqs))
        return tuple(Bucket(b, s) for b in self.batches for s in seqs)

    def graph_buckets(self) -> tuple[tuple[str, Bucket], ...]:
        """Every (graph kind, bucket) the model is compiled for, kind by kind."""
        return tuple((kind, b) for kind in self.graph_kinds for b in self.kind_buckets(kind))

    def flags_for(self, target: str) -> tuple[str, ...]:
        return self.flags.get(target, ())


@dataclass(frozen=True)
class Spec:
    path: str
    digest: Digest
    models: tuple[ModelSpec, ...] = field(default=())
    max_memory: int | None = None  # defaults.max_memory: compile memory budget in bytes


class _Path:
    """Builds `file: a.b[2].c: message` errors."""

    def __init__(self, file: str) -> None:
        self.file = file

    def fail(self, where: str, message: str) -> None:
        raise SpecError(f"{self.file}: {where}: {message}" if where else f"{self.file}: {message}")


def normalize_flags(flags: Any, where: str, errors: _Path) -> tuple[str, ...]:
    """Flags as a flat token tuple: strings are split shell-style, `--a=b` stays one token."""
    if flags is None:
        return ()
    if isinstance(flags, str):
        flags = [flags]
    if not isinstance(flags, list):
        errors.fail(where, "must be a list of strings or a string")
    out: list[str] = []
    for i, item in enumerate(flags):
        if not isinstance(item, str):
            errors.fail(f"{where}[{i}]", "must be a string")
        try:
            out.extend(shlex.split(item))
        except ValueError as exc:
            errors.fail(f"{where}[{i}]", f"cannot split flags: {exc}")
    return tuple(out)


def _positive_ints(value: Any, where: str, errors: _Path) -> tuple[int, ...]:
    if isinstance(value, dict):
        unknown = set(value) - {"min", "max"}
        if unknown:
            errors.fail(where, f"unknown keys {sorted(unknown)}; use min and max")
        lo, hi = value.get("min"), value.get("max")
        for key, v in (("min", lo), ("max", hi)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1 or v > MAX_BUCKET:
                errors.fail(f"{where}.{key}", "must be a positive integer")
        if lo > hi:
            errors.fail(where, f"min {lo} is larger than max {hi}")
        out = []
        p = 1
        while p < lo:
            p *= 2
        while p < hi:
            out.append(p)
            p *= 2
        out.append(hi)
        return tuple(sorted(set(out)))
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value:
        errors.fail(where, "must be a non-empty list of positive integers or {min, max}")
    for i, v in enumerate(value):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1 or v > MAX_BUCKET:
            errors.fail(f"{where}[{i}]", "must be a positive integer")
    return tuple(sorted(set(value)))


def _source(value: Any, where: str, errors: _Path, base: Path) -> ModelSource:
    if isinstance(value, str):
        folder = (base / value).resolve() if not Path(value).is_absolute() else Path(value)
        return ModelSource("folder", path=str(folder))
    if not isinstance(value, dict):
        errors.fail(where, "must be a folder path, {package, path} or {config, seed}")
    if "package" in value:
        if not isinstance(value["package"], str):
            errors.fail(f"{where}.package", "must be a string")
        path = value.get("path", "")
        if not isinstance(path, str):
            errors.fail(f"{where}.path", "must be a string")
        return ModelSource("package", path=path, package=value["package"])
    if "config" in value:
        config = value["config"]
        if not isinstance(config, dict) or "model_type" not in config:
            errors.fail(f"{where}.config", "must be a transformers config with model_type")
        seed = value.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            errors.fail(f"{where}.seed", "must be a non-negative integer")
        return ModelSource("config", config=dict(config), seed=seed)
    if "path" in value:
        return _source(value["path"], f"{where}.path", errors, base)
    errors.fail(where, "needs one of: path, package, config")
    raise AssertionError("unreachable")


def _flags_by_target(
    value: Any, where: str, errors: _Path, targets: tuple[str, ...]
) -> dict[str, tuple[str, ...]]:
    if isinstance(value, dict):
        out = {}
        for target, flags in value.items():
            if target not in TARGETS:
                errors.fail(f"{where}.{target}", f"unknown target; choose from {TARGETS}")
            out[target] = normalize_flags(flags, f"{where}.{target}", errors)
        return out
    flags = normalize_flags(value, where, errors)
    return {t: flags for t in targets}


MODEL_KEYS = {
    "name",
    "source",
    "task",
    "buckets",
    "dtype",
    "targets",
    "compiler_flags",
    "tag",
    "tracer",
}


def _check_neuron_flags(
    flags: dict[str, tuple[str, ...]], where: str, per_target: bool, errors: _Path
) -> None:
    """Reject neuronx-cc flags that cannot work for their target (before any compile)."""
    for target, target_flags in flags.items():
        if target not in NEURON_TARGETS:
            continue
        try:
            validate_flags(target, target_flags)
        except NeuronFlagError as exc:
            if per_target:
                errors.fail(f"{where}.{target}", str(exc))
            errors.fail(where, f"for target {target}: {exc}")


def parse_spec(data: Any, file: str, base: Path | None = None, raw: bytes = b"") -> Spec:
    """Validate a loaded YAML document into a Spec."""
    errors = _Path(file)
    base = base or Path.cwd()
    if not isinstance(data, dict):
        errors.fail("", "must be a mapping with `models` (and optional `defaults`)")
    unknown = set(data) - {"defaults", "models"}
    if unknown:
        errors.fail(sorted(unknown)[0], "unknown top-level key; expected defaults, models")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        errors.fail("defaults", "must be a mapping")
    bad_default = set(defaults) - (MODEL_KEYS - {"name", "source"}) - {"max_memory"}
    if bad_default:
        errors.fail(f"defaults.{sorted(bad_default)[0]}", "unknown key")
    max_memory = None
    if defaults.get("max_memory") is not None:
        from pipeline.compile_budget import parse_size  # noqa: PLC0415

        try:
            max_memory = parse_size(defaults["max_memory"])
        except ValueError as exc:
            errors.fail("defaults.max_memory", str(exc))
    defaults = {k: v for k, v in defaults.items() if k != "max_memory"}
    models_data = data.get("models")
    if not isinstance(models_data, list) or not models_data:
        errors.fail("models", "must be a non-empty list")
    models = []
    names: set[str] = set()
    for i, entry in enumerate(models_data):
        where = f"models[{i}]"
        if not isinstance(entry, dict):
            errors.fail(where, "must be a mapping")
        unknown = set(entry) - MODEL_KEYS
        if unknown:
            errors.fail(
                f"{where}.{sorted(unknown)[0]}", f"unknown key; expected {sorted(MODEL_KEYS)}"
            )
        merged = {**defaults, **entry}
        name = merged.get("name")
        if not is_valid_name(name):
            errors.fail(f"{where}.name", f"must be {NAME_RULE}, got {name!r}")
        if name in names:
            errors.fail(f"{where}.name", f"duplicate model name {name!r}")
        names.add(name)
        if "source" not in merged:
            errors.fail(f"{where}.source", "required")
        source = _source(merged["source"], f"{where}.source", errors, base)
        task = merged.get("task", "encoder")
        if task not in TASKS:
            errors.fail(f"{where}.task", f"must be one of {TASKS}")
        buckets = merged.get("buckets")
        if not isinstance(buckets, dict) or set(buckets) - {"batch", "seq", "context"}:
            errors.fail(f"{where}.buckets", "must be a mapping with batch, seq (and context)")
        batches = _positive_ints(buckets.get("batch", [1]), f"{where}.buckets.batch", errors)
        if "seq" not in buckets:
            errors.fail(f"{where}.buckets.seq", "required")
        seqs = _positive_ints(buckets["seq"], f"{where}.buckets.seq", errors)
        context_seqs = _context_seqs(buckets, task, seqs, f"{where}.buckets.context", errors)
        dtype = merged.get("dtype", "float32")
        if dtype not in DTYPES:
            errors.fail(f"{where}.dtype", f"must be one of {DTYPES}")
        targets = merged.get("targets", ["cpu"])
        if isinstance(targets, str):
            targets = [targets]
        if not isinstance(targets, list) or not targets:
            errors.fail(f"{where}.targets", "must be a non-empty list")
        for j, t in enumerate(targets):
            if t not in TARGETS:
                errors.fail(f"{where}.targets[{j}]", f"unknown target {t!r}; choose from {TARGETS}")
        targets = tuple(dict.fromkeys(targets))
        flags = _flags_by_target(
            merged.get("compiler_flags"), f"{where}.compiler_flags", errors, targets
        )
        _check_neuron_flags(
            flags,
            f"{where}.compiler_flags",
            isinstance(merged.get("compiler_flags"), dict),
            errors,
        )
        tag = merged.get("tag", "latest")
        if not is_valid_tag(tag):
            errors.fail(f"{where}.tag", f"must be {TAG_RULE}, got {tag!r}")
        tracer = merged.get("tracer", DEFAULT_TRACER)
        if tracer not in TRACERS:
            errors.fail(f"{where}.tracer", f"must be one of {TRACERS}")
        models.append(
            ModelSpec(
                name, source, task, batches, seqs, dtype, targets, flags, tag, tracer, context_seqs
            )
        )
    return Spec(file, Digest.of_bytes(raw), tuple(models), max_memory)


def _context_seqs(
    buckets: dict[str, Any], task: str, seqs: tuple[int, ...], where: str, errors: _Path
) -> tuple[int, ...]:
    """``buckets.context``: prompt lengths that get a context_encoding graph of their own.
    Each must fit the longest ``seq`` (a longer prompt could not be decoded from)."""
    if "context" not in buckets:
        return ()
    if task != "causal-lm":
        errors.fail(where, f"only a causal-lm has context buckets, this model's task is {task}")
    context = _positive_ints(buckets["context"], where, errors)
    for j, length in enumerate(context):
        if length > max(seqs):
            errors.fail(
                f"{where}[{j}]", f"{length} is longer than the longest seq bucket ({max(seqs)})"
            )
    return tuple(s for s in context if s not in seqs)


def load_spec(path: Path | str) -> Spec:
    """Read and validate a YAML spec file."""
    import yaml  # noqa: PLC0415

    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SpecError(f"{path}: cannot read spec: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"{path}: invalid YAML{where}: {problem}") from None
    return parse_spec(data, str(path), path.parent.resolve(), raw)
