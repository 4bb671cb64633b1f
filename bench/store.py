"""Benchmark the artifact store against plain coreutils, and its listing at scale.

    .venv/bin/python bench/store.py                      # 1 GiB, 100,000 blobs, 10,000 releases
    .venv/bin/python bench/store.py --size 64MiB --blobs 5000 --releases 500 --repeat 1
    .venv/bin/python bench/store.py --json

(a) put: `Store.put_stream` of N random files (hash while writing, fsync, rename, index row)
    against `sha256sum FILE && cp FILE DEST` per file. Goal: put throughput >= 0.7 x baseline.
(b) verified get: `Store.open_blob` streamed to a file (hash checked at EOF) against
    `cp STORED DEST && sha256sum STORED`. Goal: >= 0.8 x baseline.
(c) a store with --blobs blobs and --releases releases (files and index rows written in bulk),
    then `kiln ls` and `kiln stats` as fresh processes. Goal: < 1 s each.

Page caches cannot be dropped without root, so every figure is warm-cache: the source files
were just written, and reads come from memory. `sync` runs between steps (untimed) so one
step's write-back does not land in the next step's time. The baseline does not fsync while
the store does; the "baseline + fsync" row (`... && sync DEST`) shows what durability costs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from artifacts.digest import CHUNK_SIZE, Digest
from artifacts.index.db import write_transaction
from artifacts.index.models import BlobRow
from artifacts.index.ops import index_release
from artifacts.manifest import BlobRef, CompilerInfo, Graph, Provenance, Release, Source
from artifacts.records import TagEvent
from artifacts.store import Store, apply_tag_event
from artifacts.table import human_size, render_table

MiB = 1024 * 1024
GiB = 1024 * MiB
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1024, "M": MiB, "G": GiB}
GRAPHS_PER_RELEASE = 4
RELEASES_PER_NAME = 10


def parse_size(text: str) -> int:
    """`1GiB`, `256MiB`, `512M`, `4096` -> bytes (binary units either way)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: use e.g. 1GiB, 256MiB or 4096")
    unit = (m.group(2) or "").upper()[:1]
    return int(float(m.group(1)) * _UNITS[unit])


@dataclass(frozen=True)
class Result:
    """One comparison: kiln's time against a baseline's (or against a fixed goal)."""

    name: str
    kiln_s: float
    baseline_s: float | None
    nbytes: int | None
    goal: str
    ok: bool
    note: str = ""

    @property
    def ratio(self) -> float | None:
        """Kiln's throughput over the baseline's (= baseline time / kiln time)."""
        return None if self.baseline_s is None else self.baseline_s / self.kiln_s


