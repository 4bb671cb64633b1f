"""The ``neuronx-cc`` backend: drives the Neuron SDK compiler CLI in a subprocess."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from artifacts.targets import NEFF_FORMAT, NEURON_TARGETS, NEURONX_CC
from pipeline.compile.base import CompileResult
from pipeline.errors import BackendUnavailableError, CompileError

HLO_FILE = "model.hlo_module.pb"
NEFF_FILE = "model.neff"
LOG_FILE = "log-neuron-cc.txt"
_VERSION_PREFIX = "NeuronX Compiler version"
_OOM_MARKER = "[F137]"
_GUARD = Path(__file__).with_name("process_guard.py")


def is_available() -> bool:
    return shutil.which("neuronx-cc") is not None


def _binary() -> str:
    path = shutil.which("neuronx-cc")
    if path is None:
        raise BackendUnavailableError(
            "neuronx-cc is not on PATH: install the AWS Neuron SDK (neuronx-cc from Neuron's "
            "package index) to compile for inf2/trn1/trn2, or compile for target 'cpu'."
        )
    return path


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class NeuronxCcCompiler:
    name = NEURONX_CC

    def __init__(self) -> None:
        self._version: str | None = None

    def version(self) -> str:
        """The version from the first line of ``neuronx-cc --version``, e.g. "2.10.0.34+6c8"."""
        if self._version is None:
            proc = subprocess.run(
                [_binary(), "--version"], capture_output=True, text=True, timeout=120, check=False
            )
            lines = (proc.stdout + proc.stderr).strip().splitlines()
            first = lines[0].strip() if lines else ""
            if proc.returncode != 0 or not first.startswith(_VERSION_PREFIX):
                raise CompileError(
                    f"could not read the neuronx-cc version (exit {proc.returncode}, first line "
                    f"{first!r}); check the Neuron SDK installation",
                    reason="exit",
                    log=proc.stdout + proc.stderr,
                    returncode=proc.returncode,
                )
            self._version = first[len(_VERSION_PREFIX) :].strip()
        return self._version

    def command(self, target: str, flags: Sequence[str]) -> list[str]:
        return [
            _binary(),
            "compile",
            HLO_FILE,
            "--framework",
            "XLA",
            "--target",
            target,
            "--output",
            NEFF_FILE,
            "--logfile",
            LOG_FILE,
            *flags,
        ]

    def compile(
        self,
        hlo_proto: bytes,
        target: str,
        flags: Sequence[str],
        workdir: Path,
        timeout: float,
    ) -> CompileResult:
        if target not in NEURON_TARGETS:
            raise ValueError(f"neuronx-cc compiles for {NEURON_TARGETS}, not {target!r}")
        version = self.version()
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / HLO_FILE).write_bytes(hlo_proto)
        cmd = self.command(target, flags)
        start = time.monotonic()
        # Its own process group, led by the guard: a timeout, an interrupt or this
        # process's death kills the compiler and every helper it spawned.
        proc = subprocess.Popen(
            [sys.executable, "-I", str(_GUARD), str(os.getpid()), *cmd],
            cwd=workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, _ = proc.communicate()
            timed_out = True
        except BaseException:
            _kill_group(proc)
            raise
        if proc.returncode is not None and proc.returncode < 0:
            _kill_group(proc)  # helpers left behind by a compiler that was killed
        seconds = time.monotonic() - start
        log = self._log(workdir, out)
        rc = proc.returncode
        if timed_out:
            raise CompileError(
                f"neuronx-cc timed out after {timeout:.0f}s for target {target}; raise the "
                "compile timeout or use a faster host",
                reason="timeout",
                log=log,
                returncode=rc,
            )
        if rc == -signal.SIGKILL or _OOM_MARKER in log:
            raise CompileError(
                f"neuronx-cc was killed (exit {rc}), most likely out of memory; compile on a "
                "host with more memory or lower concurrency (--max-memory)",
                reason="oom",
                log=log,
                returncode=rc,
            )
        if rc != 0:
            raise CompileError(
                f"neuronx-cc failed with exit {rc} for target {target}; see the compile log",
                reason="exit",
                log=log,
                returncode=rc,
            )
        neff = workdir / NEFF_FILE
        if not neff.is_file():
            raise CompileError(
                f"neuronx-cc exited 0 but wrote no {NEFF_FILE} in {workdir}",
                reason="exit",
                log=log,
                returncode=rc,
            )
        return CompileResult(
            executable=neff.read_bytes(),
            format=NEFF_FORMAT,
            log=log,
            compiler=self.name,
            compiler_version=version,
            flags=tuple(flags),
            seconds=seconds,
        )

    @staticmethod
    def _log(workdir: Path, output: bytes | None) -> str:
        """The compiler's log file, then its console output (both may hold the cause)."""
        parts = []
        logfile = workdir / LOG_FILE
        if logfile.is_file():
            parts.append(logfile.read_text(errors="replace"))
        if output:
            parts.append(output.decode(errors="replace"))
        return "\n".join(parts)
