"""Trace a torch module to an HloModuleProto with torch-xla (on the CPU), keeping weights as
HLO parameters, and map every parameter back to a state-dict or input name.

torch, torch_xla and transformers are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.errors import TraceError
from pipeline.signature import ParameterKind, ParameterSpec, Signature, TensorSpec

if TYPE_CHECKING:
    import torch

# Field numbers from xla/service/hlo.proto and xla/xla_data.proto.
_MODULE_COMPUTATIONS = 3
_MODULE_PROGRAM_SHAPE = 4
_MODULE_STACK_FRAME_INDEX = 17
_COMPUTATION_INSTRUCTIONS = 2
_INSTRUCTION_METADATA = 7
_PROGRAM_SHAPE_PARAMETERS = 1
_PROGRAM_SHAPE_RESULT = 2
_SHAPE_ELEMENT_TYPE = 2
_SHAPE_DIMENSIONS = 3
_SHAPE_TUPLE_SHAPES = 4
_PRIMITIVE_TYPES = {
    1: "bool",
    2: "int8",
    3: "int16",
    4: "int32",
    5: "int64",
    6: "uint8",
    7: "uint16",
    8: "uint32",
    9: "uint64",
    10: "float16",
    11: "float32",
    12: "float64",
    16: "bfloat16",
}
_TUPLE = 13

# What torch-xla raises when forward runs a graph or reads data while execution is off.
_EXECUTION_ERRORS = ("Unexpected execution", "Trying to access XLA data")
# Metrics that only move when a graph ran or device data went to the host mid-trace.
_EXECUTION_METRICS = ("ExecuteTime", "TransferFromDeviceTime")


@dataclass(frozen=True)
class TracedGraph:
    hlo_proto: bytes  # serialized HloModuleProto, as torch-xla lowered it
    hlo_text: str
    signature: Signature


# --- protobuf wire format (no protobuf classes for HloModuleProto are installed) ---------


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return result, pos


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes, bytes]]:
    """Yield (field number, wire type, value, raw field bytes) of one message."""
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        value: int | bytes
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} (field {number})")
        yield number, wire, value, buf[start:pos]


# (fields to drop, field number -> rule for that submessage)
_Rule = tuple[frozenset[int], dict[int, "_Rule"]]


def _rewrite(buf: bytes, rule: _Rule) -> bytes:
    """Copy a message, dropping and recursing into fields as ``rule`` says."""
    drop, nested = rule
    out = bytearray()
    for number, wire, value, raw in _fields(buf):
        if number in drop:
            continue
        if number in nested and wire == 2:
            sub = _rewrite(value, nested[number])  # type: ignore[arg-type]
            out += _encode_varint(number << 3 | 2) + _encode_varint(len(sub)) + sub
        else:
            out += raw
    return bytes(out)


_INSTRUCTION_RULE: _Rule = (frozenset({_INSTRUCTION_METADATA}), {})
_COMPUTATION_RULE: _Rule = (frozenset(), {_COMPUTATION_INSTRUCTIONS: _INSTRUCTION_RULE})
_MODULE_RULE: _Rule = (
    frozenset({_MODULE_STACK_FRAME_INDEX}),
    {_MODULE_COMPUTATIONS: _COMPUTATION_RULE},
)


def hlo_digest_bytes(proto: bytes) -> bytes:
    """The bytes the HLO key hashes: the HloModuleProto without debug metadata.

    By default torch-xla writes empty OpMetadata, but with XLA_HLO_DEBUG / XLA_IR_DEBUG set
    every instruction carries op names, source files and lines, and the module a stack frame
    index with absolute paths. Both are dropped here (instruction field 7, module field 17),
    so the key does not depend on debug settings or install paths. Everything else (names,
    ids) is kept: it is deterministic across processes for one graph. The result is still
    a valid HloModuleProto."""
    return _rewrite(proto, _MODULE_RULE)


def _shape(buf: bytes) -> tuple[str, tuple[int, ...], list[bytes]]:
    """(dtype name or "tuple", dimensions, tuple element shapes) of a ShapeProto."""
    element_type, dims, tuple_shapes = 0, [], []
    for number, wire, value, _ in _fields(buf):
        if number == _SHAPE_ELEMENT_TYPE:
            element_type = int(value)  # type: ignore[arg-type]
        elif number == _SHAPE_DIMENSIONS and wire == 0:
            dims.append(int(value))  # type: ignore[arg-type]
        elif number == _SHAPE_DIMENSIONS:  # packed
            pos, packed = 0, bytes(value)  # type: ignore[arg-type]
            while pos < len(packed):
                dim, pos = _varint(packed, pos)
                dims.append(dim)
        elif number == _SHAPE_TUPLE_SHAPES:
            tuple_shapes.append(bytes(value))  # type: ignore[arg-type]
    if element_type == _TUPLE:
        return "tuple", (), tuple_shapes
    if element_type not in _PRIMITIVE_TYPES:
        raise TraceError(f"HLO uses element type {element_type}, which Kiln does not map yet")
    return _PRIMITIVE_TYPES[element_type], tuple(dims), []


def _program_shape(
    proto: bytes,
) -> tuple[list[tuple[str, tuple[int, ...]]], list[tuple[str, tuple[int, ...]]]]:
    """(parameters, flattened results) of the entry computation as (dtype, shape)."""
    params: list[tuple[str, tuple[int, ...]]] = []
    results: list[tuple[str, tuple[int, ...]]] = []
    for number, _, value, _ in _fields(proto):
        if number != _MODULE_PROGRAM_SHAPE:
            continue
        for sub, _, shape, _ in _fields(value):  # type: ignore[arg-type]
            if sub == _PROGRAM_SHAPE_PARAMETERS:
                dtype, dims, _ = _shape(shape)  # type: ignore[arg-type]
                params.append((dtype, dims))
            elif sub == _PROGRAM_SHAPE_RESULT:
                dtype, dims, elements = _shape(shape)  # type: ignore[arg-type]
                if dtype != "tuple":
                    results.append((dtype, dims))
                for element in elements:
                    edtype, edims, _ = _shape(element)
                    results.append((edtype, edims))
    return params, results


# --- tracing ----------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _named_tensors(module: torch.nn.Module) -> dict[int, tuple[str, torch.Tensor]]:
    """id(tensor) -> (canonical name, tensor) over parameters then buffers; a tensor reachable
    under several names (tied weights) takes the first name, as named_parameters() does."""
    found: dict[int, tuple[str, torch.Tensor]] = {}
    named = [
        *module.named_parameters(remove_duplicate=False),
        *module.named_buffers(remove_duplicate=False),
    ]
    for name, tensor in named:
        found.setdefault(id(tensor), (name, tensor))
    return found


def weights_state_dict(
    module: torch.nn.Module, signature: Signature | None = None
) -> dict[str, torch.Tensor]:
    """CPU tensors for the weight parameters, named as the trace names them.

    Tied weights appear once, under their first name (safetensors refuses shared tensors);
    non-persistent buffers (e.g. rotary ``inv_freq``) are included under their buffer name.
    With a ``signature``, exactly its weight parameters; without, every parameter and buffer
    of the module (a superset of what any graph of it uses)."""
    tensors = {name: t for name, t in _named_tensors(module).values()}
    names = list(tensors) if signature is None else list(signature.weight_names)
    missing = [n for n in names if n not in tensors]
    if missing:
        raise TraceError(
            f"module has no parameter or buffer named {missing}; was the "
            "signature traced from a different module wrapper?"
        )
    return {n: tensors[n].detach().to("cpu").contiguous() for n in names}


def weight_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's parameters and buffers as the trace names them (tied ones once, under
    their first name), where they are: nothing is copied."""
    return {name: t.detach() for name, t in _named_tensors(module).values()}


