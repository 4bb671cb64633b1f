"""Graph signatures: named inputs/outputs and the HLO parameter order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pipeline.layout import NATURAL

ParameterKind = Literal["input", "weight"]
_KINDS = ("input", "weight")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name, e.g. "float32", "int64"
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(
            name=str(data["name"]),
            dtype=str(data["dtype"]),
            shape=tuple(int(d) for d in data["shape"]),
        )


@dataclass(frozen=True)
class ParameterSpec:
    """One HLO parameter. ``name`` is the state-dict name for weights, the graph input
    name for inputs. ``layout`` (weights only) is how the weight is stored: ``natural`` (as
    the model holds it; pipeline.layout), or ``transposed`` in releases of graph builder 2;
    ``shape`` is the stored shape."""

    index: int
    name: str
    dtype: str
    shape: tuple[int, ...]
    kind: ParameterKind
    layout: str = NATURAL

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"parameter kind must be one of {_KINDS}, got {self.kind!r}")

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "index": self.index,
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "kind": self.kind,
        }
        if self.kind == "weight":
            data["layout"] = self.layout
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ParameterSpec:
        return cls(
            index=int(data["index"]),
            name=str(data["name"]),
            dtype=str(data["dtype"]),
            shape=tuple(int(d) for d in data["shape"]),
            kind=data["kind"],
            layout=str(data.get("layout", NATURAL)),
        )


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    parameters: tuple[ParameterSpec, ...]  # in HLO parameter order

    def __post_init__(self) -> None:
        indices = [p.index for p in self.parameters]
        if indices != list(range(len(indices))):
            raise ValueError(f"parameters must be in HLO order 0..n-1, got indices {indices}")

    @property
    def weight_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parameters if p.kind == "weight")

    def to_json(self) -> dict[str, Any]:
        return {
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "parameters": [p.to_json() for p in self.parameters],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Signature:
        return cls(
            inputs=tuple(TensorSpec.from_json(t) for t in data["inputs"]),
            outputs=tuple(TensorSpec.from_json(t) for t in data["outputs"]),
            parameters=tuple(ParameterSpec.from_json(p) for p in data["parameters"]),
        )
