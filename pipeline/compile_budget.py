"""Memory of graph compiles under `--max-memory`: a per-graph estimate, measured peaks, and
size parsing (pipeline/memory.py holds the plan-time lower bound that refuses a bucket
this machine cannot hold at all).

`kiln compile --max-memory SIZE` (or `max_memory` in the spec's defaults) admits a compile
only while the estimates of the compiles in flight plus its own fit the budget. The estimate
of a graph is the measured peak RSS of earlier compiles of the same architecture and graph
kind on the same compiler and target (compile records carry ``provenance.peak_rss_bytes``),
else a size-based estimate from its HLO and its input/output bytes.

Weights are HLO parameters, never constants, so a compile does not hold them: the weight
bytes do not enter the estimate.
"""

from __future__ import annotations

import json
import os
import re
import resource
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from artifacts.store import Store
    from pipeline.jobs import GraphJob

# A compile worker with torch, torch-xla and jaxlib imported, before it compiles anything.
WORKER_BASE_BYTES = 768 << 20
# Peak compiler memory per byte of serialized HLO (XLA's passes hold several copies).
HLO_FACTOR = 64
ITEMSIZE = {
    "bool": 1,
    "int8": 1,
    "uint8": 1,
    "int16": 2,
    "uint16": 2,
    "float16": 2,
    "bfloat16": 2,
    "int32": 4,
    "uint32": 4,
    "float32": 4,
    "int64": 8,
    "uint64": 8,
    "float64": 8,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str | int) -> int:
    """Bytes of ``16G``, ``512M``, ``1.5GiB`` or a plain integer (binary units)."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 1:
            raise ValueError(f"{text!r}: a size must be positive")
        return text
    match = _SIZE.fullmatch(str(text))
    if not match:
        raise ValueError(f"{text!r}: expected a size like 16G, 512M or 1073741824")
    size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if size < 1:
        raise ValueError(f"{text!r}: a size must be positive")
    return size


def human(size: int) -> str:
    for unit, factor in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor:
            return f"{size / factor:.1f} {unit}"
    return f"{size} B"


def _tensor_bytes(spec: Mapping[str, Any]) -> int:
    count = 1
    for dim in spec["shape"]:
        count *= int(dim)
    return count * ITEMSIZE.get(str(spec["dtype"]), 8)


def io_bytes(signature: Mapping[str, Any]) -> int:
    """Bytes of a graph's inputs and outputs (weights excluded)."""
    return sum(_tensor_bytes(t) for t in [*signature["inputs"], *signature["outputs"]])


def estimate_graph_bytes(*, hlo_size: int, signature: Mapping[str, Any]) -> int:
    """Size-based estimate of one compile's peak RSS: worker base + HLO term + I/O bytes."""
    return WORKER_BASE_BYTES + HLO_FACTOR * hlo_size + io_bytes(signature)


def recorded_peaks(store: Store, job: GraphJob) -> tuple[int | None, int | None]:
    """(max peak of the same bucket, max peak of any bucket) over earlier successful compiles
    of ``job``'s architecture and graph kind on its compiler and target; None where none."""
    if not job.architecture:
        return None, None
    same_bucket: list[int] = []
    any_bucket: list[int] = []
    for text in store.recorded_provenance(job.compiler, job.target, job.architecture):
        try:
            prov = json.loads(text or "{}")
        except json.JSONDecodeError:
            continue
        peak = prov.get("peak_rss_bytes")
        if not isinstance(peak, int) or prov.get("architecture") != job.architecture:
            continue
        if prov.get("graph_kind") != job.graph_kind:
            continue
        any_bucket.append(peak)
        if prov.get("bucket") == job.bucket_json:
            same_bucket.append(peak)
    return max(same_bucket, default=None), max(any_bucket, default=None)


def compile_estimate(
    store: Store, job: GraphJob, hlo_size: int, signature: Mapping[str, Any]
) -> int:
    """The admission estimate of one compile: a recorded peak of the same bucket, else the
    larger of the size-based estimate and the largest recorded peak of another bucket."""
    same, other = recorded_peaks(store, job)
    if same is not None:
        return same
    sized = estimate_graph_bytes(hlo_size=hlo_size, signature=signature)
    return sized if other is None else max(sized, other)


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakRss:
    """Peak resident memory while the block runs: this process (sampled) or, if larger, a
    compiler child process that ran meanwhile (its max RSS)."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRss:
        self._children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        self.peak = _rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())
        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        if children > self._children:
            self.peak = max(self.peak, children * 1024)