def _module_on_device(module: torch.nn.Module, device: object) -> torch.nn.Module:
    """A copy of ``module`` whose parameters and buffers are XLA placeholders: device data
    of the right shape and dtype with no buffer behind it. They lower to the same HLO
    parameters as real device copies would (the values never enter the HLO), so tracing
    neither copies the weights nor reads them: ``module`` itself is left untouched.

    Module.to() would untie tied weights (XLA tensors cannot share storage with CPU ones, so
    every module slot gets its own new Parameter). Pre-seeding deepcopy's memo with one
    device tensor per distinct CPU tensor keeps ties by construction."""
    import torch  # noqa: PLC0415
    from torch_xla.core.xla_builder import create_placeholder_tensor  # noqa: PLC0415

    memo: dict[int, object] = {}
    for _name, tensor in _named_tensors(module).values():
        moved = create_placeholder_tensor(tuple(tensor.shape), tensor.dtype)
        if isinstance(tensor, torch.nn.Parameter):
            moved = torch.nn.Parameter(moved, requires_grad=False)
        memo[id(tensor)] = moved
    return copy.deepcopy(module, memo)


def _execution_counts() -> tuple[int, ...]:
    import torch_xla.debug.metrics as met  # noqa: PLC0415

    counts = []
    for metric in _EXECUTION_METRICS:
        data = met.metric_data(metric)
        counts.append(0 if data is None else int(data[0]))
    return tuple(counts)


