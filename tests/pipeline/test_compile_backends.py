"""Compiler backends: xla-cpu for real (jaxlib), neuronx-cc against a stand-in script."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.compile import backend_for_target, get_compiler
from pipeline.compile.neuronx_cc import NeuronxCcCompiler, is_available
from pipeline.errors import BackendUnavailableError, CompileError, PipelineError

REPO = Path(__file__).resolve().parents[2]


# --- target -> backend --------------------------------------------------------------------


@pytest.mark.parametrize(
    "target,backend",
    [("cpu", "xla-cpu"), ("inf2", "neuronx-cc"), ("trn1", "neuronx-cc"), ("trn2", "neuronx-cc")],
)
def test_backend_for_target(target: str, backend: str) -> None:
    assert backend_for_target(target) == backend
    assert backend_for_target(target, backend) == backend
    assert get_compiler(backend).name == backend


def test_neuron_target_is_never_compiled_by_xla_cpu() -> None:
    with pytest.raises(PipelineError, match="cannot compile for target 'trn1'"):
        backend_for_target("trn1", "xla-cpu")
    with pytest.raises(PipelineError, match="unknown target"):
        backend_for_target("tpu")
    with pytest.raises(PipelineError, match="unknown compiler backend"):
        get_compiler("gcc")


# --- xla-cpu ------------------------------------------------------------------------------

_RUN_SCRIPT = """
import sys
import numpy as np
from runtime_loader.executors.xla_cpu import DeviceBuffers, XlaCpuExecutable
exe = XlaCpuExecutable.load(open(sys.argv[1], "rb").read())
args = np.load(sys.argv[2])
weight = DeviceBuffers().upload(args["w.weight"])  # uploaded once, passed as a handle
outs = exe.run([weight if n == "w.weight" else args[n] for n in args["order"]])
np.save(sys.argv[3], outs[0])
heavy = [m for m in ("torch", "jax", "transformers", "pipeline") if m in sys.modules]
assert not heavy, heavy
"""


@pytest.fixture(scope="module")
def small_graph():  # type: ignore[no-untyped-def]
    """(traced graph, module) of a small MLP with int64 and float inputs."""
    import torch

    from pipeline.trace import trace_graph

    class Mlp(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Linear(6, 4)

        def forward(self, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return torch.tanh(self.w(x)) * 2.0, ids * 3 + 1

    torch.manual_seed(0)
    module = Mlp().eval()
    example = {"x": torch.zeros(2, 6), "ids": torch.zeros(5, dtype=torch.int64)}
    return trace_graph(module, example, ["y", "ids3"]), module


def test_xla_cpu_executable_runs_in_a_jaxlib_only_process(small_graph, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import jaxlib.version
    import torch

    traced, module = small_graph
    compiler = get_compiler("xla-cpu")
    result = compiler.compile(traced.hlo_proto, "cpu", ["--opt=1"], tmp_path, 60)
    assert (result.format, result.compiler) == ("xla-cpu", "xla-cpu")
    assert result.compiler_version == compiler.version()
    assert compiler.version().startswith(f"jaxlib-{jaxlib.version.__version__}+")
    assert result.flags == ("--opt=1",) and result.seconds > 0 and "StableHLO" in result.log

    x = np.random.default_rng(0).standard_normal((2, 6)).astype(np.float32)
    ids = np.array([1, 2, 3, 2**40, -7], dtype=np.int64)  # int64 must not be narrowed
    params = {
        "w.weight": module.w.weight.detach().numpy(),
        "w.bias": module.w.bias.detach().numpy(),
        "x": x,
        "ids": ids,
    }
    order = [p.name for p in traced.signature.parameters]  # HLO parameter order
    assert sorted(order) == sorted(params)
    (tmp_path / "exe.bin").write_bytes(result.executable)
    np.savez(tmp_path / "args.npz", order=np.array(order), **params)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _RUN_SCRIPT,
            str(tmp_path / "exe.bin"),
            str(tmp_path / "args.npz"),
            str(tmp_path / "out.npy"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    with torch.no_grad():
        want = module(torch.from_numpy(x), torch.from_numpy(ids))
    assert np.abs(np.load(tmp_path / "out.npy") - want[0].numpy()).max() < 1e-6

    from runtime_loader.executors.xla_cpu import XlaCpuExecutable

    outs = XlaCpuExecutable.load(result.executable).run([params[n] for n in order])
    assert outs[1].dtype == np.int64 and outs[1].tolist() == (ids * 3 + 1).tolist()


@pytest.mark.parametrize("kind", ["token_generation", "context_encoding"])
def test_bfloat16_decoder_converts_one_weight_at_a_time(kind: str, tmp_path: Path) -> None:
    """XLA_FLAGS_KILN in effect: a bfloat16 decoder graph's scratch memory (one token, or a
    16-row context) holds a converted float32 weight or two, not every weight's float32
    copy at once (what XLA CPU's default scheduler did: 3x the weights of the 1.1B Llama at
    load); and the Linears' multiply-reduce form (pipeline/layout.py) materializes no
    float32 weight or broadcast input, so not even the wide lm_head's float32 copy is live
    whole."""
    import torch

    from pipeline.graphs.causal_lm import (
        build_causal_lm_graphs,
        build_model_from_config,
        tiny_llama_config,
    )
    from pipeline.trace import trace_graph
    from runtime_loader.executors.xla_cpu import XlaCpuExecutable

    config = tiny_llama_config(
        hidden_size=256, intermediate_size=512, num_hidden_layers=4, vocab_size=16384
    )
    model = build_model_from_config(config).to(torch.bfloat16)
    module, inputs, outputs = build_causal_lm_graphs(model, 1, 16)[kind]
    traced = trace_graph(module, inputs, outputs)
    result = get_compiler("xla-cpu").compile(traced.hlo_proto, "cpu", (), tmp_path, 300)
    loaded = XlaCpuExecutable.load(result.executable)._loaded
    scratch = loaded.get_compiled_memory_stats().temp_size_in_bytes
    float32_weights = sum(p.numel() * 4 for p in model.parameters())
    assert scratch < 0.25 * float32_weights, (scratch, float32_weights)
    lm_head_float32 = model.lm_head.weight.numel() * 4
    assert scratch < 0.5 * lm_head_float32, (scratch, lm_head_float32)


FLAGS_READ_FIRST = """
import jaxlib._jax as xla
xla.get_tfrt_cpu_client(asynchronous=True).local_devices()  # XLA reads XLA_FLAGS here
from pipeline.compile import get_compiler
from pipeline.errors import CompileError
try:
    get_compiler("xla-cpu").compile(b"", "cpu", (), ".", 60)
