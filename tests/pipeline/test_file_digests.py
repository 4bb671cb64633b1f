"""The persistent file-digest record: unchanged files are not read again, touched ones are
hashed once more, changed ones get a new digest; many processes share one record."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.file_digests import FileDigests, hash_file

OLD = time.time() - 3600  # mtimes well outside the racily-clean window


class CountingHasher:
    def __init__(self) -> None:
        self.calls: list[Path] = []

    def __call__(self, path: Path) -> str:
        self.calls.append(path)
        return hash_file(path)


def _write(path: Path, data: bytes, mtime: float = OLD) -> None:
    path.write_bytes(data)
    os.utime(path, (mtime, mtime))


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_unchanged_file_is_not_read_again(tmp_path: Path) -> None:
    f = tmp_path / "model.safetensors"
    _write(f, b"weights" * 1000)
    db = tmp_path / "digests.db"
    first = CountingHasher()
    assert FileDigests(db, first).digest(f) == _sha(b"weights" * 1000)
    assert len(first.calls) == 1

    def refuse(path: Path) -> str:
        raise AssertionError(f"{path} was read again")

    # A new instance (as a new process would be) answers from the record alone.
    assert FileDigests(db, refuse).digest(f) == _sha(b"weights" * 1000)


def test_touched_file_with_same_bytes_is_hashed_once(tmp_path: Path) -> None:
    f = tmp_path / "w.safetensors"
    _write(f, b"same bytes")
    db = tmp_path / "digests.db"
    FileDigests(db).digest(f)
    os.utime(f, (OLD + 10, OLD + 10))
    counter = CountingHasher()
    digests = FileDigests(db, counter)
    assert digests.digest(f) == _sha(b"same bytes")
    assert digests.digest(f) == _sha(b"same bytes")
    assert FileDigests(db, counter).digest(f) == _sha(b"same bytes")
    assert len(counter.calls) == 1


def test_changed_bytes_give_a_new_digest(tmp_path: Path) -> None:
    f = tmp_path / "w.safetensors"
    db = tmp_path / "digests.db"
    _write(f, b"version one")
    assert FileDigests(db).digest(f) == _sha(b"version one")
    _write(f, b"version two")  # same size, same (old) mtime: the inode or size must tell
    f2 = tmp_path / "tmp"
    _write(f2, b"version 2!!")
    os.replace(f2, f)  # atomic replace: a new inode, same size and mtime
    assert FileDigests(db).digest(f) == _sha(b"version 2!!")


def test_recently_modified_file_is_not_recorded(tmp_path: Path) -> None:
    """Racily clean: a write in the same mtime tick could keep (size, mtime, inode)."""
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"fresh")
    db = tmp_path / "digests.db"
    FileDigests(db).digest(f)
    counter = CountingHasher()
    assert FileDigests(db, counter).digest(f) == _sha(b"fresh")
    assert len(counter.calls) == 1


def test_unwritable_record_falls_back_to_hashing(tmp_path: Path) -> None:
    f = tmp_path / "w.safetensors"
    _write(f, b"abc")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    assert FileDigests(blocker / "digests.db").digest(f) == _sha(b"abc")


_RACE = """
import sys
from pathlib import Path
from pipeline.file_digests import FileDigests
db, files = Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]
for _ in range(20):
    d = FileDigests(db)
    for f in files:
        print(f.name, d.digest(f))
    d.close()
"""


def test_processes_racing_on_one_record_agree(tmp_path: Path) -> None:
    files = []
    for i in range(6):
        f = tmp_path / f"shard-{i}.safetensors"
        _write(f, bytes([i]) * (10_000 + i))
        files.append(f)
    db = tmp_path / "digests.db"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACE, str(db), *map(str, files)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(6)
    ]
    expected = {f.name: _sha(f.read_bytes()) for f in files}
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        lines = out.split("\n")[:-1]
        assert len(lines) == 20 * len(files)
        for line in lines:
            name, digest = line.split()
            assert digest == expected[name]

    def refuse(path: Path) -> str:
        raise AssertionError(f"{path} was read again")

    for f in files:
        assert FileDigests(db, refuse).digest(f) == expected[f.name]


def test_weights_identity_uses_the_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Planning a folder source twice reads its weight files once."""
    from pipeline import file_digests
    from pipeline.sources import weights_identity
    from pipeline.spec import ModelSource, ModelSpec

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    _write(folder / "model.safetensors", b"x" * 4096)
    monkeypatch.setenv(file_digests.DIGESTS_ENV, str(tmp_path / "d.db"))
    model = ModelSpec(
        "m", ModelSource(kind="folder", path=str(folder)), "encoder", (1,), (8,),
        "float32", ("cpu",), {}, "latest",
    )
    first = weights_identity(model)
    counter = CountingHasher()
    monkeypatch.setattr(file_digests, "_shared", FileDigests(tmp_path / "d.db", counter))
    assert weights_identity(model) == first
    assert counter.calls == []
