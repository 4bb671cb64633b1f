"""Run ``xla-cpu`` executables (serialized by jaxlib's CPU client) on the deploy side.

Only numpy and jaxlib's native module are used; jaxlib is imported on first use, and
``jax`` itself is not imported (jaxlib 0.10's client has no ``buffer_from_pyval``; arrays go
in and out through DLPack). Executables load only in the jaxlib version that compiled them.
Outputs are read-only numpy views of the result buffers.

numpy's DLPack export has no bfloat16, though DLPack and jaxlib do: a bfloat16 array goes
up through a capsule built here (dlpack_bf16.py), adopted without a copy like any other;
a bfloat16 result comes back through jaxlib's own device-to-numpy copy (an ml_dtypes
array).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from runtime_loader.blob_kind import blob_kind
from runtime_loader.executors.dlpack_bf16 import bfloat16_capsule

_lock = threading.Lock()
_state: dict[str, Any] = {}


def _xla() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # no INFO lines from XLA on stderr
    import jaxlib._jax  # noqa: PLC0415

    return jaxlib._jax


def _cpu() -> tuple[Any, Any]:
    """(client, device): one process-wide CPU client, so buffers uploaded once can be passed
    to every executable loaded here."""
    with _lock:
        if "client" not in _state:
            # Synchronous: an execution ends (and drops its references to the arguments) on
            # the calling thread. With the asynchronous client a worker thread could drop the
            # last reference to a zero-copy (DLPack) input; numpy's deleter then needs the GIL
            # there, and if that happens while the interpreter exits the process aborts
            # ("terminate called without an active exception"). Latency is the same: every
            # call here waits for its outputs anyway.
            client = _xla().get_tfrt_cpu_client(asynchronous=False)
            _state["client"] = client
            _state["device"] = client.local_devices()[0]
        return _state["client"], _state["device"]


_blockers = [0]  # calls inside _jax_import_blocked now, under _block_lock
_block_lock = threading.Lock()


@contextlib.contextmanager
def _jax_import_blocked() -> Iterator[None]:
    """jaxlib's DLPack import and result wrapping try ``import jax`` (about 0.3 s) and work
    without it: make that import fail fast for the duration of the call, unless jax is
    already loaded. Calls on several threads overlap (the model prepares executables and
    weights side by side): the block lifts when the last one ends. (Another thread
    importing jax in that window would fail.)"""
    with _block_lock:
        if _blockers[0] == 0 and "jax" in sys.modules:
            blocking = False
        else:
            blocking = True
            _blockers[0] += 1
            sys.modules["jax"] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if blocking:
            with _block_lock:
                _blockers[0] -= 1
                if _blockers[0] == 0 and sys.modules.get("jax", False) is None:
                    del sys.modules["jax"]


class DeviceBuffer:
    """A host array uploaded to the CPU device, or an output kept there; pass it to ``run``
    in place of an array. (Without jax, jaxlib arrays carry no shape: outputs learn theirs
    from a zero-copy numpy view on first use.)"""

    __slots__ = ("array", "_shape", "_dtype", "aliases_host")

    def __init__(
        self,
        array: Any,
        shape: tuple[int, ...] | None = None,
        dtype: np.dtype | None = None,
        aliases_host: bool = False,
    ) -> None:
        self.array = array
        self._shape = shape
        self._dtype = dtype
        # True when the device buffer is the uploaded host array's own memory (zero-copy):
        # the host pages must then stay, e.g. a memory-mapped weight's.
        self.aliases_host = aliases_host

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape if self._shape is not None else self.numpy().shape

    @property
    def dtype(self) -> np.dtype:
        return self._dtype if self._dtype is not None else self.numpy().dtype

    def numpy(self) -> np.ndarray:
        self.array.block_until_ready()
        capsule = _xla().buffer_to_dlpack_managed_tensor(self.array)
        try:
            return np.from_dlpack(_Capsule(capsule))
        except (RuntimeError, BufferError, TypeError):  # e.g. bfloat16: not in numpy's DLPack
            del capsule
            with _jax_import_blocked():
                array, _ = self.array._single_device_array_to_np_array_did_copy()
            return array


class _Capsule:
    """Adapts a DLPack capsule to numpy.from_dlpack's protocol (CPU memory)."""

    _KDL_CPU = 1

    def __init__(self, capsule: Any) -> None:
        self._capsule = capsule

    def __dlpack__(self, *args: Any, **kwargs: Any) -> Any:
        return self._capsule

    def __dlpack_device__(self) -> tuple[int, int]:
        return (self._KDL_CPU, 0)


# XLA's CPU client adopts a host array without copying only when its data is this aligned;
# a less aligned one is copied on first use, while the caller still holds the original.
HOST_ALIGNMENT = 64


def _aligned(array: np.ndarray) -> bool:
    return array.ctypes.data % HOST_ALIGNMENT == 0


def _aligned_copy(array: np.ndarray) -> np.ndarray:
    raw = np.empty(array.nbytes + HOST_ALIGNMENT, dtype=np.uint8)
    start = -raw.ctypes.data % HOST_ALIGNMENT
    out = raw[start : start + array.nbytes].view(array.dtype).reshape(array.shape)
    np.copyto(out, array)
    return out


