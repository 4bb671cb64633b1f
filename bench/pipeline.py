"""Benchmark `kiln compile`: a cold run into a fresh store against a warm rerun of the same spec.

    .venv/bin/python bench/pipeline.py                         # workflows/examples/minilm.yaml
    .venv/bin/python bench/pipeline.py --spec workflows/examples/tiny-llama.yaml --repeat 5
    .venv/bin/python bench/pipeline.py --json

Both runs are `python -m kiln compile SPEC --store STORE --json` as fresh processes, timed
wall-clock from spawn to exit (interpreter start, planning, worker start-up, tracing and
compiling, publishing). The first run traces and compiles every graph; the second, of the
unchanged spec, must be all direct cache hits (nothing traced, nothing compiled, the release
unchanged). Goal: second / first <= 0.10. With --repeat N the second run is repeated and the
median is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from artifacts.table import render_table

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SPEC = REPO / "workflows" / "examples" / "minilm.yaml"
GOAL = 0.10


def run_compile(spec: Path, store: Path, workers: int | None) -> tuple[float, dict[str, Any]]:
    """One `kiln compile --json` in a fresh process: (wall seconds, its JSON report)."""
    env = {k: v for k, v in os.environ.items() if k not in ("KILN_STORE", "KILN_INDEX_URL")}
    env.setdefault("PJRT_DEVICE", "CPU")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    command = [sys.executable, "-m", "kiln", "compile", str(spec), "--store", str(store), "--json"]
    if workers:
        command += ["--workers", str(workers)]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"kiln compile failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds, json.loads(proc.stdout)


def _row(name: str, seconds: float, report: dict[str, Any]) -> list[str]:
    return [
        name,
        f"{seconds:.2f}s",
        str(report["jobs"]),
        str(report["compiled"]),
        str(report["direct_hits"]),
        str(report["hlo_hits"]),
        str(report["failed"]),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--spec", type=Path, default=DEFAULT_SPEC, help="spec to compile")
    parser.add_argument("--workers", type=int, default=None, help="kiln --workers (default: cores)")
    parser.add_argument("--repeat", type=int, default=1, help="second runs (median reported)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the scratch store goes")
    parser.add_argument("--keep", action="store_true", help="keep the scratch store")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="kiln-bench-pipeline-", dir=args.workdir))
    store = work / "store"
    try:
        first_s, first = run_compile(args.spec.resolve(), store, args.workers)
        seconds, reports = [], []
        for _ in range(max(1, args.repeat)):
            s, report = run_compile(args.spec.resolve(), store, args.workers)
            seconds.append(s)
            reports.append(report)
    finally:
        if args.keep:
            print(f"scratch store kept in {store}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    second_s, second = statistics.median(seconds), reports[-1]
    all_hits = all(
        r["direct_hits"] == r["jobs"] and r["compiled"] == 0 and r["hlo_hits"] == 0 for r in reports
    )
    unchanged = all(p["unchanged"] for r in reports for p in r["releases"])
    traced = any(i["trace_seconds"] > 0 for r in reports for i in r["items"])
    ratio = second_s / first_s
    ok = ratio <= GOAL and all_hits and unchanged and not traced

    if args.json:
        print(
            json.dumps(
                {
                    "spec": str(args.spec),
                    "jobs": first["jobs"],
                    "first_s": round(first_s, 3),
                    "second_s": round(second_s, 3),
                    "second_runs_s": [round(s, 3) for s in seconds],
                    "ratio": round(ratio, 4),
                    "goal": GOAL,
                    "ok": ok,
                    "second_all_direct_hits": all_hits,
                    "second_traced": traced,
                    "release_unchanged": unchanged,
                    "first": {k: v for k, v in first.items() if k != "items"},
                    "second": {k: v for k, v in second.items() if k != "items"},
                },
                indent=2,
            )
        )
        return 0
    print(f"kiln compile {args.spec} (fresh store; {os.cpu_count()} cores)\n")
    print(
        render_table(
            ["RUN", "WALL", "JOBS", "COMPILED", "DIRECT HITS", "HLO HITS", "FAILED"],
            [
                _row("first (cold store)", first_s, first),
                _row(
                    "second (unchanged)"
                    + (f", median of {len(seconds)}" if len(seconds) > 1 else ""),
                    second_s,
                    second,
                ),
            ],
        )
    )
    verdict = "ok" if ok else "MISSED"
    print(f"\nratio second/first: {ratio:.3f} (goal <= {GOAL:.2f}) {verdict}")
    print(
        f"second run: {'all direct hits' if all_hits else 'NOT all direct hits'}, "
        f"{'nothing traced' if not traced else 'TRACED'}, "
        f"release {'unchanged' if unchanged else 'CHANGED'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
