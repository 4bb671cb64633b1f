"""The ``neff`` executor against a C stand-in for libnrt (tests/nrt_standin/nrt_standin.c: no
Neuron runtime or device exists here), and against the real libnrt where one and a Neuron
device are present."""

from __future__ import annotations

import ctypes
import gzip
import hashlib
import io
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from runtime_loader.errors import BadInput, LoaderError, NeffRuntimeError
from runtime_loader.executors.neff import NeffExecutable, NeuronRuntime, find_libnrt

STANDIN_SRC = Path(__file__).parent / "nrt_standin" / "nrt_standin.c"
NO_DEVICE = "no Neuron runtime/device on this machine"


def make_neff(
    name: str,
    *,
    header_size: int = 1024,
    data_size: int | None = None,
    payload: bytes | None = None,
) -> bytes:
    """A NEFF laid out as shared/RECIPES.md documents: a 1024-byte little-endian header, then
    a gzip tarball."""
    if payload is None:
        tar_buf = io.BytesIO()
        with tarfile.open(fileobj=tar_buf, mode="w") as tar:
            body = b'{"kiln": "nrt stand-in test graph"}\n'
            member = tarfile.TarInfo("neff.json")
            member.size = len(body)
            tar.addfile(member, io.BytesIO(body))
        payload = gzip.compress(tar_buf.getvalue())
    header = bytearray(1024)
    struct.pack_into("<Q", header, 0, 1)  # pkg_version
    struct.pack_into("<Q", header, 8, header_size)
    struct.pack_into("<Q", header, 16, len(payload) if data_size is None else data_size)
    struct.pack_into("<QQ", header, 24, 2, 0)  # neff_version_major, neff_version_minor
    struct.pack_into("128s", header, 40, b"kiln-test")  # neff_build_version
    struct.pack_into("<I", header, 168, 1)  # num_tpb
    struct.pack_into("32s", header, 172, hashlib.sha256(payload).digest())  # hash
    struct.pack_into("16s", header, 204, uuid.uuid4().bytes)  # uuid
    struct.pack_into("256s", header, 220, name.encode())  # name
    struct.pack_into("<I", header, 476, 1)  # requested_tpb_count
    struct.pack_into("<I", header, 552, 1)  # lnc_size
    return bytes(header) + payload


@pytest.fixture(scope="session")
def standin_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the libnrt stand-in")
    out = tmp_path_factory.mktemp("nrt_standin") / "libnrt_standin.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(out), str(STANDIN_SRC)], check=True)
    return out


def live_objects(lib_path: Path) -> int:
    """Models, tensors, tensor sets and tensor-info arrays the stand-in holds."""
    fn = ctypes.CDLL(str(lib_path)).nrt_standin_live_objects
    fn.restype = ctypes.c_long
    return int(fn())


@pytest.fixture
def runtime(standin_lib: Path) -> Iterator[NeuronRuntime]:
    rt = NeuronRuntime(standin_lib)
    yield rt
    rt.close()


def test_load_and_run(runtime: NeuronRuntime, standin_lib: Path, tmp_path: Path) -> None:
    before = live_objects(standin_lib)
    path = tmp_path / "model.neff"
    path.write_bytes(make_neff("standin:4"))
    exe = NeffExecutable.load(runtime, path.read_bytes())
    [spec_in], [spec_out] = exe.inputs, exe.outputs
    assert (spec_in.name, spec_in.dtype, spec_in.shape, spec_in.size) == (
        "input0",
        np.dtype(np.float32),
        (4,),
        16,
    )
    assert (spec_out.name, spec_out.shape) == ("output0", (4,))
    x = np.array([0.0, 1.5, -2.0, 3.25], dtype=np.float32)
    for _ in range(2):
        out = exe.run({"input0": x})
        assert list(out) == ["output0"]
        assert out["output0"].dtype == np.float32
        np.testing.assert_array_equal(out["output0"], x * 2 + 1)
        assert live_objects(standin_lib) == before + 1  # only the model: run freed the rest
    exe.close()
    exe.close()
    assert live_objects(standin_lib) == before


def test_shape_and_cast(runtime: NeuronRuntime) -> None:
    with NeffExecutable.load(runtime, make_neff("standin:2,3")) as exe:
        assert exe.inputs[0].shape == (2, 3)
        x = np.arange(6, dtype=np.int32).reshape(2, 3)  # int32 -> float32 is "same_kind"
        y = exe.run({"input0": x})["output0"]
        assert y.shape == (2, 3)
        np.testing.assert_array_equal(y, x.astype(np.float32) * 2 + 1)