except CompileError as exc:
    print(exc)
"""


def test_xla_cpu_refuses_to_compile_without_its_flags(tmp_path: Path) -> None:
    """jaxlib used before the backend could set XLA_FLAGS: a clear error, not an executable
    compiled with other options under this backend's version."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [sys.executable, "-c", FLAGS_READ_FIRST],
        cwd=REPO,
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "read XLA_FLAGS before Kiln could add" in proc.stdout, proc.stdout
    assert "--xla_cpu_enable_concurrency_optimized_scheduler=false" in proc.stdout


def test_xla_cpu_failures(tmp_path: Path) -> None:
    compiler = get_compiler("xla-cpu")
    with pytest.raises(CompileError) as info:
        compiler.compile(b"\x08\x01 not an HLO module", "cpu", (), tmp_path, 60)
    assert info.value.reason == "exit" and "failed" in info.value.log
    with pytest.raises(ValueError, match="target 'cpu' only"):
        compiler.compile(b"", "inf2", (), tmp_path, 60)


# --- neuronx-cc against a stand-in -------------------------------------------------------

STAND_IN = """#!/bin/sh
# Test double for the AWS Neuron SDK's neuronx-cc, which cannot be installed here. It
# mimics the CLI surface the driver uses; KILN_FAKE_NEURONX_CC picks the behaviour.
if [ "$1" = "--version" ]; then
    echo "NeuronX Compiler version 2.10.0.34+6c8792c6f"
    echo "Python version 3.11"
    exit 0
fi
echo "$@" > args.txt
case "$KILN_FAKE_NEURONX_CC" in
    ok)
        echo "INFO: compiled $2 for $6" > "${10}"
        printf 'NEFF:' > "$8"; cat "$2" >> "$8"
        echo "Compiler status PASS" ;;
    exit1)
        echo "ERROR: unsupported operator" > "${10}"; exit 1 ;;
    f137)
        echo "[F137] neuronx-cc was forcibly killed - insufficient system memory" > "${10}"
        exit 70 ;;
    sigkill)
        echo "INFO: starting" > "${10}"; kill -9 $$ ;;
    sleep)
        sleep 60 & echo $! > child.pid; wait ;;
    no-output)
        exit 0 ;;
esac
"""


@pytest.fixture
def fake_neuronx_cc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> NeuronxCcCompiler:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "neuronx-cc"
    script.write_text(STAND_IN)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return NeuronxCcCompiler()


