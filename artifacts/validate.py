"""Path-aware readers for JSON documents: every error names the field at fault."""

from __future__ import annotations

from typing import Any

from artifacts.digest import Digest
from artifacts.errors import InvalidDigest, InvalidManifest


class Reader:
    """Reads typed fields out of a JSON object, naming `where.field` on failure."""

    def __init__(self, value: Any, where: str, source: str = "manifest") -> None:
        self.source = source
        self.where = where
        if not isinstance(value, dict):
            self.fail(where, f"must be an object, got {type(value).__name__}")
        self.value: dict[str, Any] = value

    def fail(self, path: str, message: str) -> None:
        raise InvalidManifest(f"{self.source}: {path}: {message}")

    def _path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, kind: type | tuple[type, ...], required: bool = True) -> Any:
        if key not in self.value:
            if required:
                self.fail(self._path(key), "required field is missing")
            return None
        value = self.value[key]
        if value is None and not required:
            return None
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, bool) and kind is not bool:
            self.fail(self._path(key), f"must be {_name(kind)}, got a boolean")
        if not isinstance(value, kind):
            self.fail(self._path(key), f"must be {_name(kind)}, got {type(value).__name__}")
        return value

    def text(self, key: str, required: bool = True) -> str:
        value = self.get(key, str, required)
        if required and value == "":
            self.fail(self._path(key), "must not be empty")
        return value

    def integer(self, key: str, minimum: int | None = 0, required: bool = True) -> int:
        value = self.get(key, int, required)
        if value is not None and minimum is not None and value < minimum:
            self.fail(self._path(key), f"must be >= {minimum}")
        return value

    def number(self, key: str, required: bool = True) -> float:
        return self.get(key, float, required)

    def digest(self, key: str, required: bool = True) -> Digest | None:
        value = self.get(key, str, required)
        if value is None:
            return None
        try:
            return Digest.parse(value)
        except InvalidDigest:
            self.fail(self._path(key), f"invalid digest {value!r}")
        raise AssertionError("unreachable")

    def child(self, key: str, required: bool = True) -> Reader | None:
        value = self.get(key, dict, required)
        return None if value is None else Reader(value, self._path(key), self.source)

    def items(self, key: str, required: bool = True) -> list[Reader]:
        values = self.get(key, list, required) or []
        return [Reader(v, f"{self._path(key)}[{i}]", self.source) for i, v in enumerate(values)]

    def strings(self, key: str, required: bool = True) -> tuple[str, ...]:
        values = self.get(key, list, required) or []
        for i, v in enumerate(values):
            if not isinstance(v, str):
                self.fail(f"{self._path(key)}[{i}]", "must be a string")
        return tuple(values)


def _name(kind: type | tuple[type, ...]) -> str:
    names = {
        dict: "an object",
        list: "a list",
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
    }
    if isinstance(kind, tuple):
        return " or ".join(names.get(k, k.__name__) for k in kind)
    return names.get(kind, kind.__name__)
