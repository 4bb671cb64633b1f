"""Worker processes for the gc and reindex race tests (`tests/artifacts/test_gc_races.py`, ...).

Each worker is a long-lived real process with its own engine on the shared store and index,
driven by one JSON command per stdin line and answering one JSON line each: so a test can
put a writer's step exactly between gc's plan and its sweep, or let them run freely, many
times, without paying a process start per try.

    python tests/helpers/race_workers.py gc STORE INDEX      # {"op": "plan"} / {"op": "sweep"}
    python tests/helpers/race_workers.py writer STORE INDEX  # {"op": "tag"|"tag-until"|"reuse"|...}
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve()
sys.path.insert(0, str(SCRIPT.parents[2]))

from artifacts.digest import Digest  # noqa: E402
from artifacts.errors import ArtifactError  # noqa: E402
from artifacts.manifest import Provenance, Release  # noqa: E402
from artifacts.refs import parse_tag_name  # noqa: E402
from artifacts.store import Store  # noqa: E402


class Worker:
    """A child process speaking the one-line JSON protocol above."""

    def __init__(self, kind: str, store: str, index: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), kind, store, index],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.ask({"op": "ping"}) == {"ok": True}

    def send(self, command: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def receive(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker exited with {self.proc.wait()}")
        return json.loads(line)

    def ask(self, command: dict[str, Any]) -> dict[str, Any]:
        self.send(command)
        return self.receive()

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


# -- in the worker process ----------------------------------------------------------------------
def _gc(store: Store, state: dict[str, Any], command: dict[str, Any]) -> dict[str, Any]:
    from artifacts.gc import GcPolicy, execute_gc, plan_gc  # noqa: PLC0415

    op = command["op"]
    if op in ("plan", "plan-sweep"):
        state["plan"] = plan_gc(store, GcPolicy())  # the CLI's defaults: 7 days, 1 hour
        if op == "plan":
            return {"planned": [str(b.digest) for b in state["plan"].delete]}
        time.sleep(command.get("pause", 0.0))
    report = execute_gc(store, state.pop("plan"))
    return {"report": report.to_json()}


def _writer(store: Store, state: dict[str, Any], command: dict[str, Any]) -> dict[str, Any]:
    """A tag move, or the store operations of a compile that reuses an old release's blobs:
    `reuse` puts them again (as a re-trace stores the weights) or, with `hit`, looks them up
    as direct hits do; `publish` then stores a new release of them and tags it."""
    op = command["op"]
    try:
        if op == "tag":
            return {"move": store.tag(command["source"], command["tag"]).digest}
        if op == "tag-until":
            moves = []
            while not Path(command["stop"]).exists():
                target = command["targets"][len(moves) % len(command["targets"])]
                moves.append(store.tag(target, command["tag"], reason=f"move {len(moves)}").at)
                time.sleep(command.get("pause", 0.01))
            return {"moves": moves}
        if op == "reuse":
            old = store.load_release(Digest.parse(command["release"]))
            if command.get("hit"):
                _direct_hits(store, old)
            else:
                for _, ref in old.blob_refs():
                    store.put_bytes(store.read_bytes(ref.digest))
            state["reused"] = old
            return {"reused": len(list(old.blob_refs()))}
        if op == "publish":
            if "reused" not in state:
                return {"error": "the reuse step failed", "type": "none"}
            old: Release = state.pop("reused")
            release = replace(
                old,
                provenance=Provenance(
                    old.provenance.kiln_version, dt.datetime.now(dt.UTC).isoformat(), "h", "u"
                ),
            )
            digest = store.put_release(release)
            store.move_tag(parse_tag_name(command["tag"]), digest, "kiln compile (race test)")
            return {"published": str(digest)}
    except ArtifactError as exc:
        return {"error": str(exc), "type": type(exc).__name__}
    raise ValueError(f"unknown op {op!r}")


def _direct_hits(store: Store, old: Release) -> None:
    """What `kiln compile` does for a direct hit: find the compilation, and (where this Kiln
    can) refresh the age of the blobs it will reuse, as `pipeline.run.Run` does."""
    from pipeline.jobs import find_compilation  # noqa: PLC0415

    for graph in old.graphs:
        if find_compilation(store, graph.hlo_key, graph.signature) is None:
            raise ArtifactError(f"no direct hit for {graph.hlo_key}")
    touch = getattr(store, "touch_blobs", None)
    if touch is not None:
        missing = touch(str(ref.digest) for _, ref in old.blob_refs())
        if missing:
            raise ArtifactError(f"reused blobs are gone: {missing}")


def main() -> None:
    kind, store_url, index_url = sys.argv[1:4]
    handler = {"gc": _gc, "writer": _writer}[kind]
    state: dict[str, Any] = {}
    with Store.open(store_url, index_url) as store:
        for line in sys.stdin:
            command = json.loads(line)
            answer = {"ok": True} if command["op"] == "ping" else handler(store, state, command)
            print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
