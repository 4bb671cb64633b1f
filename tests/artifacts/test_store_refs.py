"""Tag ref objects beside the blobs: every move writes one, a store with no index resolves,
lists and reads history from them, concurrent moves keep one chain that readers never see
torn, and read commands create nothing (no store, no database, no overwritten file)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from artifacts.backends.local import LocalBlobBackend
from artifacts.digest import Digest
from artifacts.errors import IndexRequired, ReferenceNotFound, StoreIndexError
from artifacts.inspect import list_releases, show_release
from artifacts.records import TagEvent
from artifacts.store import Store
from artifacts.tagrefs import read_tag_ref
from tests.conftest import build_release
from tests.helpers.cli_helpers import kiln_here
from tests.helpers.store_helpers import TAG, kiln, worker_command
from tests.servers.s3_server import free_ports


def run_kiln(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
             *args: str | Path) -> tuple[int, str, str]:
    """`kiln ARGS` in this process (tests.helpers.cli_helpers.kiln_here), with the root
    options' environment variables unset for the call and restored afterwards."""
    for name in ("KILN_STORE", "KILN_INDEX_URL"):
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)
    result = kiln_here(capsys, *args)
    return result.code, result.stdout, result.stderr


def _drop_index(store_dir: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{store_dir / 'index.db'}{suffix}").unlink(missing_ok=True)


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under root with its size and mtime: what a read must leave unchanged."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            st = path.lstat()
            out[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def _moved_store(store_dir: Path) -> tuple[list[Digest], list[dict[str, object]]]:
    """Three releases of `m`, `m:prod` moved four times, `m:dev` once; the index's history."""
    with Store.open(str(store_dir)) as store:
        digests = [
            store.put_release(build_release(store, seqs=(32,), weights=f"w{i}".encode()))
            for i in range(3)
        ]
        for i, d in enumerate([0, 1, 2, 0]):
            store.tag(str(digests[d]), "m:prod", reason=f"move {i}")
        store.tag(str(digests[1]), "m:dev")
        history = [m.__dict__ for m in store.history("m:prod")]
    return digests, history


def test_every_move_writes_the_ref_object_and_chains_its_event(store_dir: Path) -> None:
    digests, _ = _moved_store(store_dir)
    backend = LocalBlobBackend(store_dir, create=False)
    ref = read_tag_ref(backend, "m", "prod")
    assert ref is not None and ref.digest == str(digests[0])
    assert json.loads((store_dir / "refs" / "m" / "prod").read_bytes())["digest"] == ref.digest
    # The chain of events, newest first, from the ref object alone.
    chain = []
    event_digest = ref.event
    while event_digest:
        data = (backend.path_of(Digest.parse(event_digest))).read_bytes()
        event = TagEvent.from_json(json.loads(data), event_digest)
        chain.append(event)
        event_digest = event.previous_event
    assert [e.digest for e in chain] == [str(digests[i]) for i in (0, 2, 1, 0)]
    assert [e.previous for e in chain] == [str(digests[i]) for i in (2, 1, 0)] + [None]


def test_a_store_without_index_resolves_lists_and_reads_history(
    store_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    digests, history = _moved_store(store_dir)
    _drop_index(store_dir)
    before = _tree(store_dir)
    with Store.open(str(store_dir), create=False) as store:
        assert not store.has_index
        assert store.resolve("m:prod").digest == digests[0]
        assert store.resolve("m:dev").digest == digests[1]
        assert store.resolve(f"m@{digests[2]}").name == "m"
        assert store.resolve(digests[1].hex[:10]).digest == digests[1]  # a tagged prefix
        assert [m.__dict__ for m in store.history("m:prod")] == history
        listed = {r.digest: r.tags for r in list_releases(store, "m")}
        assert listed == {str(digests[0]): ("prod",), str(digests[1]): ("dev",)}
        view = show_release(store, "m:dev")
        assert view.tags == ("m:dev",) and view.release.name == "m"
        with pytest.raises(ReferenceNotFound, match="closest: m:prod"):
            store.resolve("m:prd")
        with pytest.raises(IndexRequired, match="moving tag m:prod needs the store's SQL index"):
            store.tag(str(digests[1]), "m:prod")
    for args in (("ls",), ("show", "m:prod"), ("diff", "m:prod", "m:dev")):
        code, out, err = run_kiln(monkeypatch, capsys, "--store", store_dir, *args)
        assert code == 0, (args, err)
    code, out, err = run_kiln(monkeypatch, capsys, "--store", store_dir, "ls")
    assert "prod" in out and "dev" in out
    code, out, err = run_kiln(monkeypatch, capsys, "--store", store_dir, "history", "m:prod",
                              "--json")
    printed = [{k: v for k, v in m.items() if k != "previous_event"} for m in history]
    assert code == 0 and json.loads(out) == printed  # the CLI prints moves without the chain
    for args in (("stats",), ("gc", "--dry-run"), ("verify",)):
        code, out, err = run_kiln(monkeypatch, capsys, "--store", store_dir, *args)
        assert code == 1
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "needs the store's SQL index" in lines[0], err
        assert f"there is no index at {store_dir / 'index.db'}" in lines[0]
    proc = kiln(store_dir, "show", "m:prod", "--json")  # and once as a real process
    assert proc.returncode == 0 and json.loads(proc.stdout)["tags"] == ["m:prod"], proc.stderr
    assert _tree(store_dir) == before  # nothing written: no index created, no ref touched


def test_a_tag_older_than_ref_objects_resolves_from_the_index_and_joins_the_chain(
    store_dir: Path,
) -> None:
    digests, _ = _moved_store(store_dir)
    (store_dir / "refs" / "m" / "prod").unlink()  # as a store tagged before ref objects
    with Store.open(str(store_dir)) as store:
        assert store.resolve("m:prod").digest == digests[0]
        last_event = store.history("m:prod")  # from the index
        store.tag(str(digests[2]), "m:prod")
        ref = read_tag_ref(store.backend, "m", "prod")  # type: ignore[arg-type]
        assert ref is not None and ref.digest == str(digests[2])
        event = TagEvent.from_json(json.loads(store.read_bytes(Digest.parse(ref.event))), "e")
        assert event.previous == str(digests[0])
        assert event.previous_event is not None and len(last_event) == 4


_READER = """
import json, sys, time
from pathlib import Path
from artifacts.backends.local import LocalBlobBackend
from artifacts.tagrefs import read_tag_ref
backend = LocalBlobBackend(sys.argv[1], create=False)
stop = Path(sys.argv[2])
seen, reads = set(), 0
print("ready", flush=True)
while not stop.exists():
    ref = read_tag_ref(backend, "m", "prod")
    if ref is not None:
        seen.add(ref.digest)
    reads += 1
    time.sleep(0.001)
print(json.dumps({"reads": reads, "seen": sorted(seen)}), flush=True)
"""


def test_concurrent_moves_keep_one_chain_and_readers_never_see_a_torn_ref(
    tmp_path: Path,
) -> None:
    store_dir = tmp_path / "store"
    workers, moves = 4, 6
    Store.open(str(store_dir)).close()
    go, stop = tmp_path / "go", tmp_path / "stop"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    reader = subprocess.Popen([sys.executable, "-c", _READER, str(store_dir), str(stop)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert reader.stdout is not None and reader.stdout.readline().strip() == "ready"
    procs = [
        subprocess.Popen(
            worker_command("tagger", "--store", str(store_dir), "--worker", str(i),
                           "--moves", str(moves), "--go", str(go)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for i in range(workers)
    ]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    go.touch()
    releases = set()
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        releases.add(json.loads(out.strip().splitlines()[-1])["release"])
    stop.touch()
    out, err = reader.communicate(timeout=60)
    assert reader.returncode == 0, err  # a torn ref object would fail to parse
    read = json.loads(out.strip().splitlines()[-1])
    assert read["reads"] > 0 and set(read["seen"]) <= releases

    with Store.open(str(store_dir)) as store:
        indexed = [m.__dict__ for m in store.history(TAG)]
        final = store.tags("m")[("m", "prod")]
    _drop_index(store_dir)
    with Store.open(str(store_dir), create=False) as store:
        walked = [m.__dict__ for m in store.history(TAG)]
        assert store.resolve(TAG).digest == Digest.parse(final)
    assert len(walked) == workers * moves
    assert walked == indexed  # the chain from the ref object is the index's history
    for newer, older in zip(walked, walked[1:], strict=False):
        assert newer["previous"] == older["digest"]
    assert walked[-1]["previous"] is None


def test_an_unreachable_index_server_does_not_stop_reads(
    store_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    digests, history = _moved_store(store_dir)
    (port,) = free_ports(1)
    down = f"postgresql+psycopg://kiln:secret@127.0.0.1:{port}/kiln"
    with caplog.at_level("WARNING", logger="kiln"), Store.open(
        str(store_dir), down, create=False
    ) as store:
        assert not store.has_index
        assert store.resolve("m:prod").digest == digests[0]
        assert [m.__dict__ for m in store.history("m:prod")] == history
        with pytest.raises(IndexRequired) as raised:
            store.require_index("kiln stats")
    message = str(raised.value)
    assert f"index postgresql+psycopg://kiln:***@127.0.0.1:{port}/kiln is unreachable" in message
    assert "secret" not in message and "check that it is reachable" in message
    assert [r.getMessage() for r in caplog.records if r.name == "kiln"][0].startswith(
        "kiln: warning: index postgresql+psycopg://kiln:***@"
    )


# -- read commands create nothing ------------------------------------------------------------------
def test_read_commands_on_missing_paths_create_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nonexistent"
    for url in (str(missing), f"file://{missing}"):
        for args in (("ls",), ("show", "m:prod"), ("history", "m:prod"), ("stats",)):
            code, out, err = run_kiln(monkeypatch, capsys, "--store", url, *args)
            assert code == 1, out
            assert err == f"kiln: error: store folder {missing} does not exist\n"
            assert not missing.exists()
    proc = kiln(missing, "ls")  # a real process too
    assert proc.returncode == 1 and "does not exist" in proc.stderr and not missing.exists()
    monkeypatch.chdir(tmp_path)
    code, _, err = run_kiln(monkeypatch, capsys, "--store", "file://", "ls")
    assert code == 1 and "has no path" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_read_commands_leave_empty_and_foreign_index_files_untouched(
    store_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    digests, _ = _moved_store(store_dir)
    empty = tmp_path / "empty.db"
    empty.touch()
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not a database\n")
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE people (name TEXT)")
    originals = {p: p.read_bytes() for p in (empty, text_file, foreign)}

    def run(index: Path, *args: str) -> tuple[int, str, str]:
        return run_kiln(monkeypatch, capsys, "--store", store_dir, "--index",
                        f"sqlite:///{index}", *args)

    code, out, err = run(empty, "show", "m:prod")
    assert code == 0, err  # the ref object serves the read
    code, out, err = run(empty, "stats")
    assert code == 1 and f"the index {empty} is empty" in err
    for path, what in ((text_file, "not a SQLite database"),
                       (foreign, "a SQLite database without Kiln's schema")):
        code, out, err = run(path, "ls")
        assert code == 1, out
        assert err == f"kiln: error: index {path} is not a Kiln index ({what})\n"
        code, out, err = run(path, "reindex")
        assert code == 1 and "is not a Kiln index" in err, err
        assert "refusing to replace it" in err
    for path, data in originals.items():
        assert path.read_bytes() == data, path
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["empty.db", "notes.txt", "foreign.db", "store"]
    )
    with pytest.raises(StoreIndexError, match="not a Kiln index"):
        Store.open(str(store_dir), f"sqlite:///{foreign}", create=False)
    assert digests


def test_gc_keeps_what_a_ref_object_reaches_when_the_index_lags(store_dir: Path) -> None:
    """A crash between writing a ref object and committing its index rows leaves the ref
    ahead of the index: gc must still keep the release the ref names, and its blobs."""
    from artifacts.gc import GcPolicy, execute_gc, plan_gc  # noqa: PLC0415
    from artifacts.tagrefs import TagRef, write_tag_ref  # noqa: PLC0415

    with Store.open(str(store_dir)) as store:
        kept = store.put_release(build_release(store, weights=b"kept by its ref"))
        dropped = store.put_release(build_release(store, seqs=(16,), weights=b"garbage"))
        write_tag_ref(
            LocalBlobBackend(store_dir, create=False), TagRef("m", "prod", str(kept), None, 0.0)
        )
        policy = GcPolicy(history_grace_s=0, run_grace_s=0, min_age_s=0)
        plan = plan_gc(store, policy, now=time.time() + 10)
        doomed = {str(b.digest) for b in plan.delete}
        assert str(kept) not in doomed and str(dropped) in doomed
        execute_gc(store, plan)
        release = store.load_release(kept)
        for _, blob in release.blob_refs():
            assert store.read_bytes(blob.digest)
        assert not store.has_blob(dropped)


def test_reindex_gives_tags_from_before_ref_objects_a_ref_object(store_dir: Path) -> None:
    """A store tagged before ref objects existed has tag events but no refs: `kiln reindex`
    writes each tag's ref from its latest event, so a host without the index resolves it."""
    import shutil  # noqa: PLC0415

    from artifacts.reindex import reindex  # noqa: PLC0415

    digests, history = _moved_store(store_dir)
    shutil.rmtree(store_dir / "refs")
    reindex(str(store_dir))
    backend = LocalBlobBackend(store_dir, create=False)
    assert read_tag_ref(backend, "m", "prod").digest == str(digests[0])
    assert read_tag_ref(backend, "m", "dev").digest == str(digests[1])
    _drop_index(store_dir)
    with Store.open(str(store_dir), create=False) as store:
        assert not store.has_index
        assert store.resolve("m:prod").digest == digests[0]
        assert store.resolve("m:dev").digest == digests[1]
