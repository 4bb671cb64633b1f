"""Shared fixtures: real stores on disk under tmp_path."""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from artifacts.digest import Digest
from artifacts.manifest import BlobRef, CompilerInfo, Graph, Provenance, Release, Source
from artifacts.store import Store
from pipeline.compile.xla_cpu import request_xla_flags
from tests.servers.pg_server import pg_server, pg_url  # noqa: F401 - the session's PostgreSQL
from tests.servers.s3_server import s3_server  # noqa: F401 - the session's SeaweedFS

os.environ.setdefault("PJRT_DEVICE", "CPU")
# Before anything in this process uses jaxlib: XLA reads XLA_FLAGS once, and the xla-cpu
# backend refuses to compile here without its own flags (pipeline/compile/xla_cpu.py).
request_xla_flags()
# No-op records of `kiln compile` (pipeline/noop.py) stay with this session, not in ~/.cache.
os.environ.setdefault("KILN_NOOP_DIR", tempfile.mkdtemp(prefix="kiln-noop-"))


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def index_kind(request: pytest.FixtureRequest) -> str:
    """The index engine of `store`: SQLite unless a test parametrizes it (indirect=True)."""
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture
def index_url(index_kind: str, store_dir: Path, request: pytest.FixtureRequest) -> str:
    """SQLite beside the store, or a fresh database on the session's PostgreSQL."""
    if index_kind == "postgres":
        return request.getfixturevalue("pg_server").new_url()
    return f"sqlite:///{store_dir / 'index.db'}"


@pytest.fixture
def store(store_dir: Path, index_url: str):  # type: ignore[no-untyped-def]
    with Store.open(str(store_dir), index_url) as s:
        yield s


def build_release(
    store: Store,
    name: str = "m",
    seqs: tuple[int, ...] = (32, 64),
    flags: tuple[str, ...] = (),
    compiler_version: str = "test-1",
    weights: bytes = b"weights",
) -> Release:
    """A small but complete release whose blobs are all in `store`."""

    def put(data: bytes) -> BlobRef:
        result = store.put_bytes(data)
        return BlobRef(result.digest, result.size)

    graphs = tuple(
        Graph(
            kind="encode",
            bucket={"batch": 1, "seq": seq},
            signature={"inputs": [], "outputs": []},
            hlo=put(f"hlo {name} {seq}".encode()),
            executable=put(f"exe {name} {seq} {flags} {compiler_version}".encode()),
            format="xla-cpu",
            compiler=CompilerInfo("xla-cpu", compiler_version, flags),
            hlo_key=f"key-{seq}",
            compile_seconds=0.5,
            log=put(f"log {seq}".encode()),
        )
        for seq in seqs
    )
    return Release(
        name=name,
        target="cpu",
        source=Source("encoder", "arch-1", {"hidden": 8}, (put(weights),)),
        graphs=graphs,
        provenance=Provenance("0.1.0", dt.datetime.now(dt.UTC).isoformat(), "h", "u"),
    )


@pytest.fixture
def make_release(store: Store) -> Callable[..., Digest]:
    def make(tag: str | None = None, **kwargs: object) -> Digest:
        digest = store.put_release(build_release(store, **kwargs))  # type: ignore[arg-type]
        if tag:
            store.tag(str(digest), tag)
        return digest

    return make
