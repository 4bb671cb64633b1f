"""The ``xla-cpu`` backend: HloModuleProto -> StableHLO -> jaxlib's CPU client -> serialized
executable.

jaxlib is used directly (``jaxlib._jax``), without ``jax``: nothing here puts host arrays
through jax, so jax's x64 flag (which would narrow int64 token ids) never applies, and the
deploy-side executor creates the same kind of client to deserialize the bytes.

XLA flags: the CPU compile takes none here. Flags given to this backend are recorded in the
result (they are part of the cache keys) but not passed to XLA. The in-process compile is
not interruptible; ``timeout`` is enforced by the worker that runs it.
Executables target the compiling host's CPU features and only load in the same jaxlib
version; serialized executables differ from compile to compile (never key on them)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from artifacts.targets import CPU_TARGETS, XLA_CPU, XLA_CPU_FORMAT
from pipeline.compile.base import CompileResult
from pipeline.errors import CompileError

_client_lock = threading.Lock()
_client: Any = None


def _cpu_client() -> Any:
    global _client
    with _client_lock:
        if _client is None:
            import jaxlib._jax as xla  # noqa: PLC0415

            _client = xla.get_tfrt_cpu_client(asynchronous=True)
        return _client


class XlaCpuCompiler:
    name = XLA_CPU

    def version(self) -> str:
        import jaxlib.version  # noqa: PLC0415

        return f"jaxlib-{jaxlib.version.__version__}"

    def compile(
        self,
        hlo_proto: bytes,
        target: str,
        flags: Sequence[str],
        workdir: Path,
        timeout: float,
    ) -> CompileResult:
        if target not in CPU_TARGETS:
            raise ValueError(f"xla-cpu compiles for target 'cpu' only, not {target!r}")
        import jaxlib._jax as xla  # noqa: PLC0415

        version = self.version()
        start = time.monotonic()
        log = [f"{version}: HloModuleProto {len(hlo_proto)} bytes"]
        try:
            stablehlo = xla.mlir.hlo_to_stablehlo(hlo_proto)
            log.append(f"StableHLO bytecode {len(stablehlo)} bytes")
            client = _cpu_client()
            device = client.local_devices()[0]
            executable = client.compile_and_load(
                stablehlo, xla.DeviceList((device,)), xla.CompileOptions()
            )
            data = client.serialize_executable(executable)
        except Exception as exc:  # jaxlib raises its own runtime error types
            log.append(f"failed: {type(exc).__name__}: {exc}")
            raise CompileError(
                f"xla-cpu could not compile the HLO ({type(exc).__name__}: {exc}); the proto "
                "may be corrupt or use ops the CPU backend lacks",
                reason="exit",
                log="\n".join(log),
            ) from exc
        seconds = time.monotonic() - start
        log.append(f"serialized executable {len(data)} bytes in {seconds:.3f}s")
        return CompileResult(
            executable=data,
            format=XLA_CPU_FORMAT,
            log="\n".join(log) + "\n",
            compiler=self.name,
            compiler_version=version,
            flags=tuple(flags),
            seconds=seconds,
        )