@contextlib.contextmanager
def _tracing_patches() -> Iterator[None]:
    """Special scalars on (Python numbers become HLO constants, not parameters) and
    transformers' data-dependent mask checks off (they would execute the graph mid-trace and
    silently drop the mask). Everything is restored afterwards."""
    from torch_xla import _XLAC  # noqa: PLC0415

    saved_flags = (
        _XLAC._get_xla_handle_special_scalars(),
        _XLAC._get_xla_all_numbers_special_scalars(),
    )
    saved_allow = _XLAC._get_allow_execution()
    patched = []
    for module_name in ("transformers.masking_utils", "transformers.modeling_utils"):
        mod = sys.modules.get(module_name)
        if mod is not None and hasattr(mod, "is_tracing"):
            patched.append((mod, mod.is_tracing))
            mod.is_tracing = lambda *args, **kwargs: True
    _XLAC._set_xla_handle_special_scalars(True)
    _XLAC._set_xla_all_numbers_special_scalars(True)
    # Weights are placeholders without data: running a graph or reading a value would crash,
    # so execution raises instead (RuntimeError), and trace_graph reports it.
    _XLAC._set_allow_execution(False)
    try:
        yield
    finally:
        _XLAC._set_allow_execution(saved_allow)
        _XLAC._set_xla_handle_special_scalars(saved_flags[0])
        _XLAC._set_xla_all_numbers_special_scalars(saved_flags[1])
        for mod, original in patched:
            mod.is_tracing = original


def _parameter_specs(
    param_ids: list[int],
    hlo_params: list[tuple[str, tuple[int, ...]]],
    names_by_id: dict[int, tuple[ParameterKind, str]],
    module_name: str,
) -> list[ParameterSpec]:
    if len(hlo_params) != len(param_ids):
        raise TraceError(
            f"HLO has {len(hlo_params)} parameters but torch-xla reported "
            f"{len(param_ids)} device-data nodes; cannot map parameters"
        )
    specs = []
    for index, (tensor_id, (dtype, shape)) in enumerate(zip(param_ids, hlo_params, strict=True)):
        if tensor_id not in names_by_id:
            raise TraceError(
                f"HLO parameter {index} ({dtype}{list(shape)}) is neither an input nor a "
                f"parameter/buffer of {module_name}: a tensor was created from host data "
                "inside forward (torch.tensor(...), .to(device) of a CPU tensor). Register it "
                "as a buffer or compute it from Python numbers."
            )
        kind, name = names_by_id[tensor_id]
        specs.append(ParameterSpec(index, name, dtype, shape, kind))
    return specs


