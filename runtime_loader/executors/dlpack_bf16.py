"""DLPack capsules for bfloat16 host arrays, which numpy's ``__dlpack__`` refuses (bfloat16 is
an ml_dtypes type, not numpy's). DLPack itself has the type (``kDLBfloat``, 16 bits) and
jaxlib's CPU client adopts such a capsule's memory without copying, as it does float32: a
memory-mapped bfloat16 weight then costs its file pages only, like a float32 one.

The capsule is built with ctypes per the DLPack ABI (dlpack.h, v0.8: ``DLManagedTensor``).
The consumer calls the deleter when it drops the memory; until then ``_LIVE`` keeps the
array and the structures alive."""

from __future__ import annotations

import ctypes
import threading
from typing import Any

import numpy as np

_KDL_CPU = 1
_KDL_BFLOAT = 4


class _Device(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _Tensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _Device),
        ("ndim", ctypes.c_int32),
        ("dtype", _DataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class _ManagedTensor(ctypes.Structure):
    pass


_Deleter = ctypes.CFUNCTYPE(None, ctypes.POINTER(_ManagedTensor))
_ManagedTensor._fields_ = [
    ("dl_tensor", _Tensor),
    ("manager_ctx", ctypes.c_void_p),
    ("deleter", _Deleter),
]

_LIVE: dict[int, tuple[Any, ...]] = {}  # address of a _ManagedTensor -> what it points into
_LIVE_LOCK = threading.Lock()


@_Deleter
def _release(managed: Any) -> None:
    with _LIVE_LOCK:
        _LIVE.pop(ctypes.addressof(managed.contents), None)


_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


def bfloat16_capsule(array: np.ndarray) -> Any:
    """A ``"dltensor"`` capsule over a C-contiguous bfloat16 array's memory (no copy)."""
    if array.dtype.name != "bfloat16" or not array.flags.c_contiguous:
        raise ValueError(f"expected a C-contiguous bfloat16 array, got {array.dtype}")
    shape = (ctypes.c_int64 * max(array.ndim, 1))(*array.shape)
    managed = _ManagedTensor()
    managed.dl_tensor.data = array.ctypes.data
    managed.dl_tensor.device = _Device(_KDL_CPU, 0)
    managed.dl_tensor.ndim = array.ndim
    managed.dl_tensor.dtype = _DataType(_KDL_BFLOAT, 16, 1)
    managed.dl_tensor.shape = shape
    managed.dl_tensor.strides = None  # C-contiguous
    managed.dl_tensor.byte_offset = 0
    managed.deleter = _release
    with _LIVE_LOCK:
        _LIVE[ctypes.addressof(managed)] = (managed, shape, array)
    return _capsule_new(ctypes.addressof(managed), b"dltensor", None)
