"""Benchmark resolving `name:tag` from an S3 store with no index, as a fresh deploy host does.

    .venv/bin/python bench/resolve.py              # 50 rounds
    .venv/bin/python bench/resolve.py --repeat 200 --json

The script starts a SeaweedFS server (`weed mini`) on loopback, writes a small release and
moves `m:prod` with a writer that has an index, then times a reader that has none:

(a) resolve + manifest: `Store.resolve("m:prod")` (one GET of the ref object) and
    `Store.load_release` (one GET of the manifest, verified), on an open reader store.
    The figure reported: median and p90 milliseconds, and the S3 requests each round made
    (counted with botocore's `before-send` event: expected 2).
(b) cold: the same from `Store.open(create=False)` on, client creation included (what one
    `kiln pull` process pays before its first blob).

Info row: the old path, a tag row from a local SQLite index plus the manifest GET, for
comparison (it needs the writer's index; a deploy host has none). Everything shares this
machine's cores with the server, so absolute times include contention; the request count
is the steady figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.*

from sqlalchemy import select  # noqa: E402

from artifacts.digest import Digest  # noqa: E402
from artifacts.index.models import TagRow  # noqa: E402
from artifacts.store import Store  # noqa: E402
from artifacts.table import render_table  # noqa: E402
from tests.helpers.store_helpers import make_release  # noqa: E402
from tests.servers.s3_server import BUCKET, SeaweedServer, aws_environment  # noqa: E402

REF = "m:prod"


class RequestCounter:
    """Counts the HTTP requests a boto3 client sends."""

    def __init__(self) -> None:
        self.count = 0

    def attach(self, store: Store) -> None:
        client = store.backend.client  # type: ignore[attr-defined]
        client.meta.events.register("before-send.s3.*", self._sent)

    def _sent(self, **_: Any) -> None:
        self.count += 1


def _rounds(fn: Callable[[], int], repeat: int) -> dict[str, Any]:
    times, requests = [], []
    fn()  # warm: connection set up, imports done
    for _ in range(repeat):
        start = time.perf_counter()
        requests.append(fn())
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return {
        "median_ms": round(statistics.median(times), 2),
        "p90_ms": round(times[int(0.9 * (len(times) - 1))], 2),
        "requests": max(requests),
        "rounds": repeat,
    }


def run(repeat: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="kiln-bench-resolve-") as tmp:
        root = Path(tmp)
        server = SeaweedServer(root / "server").start()
        try:
            with aws_environment(server.env):
                os.environ.pop("KILN_INDEX_URL", None)
                url = f"s3://{BUCKET}/bench/store"
                index = f"sqlite:///{root / 'writer-index.db'}"
                with Store.open(url, index) as writer:
                    digest = make_release(writer, "m", [b"weights" * 1000, b"exe" * 1000])
                    writer.tag(str(digest), REF)
                os.environ["XDG_CACHE_HOME"] = str(root / "reader-xdg")  # no index there
                reader = Store.open(url, create=False)
                assert not reader.has_index
                counter = RequestCounter()
                counter.attach(reader)

                def warm() -> int:
                    before = counter.count
                    assert reader.load_release(reader.resolve(REF).digest).name == "m"
                    return counter.count - before

                def cold() -> int:
                    with Store.open(url, create=False) as fresh:
                        local = RequestCounter()
                        local.attach(fresh)
                        fresh.load_release(fresh.resolve(REF).digest)
                        return local.count

                with Store.open(url, index, create=False) as indexed:
                    baseline_counter = RequestCounter()
                    baseline_counter.attach(indexed)

                    def with_index() -> int:
                        before = baseline_counter.count
                        with indexed.engine.connect() as conn:
                            query = select(TagRow.digest).where(
                                TagRow.name == "m", TagRow.tag == "prod"
                            )
                            found = conn.execute(query).scalar_one()
                        indexed.load_release(Digest.parse(found))
                        return baseline_counter.count - before

                    results = {
                        "resolve+manifest (no index)": _rounds(warm, repeat),
                        "cold open+resolve+manifest (no index)": _rounds(cold, repeat),
                        "index row+manifest (the old path)": _rounds(with_index, repeat),
                    }
                reader.close()
        finally:
            server.stop()
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    results = run(args.repeat)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(
        render_table(
            ["CASE", "MEDIAN ms", "P90 ms", "S3 REQUESTS", "ROUNDS"],
            [
                [name, r["median_ms"], r["p90_ms"], r["requests"], r["rounds"]]
                for name, r in results.items()
            ],
        )
    )


if __name__ == "__main__":
    main()