def _compile(
    compiler: NeuronxCcCompiler,
    mode: str,
    workdir: Path,
    monkeypatch: pytest.MonkeyPatch,
    timeout: float = 30,
):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("KILN_FAKE_NEURONX_CC", mode)
    return compiler.compile(
        b"hlo-bytes", "trn1", ["--model-type", "transformer", "-O2"], workdir, timeout
    )


def test_neuronx_cc_success(
    fake_neuronx_cc: NeuronxCcCompiler, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert is_available()
    assert fake_neuronx_cc.version() == "2.10.0.34+6c8792c6f"
    result = _compile(fake_neuronx_cc, "ok", tmp_path / "w", monkeypatch)
    assert result.executable == b"NEFF:hlo-bytes" and result.format == "neff"
    assert (result.compiler, result.compiler_version) == ("neuronx-cc", "2.10.0.34+6c8792c6f")
    assert result.flags == ("--model-type", "transformer", "-O2")
    assert "compiled model.hlo_module.pb for trn1" in result.log and "PASS" in result.log
    assert (tmp_path / "w" / "model.hlo_module.pb").read_bytes() == b"hlo-bytes"
    assert (tmp_path / "w" / "args.txt").read_text().split() == [
        "compile",
        "model.hlo_module.pb",
        "--framework",
        "XLA",
        "--target",
        "trn1",
        "--output",
        "model.neff",
        "--logfile",
        "log-neuron-cc.txt",
        "--model-type",
        "transformer",
        "-O2",
    ]


@pytest.mark.parametrize(
    "mode,reason,returncode,log_text",
    [
        ("exit1", "exit", 1, "unsupported operator"),
        ("sigkill", "oom", -9, "starting"),
        ("f137", "oom", 70, "[F137]"),
        ("no-output", "exit", 0, ""),
    ],
)
def test_neuronx_cc_failures(
    fake_neuronx_cc: NeuronxCcCompiler,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
    reason: str,
    returncode: int,
    log_text: str,
) -> None:
    with pytest.raises(CompileError) as info:
        _compile(fake_neuronx_cc, mode, tmp_path / "w", monkeypatch)
    assert (info.value.reason, info.value.returncode) == (reason, returncode)
    assert log_text in info.value.log


def test_neuronx_cc_timeout_kills_the_process_group(
    fake_neuronx_cc: NeuronxCcCompiler, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    start = time.monotonic()
    with pytest.raises(CompileError) as info:
        _compile(fake_neuronx_cc, "sleep", tmp_path / "w", monkeypatch, timeout=1.0)
    assert info.value.reason == "timeout" and time.monotonic() - start < 10
    child = int((tmp_path / "w" / "child.pid").read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _alive(child):
        time.sleep(0.05)
    assert not _alive(child), "the compiler's child process survived the timeout"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_neuronx_cc_missing_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert not is_available()
    assert backend_for_target("inf2") == "neuronx-cc"  # never falls back to xla-cpu
    with pytest.raises(BackendUnavailableError, match="Neuron SDK") as info:
        NeuronxCcCompiler().compile(b"hlo", "inf2", (), tmp_path, 10)
    assert info.value.reason == "unavailable"


WORKER = """
import os, sys
from pathlib import Path
from pipeline.compile.neuronx_cc import NeuronxCcCompiler
os.environ["KILN_FAKE_NEURONX_CC"] = "sleep"
NeuronxCcCompiler().compile(b"hlo", "trn1", [], Path(sys.argv[1]), 600)
"""


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT])
def test_neuronx_cc_dies_with_the_worker_that_started_it(
    fake_neuronx_cc: NeuronxCcCompiler, tmp_path: Path, how: signal.Signals
) -> None:
    """A worker killed outright (the OOM killer, kill -9) or interrupted mid-compile leaves
    no compiler behind: the fake neuronx-cc and the helper it started both end."""
    workdir = tmp_path / "w"
    worker = subprocess.Popen([sys.executable, "-c", WORKER, str(workdir)], cwd=REPO)
    pid_file = workdir / "child.pid"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (pid_file.is_file() and pid_file.read_text()):
        time.sleep(0.05)
    helper = int(pid_file.read_text())
    compiler = [p for p in _processes() if "neuronx-cc" in p[1] and p[0] != worker.pid]
    assert compiler and _alive(helper)
    worker.send_signal(how)
    worker.wait(timeout=30)
    deadline = time.monotonic() + 10
    pids = [helper, *(pid for pid, _ in compiler)]
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    assert not [p for p in pids if _alive(p)], "the compiler outlived its worker"


def _processes() -> list[tuple[int, str]]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            out.append((int(entry.name), cmdline))
    return out