def trace_graph(
    module: torch.nn.Module,
    example_inputs: dict[str, torch.Tensor],
    output_names: list[str],
) -> TracedGraph:
    """Lower ``module.forward(**example_inputs)`` (a tuple/list of tensors in
    ``output_names`` order) to HLO. Only the input shapes and dtypes matter, not values.

    Raises TraceError when the forward pass ran a graph or read device data mid-trace (the
    HLO would be cut or specialised on the example values), or when an HLO parameter is
    neither an input nor a parameter/buffer of ``module``."""
    os.environ.setdefault("PJRT_DEVICE", "CPU")
    import torch  # noqa: PLC0415
    import torch_xla  # noqa: PLC0415
    from torch_xla import _XLAC  # noqa: PLC0415


    device = torch_xla.device()
    traced = _module_on_device(module, device).eval()  # ``module`` itself is not touched

    names_by_id: dict[int, tuple[ParameterKind, str]] = {}
    for name, tensor in _named_tensors(traced).values():
        names_by_id.setdefault(_XLAC._xla_get_tensor_id(tensor), ("weight", name))
    inputs = {}
    for name, value in example_inputs.items():
        inputs[name] = value.to(device)
        # Captured before forward: in-place ops on an input give it a new id.
        names_by_id[_XLAC._xla_get_tensor_id(inputs[name])] = ("input", name)

    executed = TraceError(
        f"{type(module).__name__}.forward executed a graph or copied device data to the "
        "host while tracing (e.g. .item(), .tolist(), .cpu(), printing a tensor, or "
        "Python control flow on tensor values): the HLO would be cut or specialised on "
        "the example inputs. Make the forward pass data-independent."
    )
    with _tracing_patches(), torch.no_grad():
        before = _execution_counts()
        try:
            outputs = traced(**inputs)
        except RuntimeError as exc:
            if any(s in str(exc) for s in _EXECUTION_ERRORS):
                raise executed from None
            raise
        after = _execution_counts()
    if after != before:
        raise executed
    if not isinstance(outputs, (tuple, list)) or len(outputs) != len(output_names):
        got = len(outputs) if isinstance(outputs, (tuple, list)) else type(outputs).__name__
        raise TraceError(
            f"forward must return a tuple/list of {len(output_names)} tensors "
            f"({output_names}), got {got}"
        )
    outputs = list(outputs)

    hlo_proto = _XLAC._get_xla_tensors_hlo_proto(outputs)
    hlo_text = _XLAC._get_xla_tensors_hlo(outputs)
    # Device-data nodes come in HLO parameter order; dtypes/shapes from the HLO itself.
    param_ids, _ = _XLAC._get_tensors_xla_device_data_node(outputs)
    hlo_params, hlo_results = _program_shape(hlo_proto)
    parameters = _parameter_specs(
        param_ids, hlo_params, names_by_id, type(module).__name__
    )
    output_specs = tuple(
        TensorSpec(name, _dtype_name(t.dtype), tuple(t.shape))
        for name, t in zip(output_names, outputs, strict=True)
    )
    if [(s.dtype, s.shape) for s in output_specs] != hlo_results:
        raise TraceError(
            f"HLO results {hlo_results} do not match the traced outputs "
            f"{[(s.dtype, s.shape) for s in output_specs]} (is XLA_USE_BF16 or "
            "a downcast setting active?)"
        )
    input_specs = tuple(
        TensorSpec(name, _dtype_name(t.dtype), tuple(t.shape)) for name, t in example_inputs.items()
    )
    signature = Signature(inputs=input_specs, outputs=output_specs, parameters=tuple(parameters))
    return TracedGraph(hlo_proto=hlo_proto, hlo_text=hlo_text, signature=signature)
