"""The compiler interface shared by every backend."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

ExecutableFormat = Literal["xla-cpu", "neff"]


@dataclass(frozen=True)
class CompileResult:
    executable: bytes
    format: ExecutableFormat
    log: str
    compiler: str
    compiler_version: str
    flags: tuple[str, ...]
    seconds: float


@runtime_checkable
class Compiler(Protocol):
    """compile(HLO bytes, target, flags, workdir, timeout) -> CompileResult.

    Implementations raise ``pipeline.errors.CompileError`` (with the log text and a reason
    "exit" / "timeout" / "oom") when the compile fails."""

    name: str

    def version(self) -> str: ...

    def compile(
        self,
        hlo_proto: bytes,
        target: str,
        flags: Sequence[str],
        workdir: Path,
        timeout: float,
    ) -> CompileResult: ...
