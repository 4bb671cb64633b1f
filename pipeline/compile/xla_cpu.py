"""The ``xla-cpu`` backend: HloModuleProto -> StableHLO -> jaxlib's CPU client -> serialized
executable.

jaxlib is used directly (``jaxlib._jax``), without ``jax``: nothing here puts host arrays
through jax, so jax's x64 flag (which would narrow int64 token ids) never applies, and the
deploy-side executor creates the same kind of client to deserialize the bytes.

XLA options: every compile uses ``XLA_FLAGS_KILN`` and nothing else; flags given to this
backend are recorded in the result (they are part of the cache keys) but not passed to XLA.
``XLA_FLAGS_KILN`` turns off XLA CPU's concurrency-optimized scheduler: it starts every
weight-only op at the top of the program, so in a bfloat16 graph every weight's float32
copy was live at once (the 1.1B Llama's token_generation held 3x its weights); the memory
scheduler converts each weight just before its use. jaxlib's CPU compiler reads this flag
from ``XLA_FLAGS`` only, once per process (``CompileOptions.env_option_overrides`` do not
reach it), so the variable is set before this module creates its client, and a probe
compile checks it took effect. Their revision is part of the compiler version, so of every
cache key. The in-process compile is
not interruptible; ``timeout`` is enforced by the worker that runs it.
Executables target the compiling host's CPU features and only load in the same jaxlib
version; serialized executables differ from compile to compile (never key on them)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from artifacts.targets import CPU_TARGETS, XLA_CPU, XLA_CPU_FORMAT
from pipeline.compile.base import CompileResult
from pipeline.errors import CompileError

XLA_FLAGS_KILN = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",)
OPTIONS_REVISION = "kiln2"  # bump when XLA_FLAGS_KILN change


def xla_cpu_version(jaxlib_version: str) -> str:
    """The compiler version of this backend: jaxlib's, and the revision of its options."""
    return f"jaxlib-{jaxlib_version}+{OPTIONS_REVISION}"


_client_lock = threading.Lock()
_client: Any = None


def request_xla_flags() -> None:
    """Add ``XLA_FLAGS_KILN`` to this process's ``XLA_FLAGS`` (replacing other values of
    the same flags). XLA reads the variable once, when jaxlib first needs a flag."""
    names = {flag.split("=")[0] for flag in XLA_FLAGS_KILN}
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if f.split("=")[0] not in names]
    os.environ["XLA_FLAGS"] = " ".join([*kept, *XLA_FLAGS_KILN])


def _probe_module(weights: int = 8, size: int = 256) -> bytes:
    """StableHLO of a chain of dots, each through its own bfloat16 -> float32 weight convert:
    the memory scheduler keeps one converted weight live, the concurrency one all."""
    w = f"tensor<{size}x{size}xbf16>"
    wf, row = f"tensor<{size}x{size}xf32>", f"tensor<1x{size}xf32>"
    args = ", ".join([f"%x: {row}"] + [f"%w{i}: {w}" for i in range(weights)])
    lines, prev = [], "%x"
    for i in range(weights):
        lines += [
            f"%c{i} = stablehlo.convert %w{i} : ({w}) -> {wf}",
            f"%d{i} = stablehlo.dot {prev}, %c{i} : ({row}, {wf}) -> {row}",
            f"%t{i} = stablehlo.tanh %d{i} : {row}",
        ]
        prev = f"%t{i}"
    body = "\n".join(f"    {line}" for line in lines)
    return (
        f"module @kiln_probe {{\n  func.func public @main({args}) -> {row} {{\n{body}\n"
        f"    return {prev} : {row}\n  }}\n}}\n"
    ).encode()


def _check_flags(client: Any, xla: Any) -> None:
    """CompileError unless this process's XLA compiles with ``XLA_FLAGS_KILN``."""
    device = client.local_devices()[0]
    probe = client.compile_and_load(
        _probe_module(), xla.DeviceList((device,)), xla.CompileOptions()
    )
    temp = probe.get_compiled_memory_stats().temp_size_in_bytes
    if temp > 2 * 256 * 256 * 4:  # more than two converted weights live at once
        raise CompileError(
            "xla-cpu: XLA in this process read XLA_FLAGS before Kiln could add"
            f" {' '.join(XLA_FLAGS_KILN)} (jaxlib was used first); compile in a fresh"
            " process (`kiln compile` does)",
            reason="exit",
        )


def _cpu_client() -> Any:
    global _client
    with _client_lock:
        if _client is None:
            request_xla_flags()
            import jaxlib._jax as xla  # noqa: PLC0415

            client = xla.get_tfrt_cpu_client(asynchronous=True)
            _check_flags(client, xla)
            _client = client
        return _client


class XlaCpuCompiler:
    name = XLA_CPU

    def version(self) -> str:
        import jaxlib.version  # noqa: PLC0415

        return xla_cpu_version(jaxlib.version.__version__)

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
        client = _cpu_client()
        try:
            stablehlo = xla.mlir.hlo_to_stablehlo(hlo_proto)
            log.append(f"StableHLO bytecode {len(stablehlo)} bytes")
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
