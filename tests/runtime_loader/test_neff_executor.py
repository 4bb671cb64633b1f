"""The ``neff`` executor against a C stand-in for libnrt
(tests/helpers/nrt_standin/nrt_standin.c: no Neuron runtime or device exists here), and
against the real libnrt where one and a Neuron device are present; and a NEFF release
loaded and run through `runtime_loader.load`."""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
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
from safetensors.numpy import save

import runtime_loader
from artifacts.manifest import BlobRef, CompilerInfo, Graph, Provenance, Release, Source
from artifacts.store import Store
from runtime_loader.errors import BadInput, LoaderError, NeffRuntimeError
from runtime_loader.executors import EXECUTORS, open_executor
from runtime_loader.executors.neff import NeffExecutable, NeuronRuntime, TensorSpec, find_libnrt
from runtime_loader.executors.xla_cpu import XlaCpuExecutor

STANDIN_SRC = Path(__file__).resolve().parents[1] / "helpers" / "nrt_standin" / "nrt_standin.c"
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
        out = exe.run_named({"input0": x})
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
        y = exe.run_named({"input0": x})["output0"]
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
            exe.run_named({})
        with pytest.raises(BadInput, match="unexpected"):
            exe.run_named({"input0": np.zeros(4, np.float32), "other": np.zeros(1)})
        with pytest.raises(BadInput, match="shape"):
            exe.run_named({"input0": np.zeros(5, np.float32)})
        with pytest.raises(BadInput, match="float32"):
            exe.run_named({"input0": np.zeros(4, np.complex64)})


def test_execute_failure_frees_everything(runtime: NeuronRuntime, standin_lib: Path) -> None:
    with NeffExecutable.load(runtime, make_neff("standin:4")) as exe:
        before = live_objects(standin_lib)
        exe.vnc = 1  # tensors land on another core than the model's: the stand-in rejects them
        with pytest.raises(NeffRuntimeError, match=r"nrt_execute failed.*NRT_INVALID"):
            exe.run_named({"input0": np.zeros(4, np.float32)})
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
        exe.run_named({"input0": np.zeros(1, np.float32)})
    with pytest.raises(LoaderError, match="closed"):
        NeffExecutable.load(rt, make_neff("standin:1"))


def test_run_binds_arguments_by_position(runtime: NeuronRuntime) -> None:
    with NeffExecutable.load(runtime, make_neff("standin:3")) as exe:
        x = np.array([1.0, -1.0, 0.5], dtype=np.float32)
        (y,) = exe.run([x])
        np.testing.assert_array_equal(y, x * 2 + 1)
        assert exe.run_on_device([x])[0].tolist() == y.tolist()
        with pytest.raises(BadInput, match="takes 1 argument"):
            exe.run([x, x])


def test_run_refuses_tensors_not_named_by_position(runtime: NeuronRuntime) -> None:
    spec = TensorSpec("ids", np.dtype(np.float32), (4,), 16, 0xA)
    exe = NeffExecutable(runtime, ctypes.c_void_p(), b"", 0, (spec,), (spec,))
    with pytest.raises(LoaderError, match="inputs are named ids: arguments are bound by position"):
        exe.run([np.zeros(4, np.float32)])


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
            out = exe.run_named(feeds)
            assert {s.name: (s.shape, s.dtype) for s in exe.outputs} == {
                k: (v.shape, v.dtype) for k, v in out.items()
            }


# -- a NEFF release through runtime_loader.load ----------------------------------------------
def _blob(store: Store, data: bytes) -> BlobRef:
    put = store.put_bytes(data)
    return BlobRef(put.digest, put.size)


def _graph(store: Store, kind: str, batch: int, seq: int, neff_name: str) -> Graph:
    """One graph whose only parameter is input_ids, as the stand-in's one-input NEFF takes it."""
    shape = [batch, seq if kind == "context_encoding" else 1]
    return Graph(
        kind=kind,
        bucket={"batch": batch, "seq": seq},
        signature={
            "parameters": [{"name": "input_ids", "kind": "input"}],
            "inputs": [{"name": "input_ids", "dtype": "int64", "shape": shape}],
            "outputs": [{"name": "logits", "dtype": "float32", "shape": shape}],
        },
        hlo=_blob(store, f"HloModule {kind}".encode()),
        executable=_blob(store, make_neff(neff_name)),
        format="neff",
        compiler=CompilerInfo("neuronx-cc", "2.15.141.0"),
        hlo_key=f"hlo-{kind}",
    )


def neff_lm_store(root: Path, batch: int = 2, seq: int = 8) -> Path:
    """A store holding `standin-lm:latest`, a causal-lm release of NEFF graphs the stand-in
    runs: context_encoding computes logits = 2 * input_ids + 1 over the bucket's positions,
    token_generation the same over the one fed token (a vocabulary of one)."""
    path = root / "store"
    with Store.open(str(path)) as store:
        graphs = (
            _graph(store, "context_encoding", batch, seq, f"standin:{batch},{seq}"),
            _graph(store, "token_generation", batch, seq, f"standin:{batch},1"),
        )
        release = Release(
            name="standin-lm",
            target="inf2",
            source=Source(
                "causal-lm",
                "arch-standin",
                {"vocab_size": 100, "pad_token_id": 0},
                (_blob(store, save({"unused.weight": np.zeros(2, np.float32)})),),
            ),
            graphs=graphs,
            provenance=Provenance("0.1.0", dt.datetime.now(dt.UTC).isoformat(), "h", "u"),
        )
        store.tag(str(store.put_release(release)), "standin-lm:latest")
    return path


def test_generate_on_a_neff_release(
    standin_lib: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Generation through the NEFF executor: the logits it returns are host arrays (this
    raised AttributeError when generation called `.numpy()` on every executor's outputs)."""
    monkeypatch.setenv("KILN_LIBNRT", str(standin_lib))
    store = neff_lm_store(tmp_path)
    before = live_objects(standin_lib)
    prompts = [[5, 9, 3], [7, 2]]
    lm = runtime_loader.load("standin-lm:latest", store=store, cache_dir=tmp_path / "c")
    with contextlib.closing(lm):
        tokens = lm.generate(prompts, max_new_tokens=3)
        # step 1: argmax over the 8 positions of 2 * padded ids + 1, the largest prompt id;
        # later steps: the one-token vocabulary of token_generation.
        np.testing.assert_array_equal(tokens, [[1, 0, 0], [0, 0, 0]])
        streamed = list(lm.generate_stream([[1, 2, 8]], max_new_tokens=2))
        assert [t.tolist() for t in streamed] == [[2], [0]]
        assert live_objects(standin_lib) == before + 2  # both graphs loaded, nothing else
    assert live_objects(standin_lib) == before
    with NeuronRuntime(standin_lib):  # closed by the model, so it can be opened again
        pass


def test_a_neff_release_without_libnrt_is_named(
    standin_lib: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KILN_LIBNRT", raising=False)
    if find_libnrt() is not None:
        pytest.skip("a Neuron runtime is installed here")
    store = neff_lm_store(tmp_path)
    with pytest.raises(LoaderError, match=r"NEFF executables but no Neuron runtime \(libnrt\)"):
        runtime_loader.load("standin-lm:latest", store=store, cache_dir=tmp_path / "c")


def test_executors_by_format() -> None:
    assert sorted(EXECUTORS) == ["neff", "xla-cpu"]
    assert isinstance(open_executor("xla-cpu"), XlaCpuExecutor)
    with pytest.raises(LoaderError, match="unknown executable format 'tpu-v9'"):
        open_executor("tpu-v9")
