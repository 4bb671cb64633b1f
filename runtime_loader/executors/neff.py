"""Run ``neff`` executables through the Neuron runtime (libnrt) on the deploy side.

The loader uses this executor for artifacts whose format is ``"neff"``, on machines where
libnrt is installed. The calls, enums and struct layouts follow the runtime's C headers
(``nrt.h``, ``nrt_status.h``, ``nrt_experimental.h`` in aws-neuron/aws-neuron-sdk,
``src/libnrt/include/nrt/``), called through ctypes: ``nrt_init`` once per
:class:`NeuronRuntime`, ``nrt_load`` / ``nrt_get_model_tensor_info`` per
:class:`NeffExecutable`, and per :meth:`NeffExecutable.run` device tensors, two tensor sets
and ``nrt_execute``. Only ctypes, numpy and the standard library are imported.

Tensors are exchanged as numpy arrays of the dtype and shape the model reports. numpy has
no bfloat16 or fp8 types: such tensors go in and come out as their raw bits (uint16 / uint8).

:class:`NeffExecutor` is the loader's executor for the format (see ``executors/base.py``):
arguments by position, bound to the NEFF's tensors by the names neuronx-cc gives HLO
parameters and results, ``input<i>`` and ``output<i>``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime_loader.errors import BadInput, LoaderError, NeffRuntimeError

DEFAULT_LIBNRT = "/opt/aws/neuron/lib/libnrt.so.1"

# nrt_status.h: NRT_STATUS.
NRT_SUCCESS = 0
NRT_STATUS_NAMES: dict[int, str] = {
    0: "NRT_SUCCESS",
    1: "NRT_FAILURE",
    2: "NRT_INVALID",
    3: "NRT_INVALID_HANDLE",
    4: "NRT_RESOURCE",
    5: "NRT_TIMEOUT",
    6: "NRT_HW_ERROR",
    7: "NRT_QUEUE_FULL",
    9: "NRT_LOAD_NOT_ENOUGH_NC",
    10: "NRT_UNSUPPORTED_NEFF_VERSION",
    13: "NRT_UNINITIALIZED",
    14: "NRT_CLOSED",
    1002: "NRT_EXEC_BAD_INPUT",
    1003: "NRT_EXEC_COMPLETED_WITH_NUM_ERR",
    1004: "NRT_EXEC_COMPLETED_WITH_ERR",
    1005: "NRT_EXEC_NC_BUSY",
    1100: "NRT_COLL_PENDING",
}

# nrt.h: nrt_framework_type_t, nrt_tensor_placement_t, nrt_dtype_t.
NRT_FRAMEWORK_TYPE_NO_FW = 1
NRT_TENSOR_PLACEMENT_DEVICE = 0
NRT_TENSOR_PLACEMENT_HOST = 1
NRT_TENSOR_PLACEMENT_VIRTUAL = 2
_NRT_DTYPES: dict[int, np.dtype] = {
    0x1: np.dtype(np.uint64),
    0x2: np.dtype(np.int8),
    0x3: np.dtype(np.uint8),
    0x4: np.dtype(np.int16),
    0x5: np.dtype(np.uint16),
    0x6: np.dtype(np.uint16),  # NRT_DTYPE_BFLOAT16, as raw bits
    0x7: np.dtype(np.float16),
    0x8: np.dtype(np.int32),
    0x9: np.dtype(np.uint32),
    0xA: np.dtype(np.float32),
    0xC: np.dtype(np.int64),
    0xD: np.dtype(np.uint8),  # NRT_DTYPE_FP8_E3, as raw bits
    0xE: np.dtype(np.uint8),  # NRT_DTYPE_FP8_E4, as raw bits
    0xF: np.dtype(np.uint8),  # NRT_DTYPE_FP8_E5, as raw bits
}
_RAW_BITS = frozenset({0x6, 0xD, 0xE, 0xF})

# nrt_experimental.h: nrt_tensor_usage_t, NRT_TENSOR_NAME_MAX.
NRT_TENSOR_USAGE_INPUT = 0
NRT_TENSOR_USAGE_OUTPUT = 1
NRT_TENSOR_NAME_MAX = 256


class _TensorInfo(ctypes.Structure):
    """``nrt_tensor_info_t`` (enums are C ints)."""

    _fields_ = [
        ("name", ctypes.c_char * NRT_TENSOR_NAME_MAX),
        ("usage", ctypes.c_int),
        ("size", ctypes.c_size_t),
        ("dtype", ctypes.c_int),
        ("shape", ctypes.POINTER(ctypes.c_uint32)),
        ("ndim", ctypes.c_uint32),
    ]


class _TensorInfoArray(ctypes.Structure):
    """``nrt_tensor_info_array_t``: a count, then a flexible array of ``nrt_tensor_info_t``."""

    _fields_ = [("tensor_count", ctypes.c_uint64), ("tensor_array", _TensorInfo * 0)]


_P = ctypes.c_void_p
_PP = ctypes.POINTER(ctypes.c_void_p)
_STATUS = ctypes.c_int
_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "nrt_init": (_STATUS, [ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p]),
    "nrt_close": (None, []),
    "nrt_load": (_STATUS, [_P, ctypes.c_size_t, ctypes.c_int32, ctypes.c_int32, _PP]),
    "nrt_unload": (_STATUS, [_P]),
    "nrt_allocate_tensor_set": (_STATUS, [_PP]),
    "nrt_destroy_tensor_set": (None, [_PP]),
    "nrt_add_tensor_to_tensor_set": (_STATUS, [_P, ctypes.c_char_p, _P]),
    "nrt_get_tensor_from_tensor_set": (_STATUS, [_P, ctypes.c_char_p, _PP]),
    "nrt_tensor_allocate": (
        _STATUS,
        [ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_char_p, _PP],
    ),
    "nrt_tensor_free": (None, [_PP]),
    "nrt_tensor_write": (_STATUS, [_P, _P, ctypes.c_size_t, ctypes.c_size_t]),
    "nrt_tensor_read": (_STATUS, [_P, _P, ctypes.c_size_t, ctypes.c_size_t]),
    "nrt_execute": (_STATUS, [_P, _P, _P]),
    "nrt_get_model_tensor_info": (
        _STATUS,
        [_P, ctypes.POINTER(ctypes.POINTER(_TensorInfoArray))],
    ),
    "nrt_free_model_tensor_info": (_STATUS, [ctypes.POINTER(_TensorInfoArray)]),
}


def _check(function: str, status: int, detail: str = "") -> None:
    if status != NRT_SUCCESS:
        raise NeffRuntimeError(
            function, status, NRT_STATUS_NAMES.get(status, "unknown NRT_STATUS"), detail
        )


def find_libnrt() -> str | None:
    """The libnrt to use: ``$KILN_LIBNRT`` if set, else what ``ctypes.util.find_library("nrt")``
    finds, else ``/opt/aws/neuron/lib/libnrt.so.1`` if it exists, else None."""
    env = os.environ.get("KILN_LIBNRT")
    if env:
        return env
    found = ctypes.util.find_library("nrt")
    if found:
        return found
    return DEFAULT_LIBNRT if os.path.exists(DEFAULT_LIBNRT) else None


class NeuronRuntime:
    """libnrt loaded and initialized (``nrt_init`` with ``NRT_FRAMEWORK_TYPE_NO_FW``); ``close``
    unloads any models still loaded and calls ``nrt_close``. One per process: libnrt keeps
    global state."""

    def __init__(
        self,
        lib_path: str | os.PathLike[str] | None = None,
        *,
        fw_version: str = "",
        fal_version: str = "",
    ) -> None:
        path = os.fspath(lib_path) if lib_path is not None else find_libnrt()
        if path is None:
            raise LoaderError(
                f"no libnrt found (set KILN_LIBNRT, or install the Neuron runtime at "
                f"{DEFAULT_LIBNRT})"
            )
        try:
            lib = ctypes.CDLL(path)
        except OSError as exc:
            raise LoaderError(f"cannot load libnrt from {path}: {exc}") from exc
        for name, (restype, argtypes) in _SIGNATURES.items():
            try:
                fn = getattr(lib, name)
            except AttributeError as exc:
                raise LoaderError(f"{path} lacks {name}: not a usable libnrt") from exc
            fn.restype = restype
            fn.argtypes = argtypes
        self.lib_path = path
        self.lib = lib
        self._lock = threading.Lock()
        self._models: set[NeffExecutable] = set()
        _check(
            "nrt_init",
            lib.nrt_init(NRT_FRAMEWORK_TYPE_NO_FW, fw_version.encode(), fal_version.encode()),
        )
        self._open = True

    @property
    def is_open(self) -> bool:
        return self._open

    def close(self) -> None:
        """Unload the models still loaded, then ``nrt_close``; a second call does nothing."""
        with self._lock:
            if not self._open:
                return
            models = list(self._models)
        try:
            for model in models:
                model.close()
        finally:
            with self._lock:
                self._open = False
            self.lib.nrt_close()

    def _register(self, model: NeffExecutable) -> None:
        with self._lock:
            if not self._open:
                raise LoaderError("the Neuron runtime is closed")
            self._models.add(model)

    def _forget(self, model: NeffExecutable) -> None:
        with self._lock:
            self._models.discard(model)

    def __enter__(self) -> NeuronRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output as ``nrt_get_model_tensor_info`` reports it."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    size: int  # bytes
    nrt_dtype: int


def _spec(info: _TensorInfo) -> TensorSpec:
    name = info.name.decode()
    dtype = _NRT_DTYPES.get(info.dtype)
    if dtype is None:
        raise LoaderError(f"tensor {name!r} has nrt_dtype_t {info.dtype:#x}, which is not mapped")
    shape = tuple(int(info.shape[k]) for k in range(info.ndim))
    if math.prod(shape) * dtype.itemsize != info.size:
        raise LoaderError(
            f"tensor {name!r}: shape {shape} of {dtype} does not fill its {info.size} bytes"
        )
    return TensorSpec(name, dtype, shape, int(info.size), int(info.dtype))


class NeffExecutable:
    """A NEFF loaded onto NeuronCores of a :class:`NeuronRuntime` (``nrt_load``)."""

    def __init__(
        self,
        runtime: NeuronRuntime,
        model: ctypes.c_void_p,
        neff: bytes,
        vnc: int,
        inputs: tuple[TensorSpec, ...],
        outputs: tuple[TensorSpec, ...],
    ) -> None:
        self.runtime = runtime
        self.vnc = vnc
        self.inputs = inputs
        self.outputs = outputs
        self._model: ctypes.c_void_p | None = model
        self._neff = neff  # kept alive as long as the model
        self._order: tuple[list[str], list[str]] | None = None
        self._lock = threading.Lock()

    @classmethod
    def load(
        cls,
        runtime: NeuronRuntime,
        neff_bytes: bytes | bytearray | memoryview,
        vnc: int = 0,
        vnc_count: int = -1,
    ) -> NeffExecutable:
        """``nrt_load`` the NEFF at VNC ``vnc`` and read its tensors' names, dtypes and shapes.

        ``vnc`` must be a real core index (tensors are allocated on it); nrt.h marks
        ``vnc_count`` deprecated with "always use -1", hence the default."""
        if vnc < 0:
            raise ValueError(f"vnc must be a NeuronCore index >= 0, not {vnc}")
        if not runtime.is_open:
            raise LoaderError("the Neuron runtime is closed")
        lib = runtime.lib
        neff = bytes(neff_bytes)
        model = ctypes.c_void_p()
        _check(
            "nrt_load",
            lib.nrt_load(neff, len(neff), vnc, vnc_count, ctypes.byref(model)),
            f"{len(neff)}-byte NEFF at vnc {vnc}",
        )
        try:
            specs = _model_tensors(lib, model)
            inputs = tuple(s for usage, s in specs if usage == NRT_TENSOR_USAGE_INPUT)
            outputs = tuple(s for usage, s in specs if usage == NRT_TENSOR_USAGE_OUTPUT)
            exe = cls(runtime, model, neff, vnc, inputs, outputs)
            runtime._register(exe)
        except BaseException:
            lib.nrt_unload(model)
            raise
        return exe

    def run(self, args: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Execute once with arguments in HLO parameter order (``input0``, ``input1``, ...);
        returns the outputs in result order. Outputs are host arrays (libnrt's tensors are
        freed after every call), so ``run_on_device`` is the same call."""
        if self._order is None:
            self._order = (_positional(self.inputs, "input"), _positional(self.outputs, "output"))
        inputs, outputs = self._order
        if len(args) != len(inputs):
            raise BadInput(
                f"the NEFF takes {len(inputs)} argument(s) in parameter order, got {len(args)}"
            )
        results = self.run_named(dict(zip(inputs, args, strict=True)))
        return [results[name] for name in outputs]

    run_on_device = run

    def run_named(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Execute once: every model input by name, of its shape (values are cast to its dtype
        where numpy's "same_kind" allows); returns every output by name."""
        arrays = self._check_inputs(inputs)
        model = self._model
        if model is None:
            raise LoaderError("this NEFF executable is closed")
        lib = self.runtime.lib
        tensors: list[ctypes.c_void_p] = []
        sets: list[ctypes.c_void_p] = []
        try:
            in_set, out_set = ctypes.c_void_p(), ctypes.c_void_p()
            for tensor_set in (in_set, out_set):
                _check(
                    "nrt_allocate_tensor_set", lib.nrt_allocate_tensor_set(ctypes.byref(tensor_set))
                )
                sets.append(tensor_set)
            for spec, tensor_set in [(s, in_set) for s in self.inputs] + [
                (s, out_set) for s in self.outputs
            ]:
                tensor = ctypes.c_void_p()
                name = spec.name.encode()
                _check(
                    "nrt_tensor_allocate",
                    lib.nrt_tensor_allocate(
                        NRT_TENSOR_PLACEMENT_DEVICE, self.vnc, spec.size, name, ctypes.byref(tensor)
                    ),
                    f"tensor {spec.name!r}, {spec.size} bytes",
                )
                tensors.append(tensor)
                if spec.name in arrays:
                    data = arrays[spec.name]
                    _check(
                        "nrt_tensor_write",
                        lib.nrt_tensor_write(tensor, data.ctypes.data, 0, spec.size),
                        f"tensor {spec.name!r}",
                    )
                _check(
                    "nrt_add_tensor_to_tensor_set",
                    lib.nrt_add_tensor_to_tensor_set(tensor_set, name, tensor),
                    f"tensor {spec.name!r}",
                )
            _check("nrt_execute", lib.nrt_execute(model, in_set, out_set))
            results: dict[str, np.ndarray] = {}
            for spec in self.outputs:
                tensor = ctypes.c_void_p()
                _check(
                    "nrt_get_tensor_from_tensor_set",
                    lib.nrt_get_tensor_from_tensor_set(
                        out_set, spec.name.encode(), ctypes.byref(tensor)
                    ),
                    f"tensor {spec.name!r}",
                )
                out = np.empty(spec.shape, dtype=spec.dtype)
                _check(
                    "nrt_tensor_read",
                    lib.nrt_tensor_read(tensor, out.ctypes.data, 0, spec.size),
                    f"tensor {spec.name!r}",
                )
                results[spec.name] = out
            return results
        finally:
            # Sets first: nrt.h wants their tensors valid until nrt_destroy_tensor_set.
            for tensor_set in sets:
                lib.nrt_destroy_tensor_set(ctypes.byref(tensor_set))
            for tensor in tensors:
                lib.nrt_tensor_free(ctypes.byref(tensor))

    def _check_inputs(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        expected = {s.name for s in self.inputs}
        missing, extra = expected - inputs.keys(), inputs.keys() - expected
        if missing or extra:
            raise BadInput(
                f"NEFF inputs are {sorted(expected)}; missing {sorted(missing)}, "
                f"unexpected {sorted(extra)}"
            )
        arrays: dict[str, np.ndarray] = {}
        for spec in self.inputs:
            value = np.asarray(inputs[spec.name])
            if value.shape != spec.shape:
                raise BadInput(
                    f"input {spec.name!r} has shape {value.shape}, NEFF wants {spec.shape}"
                )
            raw = spec.nrt_dtype in _RAW_BITS
            if (raw and value.dtype != spec.dtype) or not np.can_cast(
                value.dtype, spec.dtype, "same_kind"
            ):
                want = f"raw bits as {spec.dtype}" if raw else str(spec.dtype)
                raise BadInput(f"input {spec.name!r} is {value.dtype}, NEFF wants {want}")
            arrays[spec.name] = np.ascontiguousarray(value, dtype=spec.dtype)
        return arrays

    def close(self) -> None:
        """``nrt_unload`` the model; a second call does nothing."""
        with self._lock:
            model, self._model = self._model, None
        if model is None:
            return
        self.runtime._forget(self)
        _check("nrt_unload", self.runtime.lib.nrt_unload(model))

    def __enter__(self) -> NeffExecutable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _positional(specs: tuple[TensorSpec, ...], prefix: str) -> list[str]:
    """The tensors' names in position order, when they are ``<prefix>0`` .. ``<prefix>N-1``."""
    numbered = {int(m[1]): s.name for s in specs if (m := re.fullmatch(prefix + r"(\d+)", s.name))}
    if sorted(numbered) != list(range(len(specs))):
        listed = ", ".join(s.name for s in specs)
        raise LoaderError(
            f"the NEFF's {prefix}s are named {listed}: arguments are bound by position to"
            f" {prefix}0 .. {prefix}{len(specs) - 1}, as neuronx-cc names them"
        )
    return [numbered[i] for i in range(len(specs))]


def _model_tensors(lib: ctypes.CDLL, model: ctypes.c_void_p) -> list[tuple[int, TensorSpec]]:
    """(usage, spec) for every tensor ``nrt_get_model_tensor_info`` lists, then freed."""
    info = ctypes.POINTER(_TensorInfoArray)()
    _check("nrt_get_model_tensor_info", lib.nrt_get_model_tensor_info(model, ctypes.byref(info)))
    try:
        count = int(info.contents.tensor_count)
        base = ctypes.addressof(info.contents) + _TensorInfoArray.tensor_array.offset
        entries = (_TensorInfo * count).from_address(base)
        specs = [(int(e.usage), _spec(e)) for e in entries]
    except BaseException:
        lib.nrt_free_model_tensor_info(info)
        raise
    _check("nrt_free_model_tensor_info", lib.nrt_free_model_tensor_info(info))
    return specs


class NeffExecutor:
    """The loader's executor for ``neff`` releases (see ``executors/base.py``): a
    :class:`NeuronRuntime` per model, its NEFFs loaded on NeuronCore 0."""

    format = "neff"

    def __init__(self, runtime: NeuronRuntime) -> None:
        self.runtime = runtime

    @classmethod
    def open(cls) -> NeffExecutor:
        lib = find_libnrt()
        if lib is None:
            raise LoaderError(
                "this release holds NEFF executables but no Neuron runtime (libnrt) is"
                " installed here: run it on an Inferentia/Trainium host, or load a release"
                " compiled for target cpu"
            )
        return cls(NeuronRuntime(lib))

    def load(self, executable: bytes) -> NeffExecutable:
        return NeffExecutable.load(self.runtime, executable)

    def bind(self, array: np.ndarray) -> np.ndarray:
        return array

    def owns_copy(self, bound: np.ndarray) -> bool:
        return False  # weights go in with every call, from the host's arrays

    def to_host(self, value: np.ndarray) -> np.ndarray:
        return value

    def close(self) -> None:
        self.runtime.close()
