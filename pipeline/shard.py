"""Split one planned compile over machines: `kiln compile --shard I/N`.

A job's shard depends on direct keys alone. The plan's distinct direct keys are ordered by
sha256(direct key) and dealt out round-robin (rank % N), so:

- shards are disjoint and together hold every planned job;
- jobs sharing a direct key (two models of one architecture) land in one shard and compile
  once;
- reordering models or buckets in the spec changes nothing (only the set of keys counts);
- shard sizes differ by at most one distinct key.

Every job of the plan is split, cache hits included, so the split does not depend on what the
store already holds (shards that start minutes apart still agree). All shards must plan the
same spec with the same compilers (one image); a job that no shard compiled anyway is
compiled by the final unsharded run, which publishes the releases.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

from pipeline.errors import ShardError

if TYPE_CHECKING:
    from pipeline.jobs import ModelPlan

# Where a shard's index comes from with `--shard-count N`, first match wins.
INDEX_VARIABLES = (
    "JOB_COMPLETION_INDEX",  # Kubernetes Job with completionMode: Indexed
    "AWS_BATCH_JOB_ARRAY_INDEX",  # AWS Batch array job child
)
_SHARD_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")



@dataclass(frozen=True)
class Shard:
    """Shard `index` (0-based) of `count`."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ShardError(f"shard count must be at least 1, got {self.count}")
        if not 0 <= self.index < self.count:
            raise ShardError(
                f"shard index {self.index} is out of range for {self.count} shards"
                f" (indexes are 0-based: 0 to {self.count - 1})"
            )

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """`I/N` -> Shard(I, N); I is 0-based."""
    match = _SHARD_RE.match(text)
    if match is None:
        raise ShardError(f"--shard must be I/N with a 0-based index, e.g. 0/4; got {text!r}")
    return Shard(int(match[1]), int(match[2]))


def shard_from_environment(count: int, environ: Mapping[str, str]) -> Shard:
    """Shard I/`count` with I from JOB_COMPLETION_INDEX or AWS_BATCH_JOB_ARRAY_INDEX."""
    for name in INDEX_VARIABLES:
        value = environ.get(name, "").strip()
        if not value:
            continue
        if not value.isdigit():
            raise ShardError(f"{name}={value!r} is not a shard index (a whole number)")
        try:
            return Shard(int(value), count)
        except ShardError as exc:
            raise ShardError(f"{name}: {exc} (--shard-count {count})") from None
    raise ShardError(
        f"--shard-count {count} takes the shard index from {' or '.join(INDEX_VARIABLES)},"
        " and neither is set; run as a Kubernetes Indexed Job or an AWS Batch array job,"
        " or pass --shard I/N"
    )


def resolve_shard(
    shard: str | None, shard_count: int | None, environ: Mapping[str, str]
) -> Shard | None:
    """The shard a `kiln compile` run works on, or None for the whole plan."""
    if shard is not None and shard_count is not None:
        raise ShardError("use either --shard I/N or --shard-count N, not both")
    if shard is not None:
        return parse_shard(shard)
    if shard_count is not None:
        return shard_from_environment(shard_count, environ)
    return None


def _rank_key(direct_key: str) -> bytes:
    return hashlib.sha256(direct_key.encode()).digest()


def assign(keys: Iterable[str], count: int) -> dict[str, int]:
    """Direct key -> shard index for every distinct key (round-robin in hash order)."""
    if count < 1:
        raise ShardError(f"shard count must be at least 1, got {count}")
    ordered = sorted(set(keys), key=lambda k: (_rank_key(k), k))
    return {key: rank % count for rank, key in enumerate(ordered)}


class _Keyed(Protocol):
    @property
    def direct_key(self) -> str: ...


K = TypeVar("K", bound=_Keyed)


def split_jobs(jobs: Sequence[K], shard: Shard) -> list[K]:
    """The jobs of `jobs` (the whole plan) that belong to `shard`, in their given order."""
    owner = assign((j.direct_key for j in jobs), shard.count)
    return [j for j in jobs if owner[j.direct_key] == shard.index]


def select_shard(plans: Sequence[ModelPlan], shard: Shard) -> list[ModelPlan]:
    """Plans restricted to `shard`'s jobs; models left with no job are dropped (their
    weights are stored by the shards that trace them)."""
    every = [job for plan in plans for job in plan.jobs]
    mine = set(split_jobs(every, shard))
    selected = []
    for plan in plans:
        jobs = [j for j in plan.jobs if j in mine]
        if not jobs:
            continue
        selected.append(
            dataclasses.replace(
                plan,
                jobs=jobs,
                direct_hits={j: c for j, c in plan.direct_hits.items() if j in mine},
                unavailable={j: m for j, m in plan.unavailable.items() if j in mine},
            )
        )
    return selected