# -- timing helpers ------------------------------------------------------------------------------
def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _median_time(fn: Callable[[], object], repeat: int, before: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        before()
        os.sync()
        times.append(_timed(fn))
    return statistics.median(times)


def _sh(script: str, *args: str) -> None:
    subprocess.run(["sh", "-c", script, "sh", *args], check=True, stdout=subprocess.DEVNULL)


def _fresh(path: Path) -> None:
    if path.exists():
        for p in path.rglob("*"):  # blobs are 0444 in 0755 folders; rmtree copes, chmod anyway
            if p.is_file():
                p.chmod(0o644)
        shutil.rmtree(path)
    path.mkdir(parents=True)


def _mbps(nbytes: int, seconds: float) -> str:
    return f"{nbytes / MiB / seconds:,.0f} MiB/s"


# -- (a) put and (b) get -------------------------------------------------------------------------
def make_sources(folder: Path, total: int, files: int) -> list[Path]:
    """`files` random files adding up to `total` bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    each = total // files
    paths = []
    for i in range(files):
        path = folder / f"src-{i:02d}.bin"
        with open(path, "wb") as f:
            left = each
            while left:
                n = min(16 * MiB, left)
                f.write(os.urandom(n))
                left -= n
        paths.append(path)
    return paths


def bench_put_get(work: Path, sources: list[Path], repeat: int) -> list[Result]:
    total = sum(p.stat().st_size for p in sources)
    store_dir, dest = work / "store", work / "dest"
    digests: list[Digest] = []
    opened: list[Store] = []

    def fresh_store() -> None:
        """An empty store, opened (schema created) before the clock starts."""
        while opened:
            opened.pop().close()
        _fresh(store_dir)
        opened.append(Store.open(str(store_dir)))

    def put_all() -> None:
        digests.clear()
        for path in sources:
            with open(path, "rb") as f:
                digests.append(opened[0].put_stream(f, kind="weights").digest)

    put = _median_time(put_all, repeat, fresh_store)
    opened.pop().close()
    cp = 'sha256sum "$1" >/dev/null && cp "$1" "$2"'
    base = _median_time(lambda: [_sh(cp, str(p), str(dest / p.name)) for p in sources],
                        repeat, lambda: _fresh(dest))
    cp_sync = cp + ' && sync "$2"'
    base_sync = _median_time(lambda: [_sh(cp_sync, str(p), str(dest / p.name)) for p in sources],
                             repeat, lambda: _fresh(dest))

    with Store.open(str(store_dir)) as store:
        stored = [Path(store.backend.location(d)) for d in digests]

        def get_all() -> None:
            for d in digests:
                with store.open_blob(d) as reader, open(dest / d.hex, "wb") as out:
                    shutil.copyfileobj(reader, out, CHUNK_SIZE)

        get = _median_time(get_all, repeat, lambda: _fresh(dest))
    cat = 'cp "$1" "$2" && sha256sum "$1" >/dev/null'
    get_base = _median_time(lambda: [_sh(cat, str(p), str(dest / p.name)) for p in stored],
                            repeat, lambda: _fresh(dest))
    label = f"{len(sources)} x {human_size(total // len(sources))}"
    put_ratio = base / put
    get_ratio = get_base / get
    return [
        Result(f"put {human_size(total)} ({label})", put, base, total, "ratio >= 0.70",
               put_ratio >= 0.7, "baseline: sha256sum && cp"),
        Result("  same, baseline + fsync", put, base_sync, total, "(info)", True,
               "baseline: sha256sum && cp && sync DEST"),
        Result(f"verified get {human_size(total)}", get, get_base, total, "ratio >= 0.80",
               get_ratio >= 0.8, "baseline: cp && sha256sum"),
    ]


# -- (c) a large store ---------------------------------------------------------------------------
def _write_blob(blob_root: Path, data: bytes) -> tuple[Digest, int]:
    """Write a small blob straight to its sharded path (the bulk path: no temp file, no
    fsync: a benchmark fixture, not how the store writes)."""
    digest = Digest.of_bytes(data)
    path = blob_root / digest.hex[:2] / digest.hex[2:]
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
    except FileExistsError:
        return digest, len(data)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    return digest, len(data)


def build_large_store(root: Path, blobs: int, releases: int) -> dict[str, int]:
    """A consistent store: data blobs, release manifests referencing them and one `prod` tag
    per model name, all as files, indexed in one transaction (bulk rows for the data blobs,
    the store's own release and tag indexing for the rest)."""
    names = max(1, math.ceil(releases / RELEASES_PER_NAME))
    data_count = blobs - releases - names  # manifests and tag events are blobs too
    if data_count < names + 2:
        raise SystemExit(f"--blobs {blobs} is too few for --releases {releases}")
    with Store.open(str(root)) as store:
        blob_root = store.backend.blob_root  # type: ignore[attr-defined]
        for i in range(256):
            (blob_root / f"{i:02x}").mkdir(exist_ok=True)
        data: list[BlobRef] = []
        rows = []
        now = time.time()
        for i in range(data_count):
            payload = f"kiln bench blob {i}\n".encode() + os.urandom(32)
            digest, size = _write_blob(blob_root, payload)
            data.append(BlobRef(digest, size))
            kind = "weights" if i < names else ("hlo" if i % 2 else "executable")
            rows.append({"digest": str(digest), "size": size, "kind": kind, "created_at": now})
        pool = data[names:]
        created = "2025-01-01T00:00:00+00:00"
        latest: dict[str, Digest] = {}
        with write_transaction(store.engine) as conn:
            conn.execute(BlobRow.__table__.insert(), rows)  # type: ignore[attr-defined]
            for r in range(releases):
                name = f"model-{r % names:05d}"
                graphs = []
                for g in range(GRAPHS_PER_RELEASE):
                    k = (r * GRAPHS_PER_RELEASE + g) * 2
                    graphs.append(Graph(
                        kind="token_generation", bucket={"batch": 1, "seq": 128 << g},
                        signature={"inputs": [], "outputs": []},
                        hlo=pool[k % len(pool)], executable=pool[(k + 1) % len(pool)],
                        format="neff", compiler=CompilerInfo("neuronx-cc", "2.15.0", ("-O2",)),
                        hlo_key=f"hlo-{r}-{g}", compile_seconds=1.0,
                    ))
                release = Release(
                    name=name, target="inf2",
                    source=Source("causal-lm", "arch", {}, (data[r % names],)),
                    graphs=tuple(graphs),
                    provenance=Provenance("0.1.0", created, "bench", "bench"),
                    annotations={"release": str(r)},
                )
                digest, size = _write_blob(blob_root, release.to_bytes())
                index_release(conn, digest, size, release)
                latest[name] = digest
            for i, (name, digest) in enumerate(sorted(latest.items())):
                event = TagEvent(name, "prod", str(digest), None, now + i * 1e-3, "bench",
                                 "bench", "bench")
                event_digest, size = _write_blob(blob_root, event.to_bytes())
                conn.execute(BlobRow.__table__.insert(), [{  # type: ignore[attr-defined]
                    "digest": str(event_digest), "size": size, "kind": "tag-event",
                    "created_at": now}])
                apply_tag_event(conn, event, str(event_digest))
    return {"blobs": data_count + releases + len(latest), "releases": releases,
            "tags": len(latest)}


def _kiln_command() -> list[str]:
    script = Path(sys.executable).with_name("kiln")
    return [str(script)] if script.exists() else [sys.executable, "-m", "kiln"]


def bench_large(work: Path, blobs: int, releases: int, repeat: int) -> tuple[list[Result], float]:
    root = work / "large-store"
    _fresh(root)
    start = time.perf_counter()
    built = build_large_store(root, blobs, releases)
    build_s = time.perf_counter() - start
    env = {**os.environ, "KILN_STORE": str(root)}
    env.pop("KILN_INDEX_URL", None)
    stats = json.loads(subprocess.run([*_kiln_command(), "stats", "--json"], env=env, check=True,
                                      capture_output=True, text=True).stdout)
    if (stats["blobs"], stats["releases"]) != (built["blobs"], built["releases"]):
        raise SystemExit(f"the large store is not what was built: {stats} vs {built}")
    os.sync()
    results = []
    for command in ("ls", "stats"):
        times = []
        for _ in range(max(repeat, 3)):
            start = time.perf_counter()
            out = subprocess.run([*_kiln_command(), command], env=env, check=True,
                                 capture_output=True)
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        results.append(Result(
            f"kiln {command} ({built['blobs']:,} blobs, {releases:,} releases)", median, None,
            None, "< 1 s", median < 1.0,
            f"max {max(times):.2f} s of {len(times)}; {len(out.stdout):,} B of output",
        ))
    return results, build_s


# -- report --------------------------------------------------------------------------------------
def render(results: Sequence[Result], build_s: float | None) -> str:
    rows = []
    for r in results:
        kiln = f"{r.kiln_s:.2f} s" + (f" ({_mbps(r.nbytes, r.kiln_s)})" if r.nbytes else "")
        base = "-" if r.baseline_s is None else f"{r.baseline_s:.2f} s" + (
            f" ({_mbps(r.nbytes, r.baseline_s)})" if r.nbytes else "")
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}"
        verdict = "info" if r.goal == "(info)" else ("ok" if r.ok else "MISSED")
        rows.append([r.name, kiln, base, ratio, r.goal, verdict, r.note])
    table = render_table(["MEASUREMENT", "KILN", "BASELINE", "RATIO", "GOAL", "", "NOTE"], rows)
    lines = [table]
    if build_s is not None:
        lines.append(f"\nlarge store built in {build_s:.1f} s (bulk; not a store operation)")
    lines.append("warm page cache throughout (dropping caches needs root); medians of repeats")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=parse_size, default=GiB,
                        help="total bytes for put/get (default 1GiB)")
    parser.add_argument("--files", type=int, default=8, help="files the size is split into")
    parser.add_argument("--blobs", type=int, default=100_000, help="blobs in the large store")
    parser.add_argument("--releases", type=int, default=10_000,
                        help="releases in the large store")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (median)")
    parser.add_argument("--skip-large", action="store_true", help="only put/get")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where to make the scratch folder (default: system temp)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="kiln-bench-", dir=args.workdir))
    try:
        sources = make_sources(work / "src", args.size, args.files)
        results = bench_put_get(work, sources, args.repeat)
        build_s = None
        if not args.skip_large:
            large, build_s = bench_large(work, args.blobs, args.releases, args.repeat)
            results += large
    finally:
        if args.keep:
            print(f"scratch kept in {work}", file=sys.stderr)
        else:
            _fresh(work)
            work.rmdir()
    if args.json:
        print(json.dumps({
            "results": [{**asdict(r), "ratio": r.ratio} for r in results],
            "large_store_build_s": build_s, "size": args.size, "files": args.files,
            "warm_cache": True,
        }, indent=2))
    else:
        print(render(results, build_s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