@pytest.mark.parametrize(
    "neff",
    [
        make_neff("standin:4", header_size=512),
        make_neff("standin:4", data_size=7),
        make_neff("not-a-standin-model"),
        b"\x00" * 100,
    ],
    ids=["header_size", "data_size", "name", "truncated"],
)
def test_bad_neff_raises(runtime: NeuronRuntime, standin_lib: Path, neff: bytes) -> None:
    before = live_objects(standin_lib)
    with pytest.raises(NeffRuntimeError) as info:
        NeffExecutable.load(runtime, neff)
    err = info.value
    assert (err.function, err.status, err.status_name) == ("nrt_load", 2, "NRT_INVALID")
    assert isinstance(err, LoaderError)
    assert "nrt_load" in str(err) and "NRT_STATUS 2 (NRT_INVALID)" in str(err)
    assert live_objects(standin_lib) == before


def test_bad_inputs(runtime: NeuronRuntime) -> None:
    with NeffExecutable.load(runtime, make_neff("standin:4")) as exe:
        with pytest.raises(BadInput, match="missing"):
            exe.run({})
        with pytest.raises(BadInput, match="unexpected"):
            exe.run({"input0": np.zeros(4, np.float32), "other": np.zeros(1)})
        with pytest.raises(BadInput, match="shape"):
            exe.run({"input0": np.zeros(5, np.float32)})
        with pytest.raises(BadInput, match="float32"):
            exe.run({"input0": np.zeros(4, np.complex64)})


def test_execute_failure_frees_everything(runtime: NeuronRuntime, standin_lib: Path) -> None:
    with NeffExecutable.load(runtime, make_neff("standin:4")) as exe:
        before = live_objects(standin_lib)
        exe.vnc = 1  # tensors land on another core than the model's: the stand-in rejects them
        with pytest.raises(NeffRuntimeError, match=r"nrt_execute failed.*NRT_INVALID"):
            exe.run({"input0": np.zeros(4, np.float32)})
        assert live_objects(standin_lib) == before


def test_runtime_close_unloads_models(standin_lib: Path) -> None:
    before = live_objects(standin_lib)
    rt = NeuronRuntime(standin_lib)
    exe = NeffExecutable.load(rt, make_neff("standin:1"))
    assert live_objects(standin_lib) == before + 1
    rt.close()
    rt.close()
    assert live_objects(standin_lib) == before
    with pytest.raises(LoaderError, match="closed"):
        exe.run({"input0": np.zeros(1, np.float32)})
    with pytest.raises(LoaderError, match="closed"):
        NeffExecutable.load(rt, make_neff("standin:1"))


def test_find_libnrt_prefers_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KILN_LIBNRT", str(tmp_path / "libnrt.so.1"))
    assert find_libnrt() == str(tmp_path / "libnrt.so.1")
    with pytest.raises(LoaderError, match="cannot load libnrt"):
        NeuronRuntime()


def test_import_is_light() -> None:
    code = (
        "import sys, runtime_loader.executors.neff\n"
        "print(sorted(m for m in ('torch', 'jax', 'jaxlib') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    assert out.strip() == "[]"


def real_libnrt() -> str | None:
    """A real libnrt (not the stand-in) on a machine with a Neuron device, else None."""
    path = find_libnrt()
    if path is None or not os.path.exists("/dev/neuron0"):
        return None
    try:
        lib = ctypes.CDLL(path)
    except OSError:
        return None
    return None if hasattr(lib, "nrt_standin_live_objects") else path


@pytest.mark.skipif(real_libnrt() is None, reason=NO_DEVICE)
def test_real_runtime() -> None:
    """The same path on real hardware: a bad NEFF is refused by nrt_load, and a compiled one
    (``$KILN_TEST_NEFF``; the synthetic NEFFs above hold no real graph) loads and runs."""
    with NeuronRuntime(real_libnrt()) as rt:
        with pytest.raises(NeffRuntimeError) as info:
            NeffExecutable.load(rt, make_neff("standin:4", header_size=512))
        assert info.value.function == "nrt_load" and info.value.status != 0
        neff_path = os.environ.get("KILN_TEST_NEFF")
        if not neff_path:
            pytest.skip("set KILN_TEST_NEFF to a compiled .neff to execute one")
        with NeffExecutable.load(rt, Path(neff_path).read_bytes()) as exe:
            feeds = {s.name: np.zeros(s.shape, s.dtype) for s in exe.inputs}
            out = exe.run(feeds)
            assert {s.name: (s.shape, s.dtype) for s in exe.outputs} == {
                k: (v.shape, v.dtype) for k, v in out.items()
            }
