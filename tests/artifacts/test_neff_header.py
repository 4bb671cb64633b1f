"""NEFF headers parsed from files built with the documented 1024-byte layout; `kiln verify`
and `kiln show` on NEFF blobs."""

from __future__ import annotations

import gzip
import struct
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from artifacts.digest import Digest, canonical_json
from artifacts.index.db import write_transaction
from artifacts.neff import HEADER_SIZE, NeffError, NeffHeader, read_neff_header
from artifacts.records import COMPILATION_MEDIA_TYPE
from artifacts.reindex import index_compilation
from artifacts.store import Store
from artifacts.verify import verify_store
from kiln.cli import cli
from tests.helpers.neuron_helpers import NEFF_UUID, NEURON_VERSION, neff_bytes


def test_fields_from_the_documented_offsets() -> None:
    data = neff_bytes(name="bert-encode-b1s128", num_tpb=2, lnc_size=2, version=(2, 1))
    header = NeffHeader.parse(data)
    assert header.package_version == 1
    assert (header.header_size, header.data_size) == (1024, len(data) - 1024)
    assert (header.version_major, header.version_minor, header.version) == (2, 1, "2.1")
    assert header.build_version == NEURON_VERSION
    assert (header.num_tpb, header.requested_tpb_count, header.lnc_size) == (2, 2, 2)
    assert header.name == "bert-encode-b1s128"
    assert header.uuid == str(NEFF_UUID)
    assert header.hash == bytes(range(32)).hex()
    assert header.compressed and header.file_size == len(data)
    # the payload really is the gzip tarball the header says
    assert gzip.decompress(data[HEADER_SIZE:])[257:262] == b"ustar"
    assert "NEFF 2.1" in header.describe() and "LNC 2" in header.describe()


def test_fast_loading_neff_is_uncompressed() -> None:
    header = NeffHeader.parse(neff_bytes(compressed=False))
    assert not header.compressed and "uncompressed" in header.describe()


def test_prefix_with_the_file_size() -> None:
    data = neff_bytes()
    assert NeffHeader.parse(data[:1026], size=len(data)) == NeffHeader.parse(data)
    with pytest.raises(NeffError, match="prefix too short"):
        NeffHeader.parse(data[:1024], size=len(data))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d[:500], "truncated NEFF: 500 bytes"),
        (lambda d: b"", "truncated NEFF: 0 bytes"),
        (lambda d: d[:-10], "follow the header, but the file has"),
        (lambda d: d + b"\0" * 3, "follow the header, but the file has"),
        (lambda d: d[:8] + struct.pack("<Q", 512) + d[16:], "header_size is 512, expected 1024"),
        (lambda d: b"PK\x03\x04" + bytes(2000), "header_size is 0"),
    ],
)
def test_inconsistent_files_are_clear_errors(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(NeffError, match=message):
        NeffHeader.parse(mutate(neff_bytes()))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000))
def test_any_bytes_give_a_header_or_neff_error(data: bytes) -> None:
    try:
        NeffHeader.parse(data)
    except NeffError:
        pass


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 1100), st.integers(0, 255)), max_size=20),
    st.integers(-40, 40),
    st.one_of(st.none(), st.integers(0, 5000)),
)
def test_mutated_neffs_give_a_header_or_neff_error(
    edits: list[tuple[int, int]], resize: int, size: int | None
) -> None:
    data = bytearray(neff_bytes(name="x" * 40))
    for index, value in edits:
        if index < len(data):
            data[index] = value
    data = data[: len(data) + resize] if resize < 0 else data + bytes(resize)
    try:
        header = NeffHeader.parse(bytes(data), size)
    except NeffError:
        return
    assert header.header_size == 1024
    assert header.data_size == (len(data) if size is None else size) - 1024


def _record_neff(store: Store, neff: bytes, hlo_key: str) -> Digest:
    """A neff compilation in the store, as the pipeline or a cache import records it."""
    exe = store.put_bytes(neff, kind="executable")
    hlo = store.put_bytes(f"hlo {hlo_key}".encode(), kind="hlo")
    record = {
        "mediaType": COMPILATION_MEDIA_TYPE,
        "hlo_key": hlo_key,
        "status": "ok",
        "compiler": "neuronx-cc",
        "compiler_version": NEURON_VERSION,
        "flags": [],
        "target": "inf2",
        "hlo_digest": str(hlo.digest),
        "executable_digest": str(exe.digest),
        "executable_format": "neff",
        "log_digest": None,
        "seconds": 1.0,
        "error": None,
        "created_at": time.time(),
    }
    put = store.put_bytes(canonical_json(record), kind="compilation")
    with write_transaction(store.engine) as conn:
        index_compilation(conn, str(put.digest), record)
    return exe.digest


def test_verify_names_a_neff_blob_with_a_bad_header(store: Store) -> None:
    good = _record_neff(store, neff_bytes(), "sha256:" + "a" * 64)
    bad_bytes = bytearray(neff_bytes(name="broken"))
    struct.pack_into("<Q", bad_bytes, 16, 99)  # data_size no longer matches the file
    bad = _record_neff(store, bytes(bad_bytes), "sha256:" + "b" * 64)
    store.put_bytes(b"not a neff, and not said to be one", kind="executable")
    report = verify_store(store)
    assert report.bad == [str(bad)]
    (problem,) = report.problems
    assert "bad NEFF header" in problem.problem and "99 bytes follow the header" in problem.problem
    assert read_neff_header(store, good).name == "model"


def test_show_prints_a_neff_header(store: Store, store_dir: Path) -> None:
    digest = _record_neff(store, neff_bytes(name="shown", num_tpb=4), "sha256:" + "c" * 64)
    result = CliRunner().invoke(cli, ["show", str(digest), "--store", str(store_dir)])
    assert result.exit_code == 0, result.output
    assert "neff:     NEFF 2.0" in result.output and "4 TPB" in result.output
    assert "name shown" in result.output
    as_json = CliRunner().invoke(cli, ["show", str(digest), "--store", str(store_dir), "--json"])
    assert '"num_tpb": 4' in as_json.output