def _dlpack_upload(array: np.ndarray) -> Any:
    _, device = _cpu()
    try:
        capsule = bfloat16_capsule(array) if array.dtype.name == "bfloat16" else array.__dlpack__()
        with _jax_import_blocked():
            return _xla().dlpack_managed_tensor_to_buffer(capsule, device, None, True)
    except (BufferError, TypeError, ValueError) as exc:
        raise ValueError(f"cannot upload a {array.dtype} array to the CPU device: {exc}") from exc


class DeviceBuffers:
    """Uploads weights once; the handles are reused across calls and across executables
    (e.g. every bucket of a model shares one set of weight buffers).

    An aligned float32 (or other DLPack dtype) array is adopted in place, so a memory-mapped
    weight costs its file pages and nothing more; an unaligned one is copied into aligned
    memory now, so the caller may drop the original's pages at once. bfloat16, which numpy
    cannot export through DLPack, goes through a capsule of its own (dlpack_bf16.py), so it
    is adopted the same way."""

    def upload(self, array: np.ndarray) -> DeviceBuffer:
        array = np.asarray(array, order="C")  # not ascontiguousarray: it makes 0-d arrays 1-d
        shape = tuple(array.shape)
        aliases = _aligned(array)
        source = array if aliases else _aligned_copy(array)
        return DeviceBuffer(_dlpack_upload(source), shape, array.dtype, aliases_host=aliases)


class XlaCpuExecutable:
    """One deserialized executable. ``run`` takes arguments in HLO parameter order (as the
    graph's signature lists them): numpy arrays or DeviceBuffer handles."""

    def __init__(self, loaded: Any, buffers: DeviceBuffers) -> None:
        self._loaded = loaded
        self._buffers = buffers
        self.num_parameters = len(loaded.get_parameter_layouts())

    @classmethod
    def load(
        cls, executable_bytes: bytes, buffers: DeviceBuffers | None = None
    ) -> XlaCpuExecutable:
        xla = _xla()
        client, device = _cpu()
        try:
            loaded = client.deserialize_executable(
                executable_bytes, xla.DeviceList((device,)), None
            )
        except Exception as exc:  # jaxlib raises its own runtime error types
            kind = blob_kind(executable_bytes)
            if kind is not None:
                raise ValueError(
                    f"not an xla-cpu executable: the blob holds {kind}"
                    " (the manifest's executable digest points at the wrong blob)"
                ) from exc
            import jaxlib.version  # noqa: PLC0415

            raise ValueError(
                "cannot load this xla-cpu executable with jaxlib "
                f"{jaxlib.version.__version__} ({exc}); it must be loaded by the jaxlib "
                "version that compiled it, on a compatible CPU"
            ) from exc
        return cls(loaded, buffers or DeviceBuffers())

    def optimized_hlo(self) -> str:
        """The optimized HLO module(s) XLA compiled, as text (for inspection and tests)."""
        return "\n".join(m.to_string() for m in self._loaded.hlo_modules())

    def run_on_device(self, args: Sequence[np.ndarray | DeviceBuffer]) -> list[DeviceBuffer]:
        """Run and keep the outputs on the device (e.g. a KV cache fed to the next step)."""
        if len(args) != self.num_parameters:
            raise ValueError(
                f"executable takes {self.num_parameters} arguments in HLO "
                f"parameter order, got {len(args)}"
            )
        handles = [a if isinstance(a, DeviceBuffer) else self._buffers.upload(a) for a in args]
        try:
            with _jax_import_blocked():
                results = self._loaded.execute_sharded([h.array for h in handles])
                outputs = results.disassemble_into_single_device_arrays()
        except Exception as exc:
            shapes = [(str(h.dtype), h.shape) for h in handles]
            raise ValueError(
                f"xla-cpu execution failed ({exc}); arguments were "
                f"{shapes}: check dtypes and shapes against the signature"
            ) from exc
        return [DeviceBuffer(array) for (array,) in outputs]

    def run(self, args: Sequence[np.ndarray | DeviceBuffer]) -> list[np.ndarray]:
        return [buf.numpy() for buf in self.run_on_device(args)]

    def close(self) -> None:
        """Nothing to release early: the jaxlib executable is freed with this object."""


class XlaCpuExecutor:
    """The loader's executor for ``xla-cpu`` releases (see ``executors/base.py``): weights
    uploaded once into the process-wide CPU client, shared by every bucket's executable."""

    format = "xla-cpu"

    def __init__(self) -> None:
        self.buffers = DeviceBuffers()

    def load(self, executable: bytes) -> XlaCpuExecutable:
        return XlaCpuExecutable.load(executable, self.buffers)

    def bind(self, array: np.ndarray) -> DeviceBuffer:
        return self.buffers.upload(array)

    def owns_copy(self, bound: DeviceBuffer) -> bool:
        return not bound.aliases_host  # an adopted (aligned) array's pages must stay

    def to_host(self, value: DeviceBuffer) -> np.ndarray:
        return value.numpy()

    def close(self) -> None:
        """Nothing to close: the CPU client is shared by the process."""
