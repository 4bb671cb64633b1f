"""Tracing encoders to HLO with torch-xla, compiling with xla-cpu and running with the
deploy-side executor, against eager transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch_xla")
pytest.importorskip("jaxlib")

import torch  # noqa: E402

from pipeline.compile import get_compiler  # noqa: E402
from pipeline.errors import TraceError  # noqa: E402
from pipeline.graphs.encoder import build_encoder_graph  # noqa: E402
from pipeline.signature import Signature  # noqa: E402
from pipeline.trace import TracedGraph, hlo_digest_bytes, trace_graph, weights_state_dict  # noqa: E402
from runtime_loader.executors.xla_cpu import DeviceBuffers, XlaCpuExecutable  # noqa: E402
from tests.helpers.model_helpers import (  # noqa: E402
    eager,
    hlo_args,
    load_minilm,
    minilm_inputs,
    random_inputs,
    tiny_bert,
    upload_weights,
)

REPO = Path(__file__).resolve().parents[2]
ATOL = 1e-4


def _compile(traced: TracedGraph, tmp_path: Path) -> XlaCpuExecutable:
    result = get_compiler("xla-cpu").compile(traced.hlo_proto, "cpu", (), tmp_path, 300)
    return XlaCpuExecutable.load(result.executable)


def _assert_close(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert np.abs(g - w).max() <= ATOL


def test_minilm_buckets_match_eager_with_shared_weights(tmp_path: Path) -> None:
    model = load_minilm()
    buffers = DeviceBuffers()
    weights = None
    for batch, seq in [(1, 32), (4, 32), (1, 128), (4, 128)]:
        module, example, names = build_encoder_graph(model, batch, seq)
        traced = trace_graph(module, example, names)
        sig = traced.signature
        assert [o.name for o in sig.outputs] == ["last_hidden_state", "pooler_output"]
        assert sig.outputs[0].shape == (batch, seq, 384)
        assert {(p.name, p.dtype, p.shape) for p in sig.parameters if p.kind == "input"} == {
            ("input_ids", "int64", (batch, seq)),
            ("attention_mask", "int64", (batch, seq)),
        }
        # Uploaded once, reused by every bucket's executable (as the loader does).
        weights = weights or upload_weights(module, traced, buffers)
        exe = _compile(traced, tmp_path / f"{batch}x{seq}")
        inputs = minilm_inputs(batch, seq)
        assert inputs["attention_mask"].min() == 0  # real padding in every bucket
        _assert_close(exe.run(hlo_args(traced, weights, inputs)), eager(module, inputs))


def test_signature_round_trips_through_json() -> None:
    module, example, names = build_encoder_graph(tiny_bert(seed=0), 2, 16)
    sig = trace_graph(module, example, names).signature
    assert Signature.from_json(json.loads(json.dumps(sig.to_json()))) == sig
    base = {"index", "name", "dtype", "shape", "kind"}
    for param in sig.to_json()["parameters"]:  # weights also record their stored layout
        assert param.keys() == (base | {"layout"} if param["kind"] == "weight" else base)


_TRACE_SCRIPT = """
import sys
from pipeline.graphs.encoder import build_encoder_graph
from pipeline.trace import trace_graph
from tests.helpers.model_helpers import load_minilm
traced = trace_graph(*build_encoder_graph(load_minilm(), 1, 32))
open(sys.argv[1], "wb").write(traced.hlo_proto)
"""


def test_hlo_is_identical_across_processes_and_digest_drops_debug_metadata(tmp_path: Path) -> None:
    # This process, one more with another hash seed, and one with torch-xla's debug metadata.
    runs = {
        "other": {"PYTHONHASHSEED": "1"},
        "debug": {"PYTHONHASHSEED": "2", "XLA_HLO_DEBUG": "1", "XLA_IR_DEBUG": "1"},
    }
    procs = {}
    for name, extra in runs.items():
        env = {**os.environ, "PJRT_DEVICE": "CPU", "PYTHONPATH": str(REPO), **extra}
        procs[name] = subprocess.Popen(
            [sys.executable, "-c", _TRACE_SCRIPT, str(tmp_path / f"{name}.pb")],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
    here = trace_graph(*build_encoder_graph(load_minilm(), 1, 32)).hlo_proto
    for proc in procs.values():
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out.decode(errors="replace")[-2000:]
    other, debug = ((tmp_path / f"{n}.pb").read_bytes() for n in ("other", "debug"))
    assert other == here
    # Debug metadata carries absolute source paths; the digest bytes must not.
    assert b"modeling_bert.py" in debug and debug != here
    assert b"modeling_bert.py" not in hlo_digest_bytes(debug)
    assert hlo_digest_bytes(debug) == hlo_digest_bytes(here)


def test_weights_are_parameters_not_constants() -> None:
    real = load_minilm()
    # Same architecture, different (random) weights: identical HLO.
    from transformers import AutoModel

    torch.manual_seed(1)
    random = AutoModel.from_config(real.config).eval()
    traced_real = trace_graph(*build_encoder_graph(real, 1, 32))
    traced_random = trace_graph(*build_encoder_graph(random, 1, 32))
    assert traced_real.hlo_proto == traced_random.hlo_proto
    assert (
        trace_graph(*build_encoder_graph(tiny_bert(seed=0), 2, 8)).hlo_proto
        == trace_graph(*build_encoder_graph(tiny_bert(seed=1), 2, 8)).hlo_proto
    )
    # Every parameter and buffer is an HLO parameter; nothing weight-sized is a constant.
    module = build_encoder_graph(real, 1, 32)[0]
    assert set(traced_real.signature.weight_names) == set(weights_state_dict(module))
    constants = [line for line in traced_real.hlo_text.splitlines() if " constant(" in line]
    assert all("[384" not in line and "[30522" not in line for line in constants)


def test_tiny_bert_without_pooler_matches_eager(tmp_path: Path) -> None:
    model = tiny_bert(seed=3, add_pooling_layer=False)
    module, example, names = build_encoder_graph(model, 3, 16)
    assert names == ["last_hidden_state"]
    traced = trace_graph(module, example, names)
    weights = upload_weights(module, traced, DeviceBuffers())
    inputs = random_inputs(3, 16, vocab=100)
    _assert_close(
        _compile(traced, tmp_path).run(hlo_args(traced, weights, inputs)), eager(module, inputs)
    )


class TiedLM(torch.nn.Module):
    """Tied embedding / output head and a non-persistent buffer, as decoder LLMs have."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, 8)
        self.head = torch.nn.Linear(8, 50, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("inv_freq", torch.linspace(0.5, 1.5, 8), persistent=False)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.head(self.embed(ids) * self.inv_freq),)


def test_tied_weights_and_non_persistent_buffers(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    module = TiedLM().eval()
    traced = trace_graph(module, {"ids": torch.zeros(2, 5, dtype=torch.int64)}, ["logits"])
    kinds = {p.name: p.kind for p in traced.signature.parameters}
    assert kinds == {"embed.weight": "weight", "inv_freq": "weight", "ids": "input"}
    state = weights_state_dict(module, traced.signature)
    assert set(state) == {"embed.weight", "inv_freq"}
    save_file(state, tmp_path / "weights.safetensors")  # refuses shared tensors
    # The traced module is a copy: the original stays on the CPU, still tied.
    assert module.head.weight is module.embed.weight and module.embed.weight.device.type == "cpu"
    ids = np.array([[1, 2, 3, 4, 5], [49, 0, 7, 7, 1]], dtype=np.int64)
    weights = upload_weights(module, traced, DeviceBuffers())
    _assert_close(
        _compile(traced, tmp_path).run(hlo_args(traced, weights, {"ids": ids})),
        eager(module, {"ids": ids}),
    )


class ItemMidForward(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (x * float(x.sum().item()),)


class BranchOnValues(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (x + 1,) if bool(x.cpu()[0, 0] > 0) else (x - 1,)


class HostTensorInForward(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (x + torch.tensor([1.0, 2.0]).to(x.device),)


@pytest.mark.parametrize("module_type", [ItemMidForward, BranchOnValues])
def test_cut_trace_raises(module_type: type[torch.nn.Module]) -> None:
    with pytest.raises(TraceError, match="executed a graph or copied device data"):
        trace_graph(module_type(), {"x": torch.ones(3, 2)}, ["y"])


def test_host_tensor_in_forward_raises() -> None:
    with pytest.raises(TraceError, match="neither an input nor a parameter/buffer"):
        trace_graph(HostTensorInForward(), {"x": torch.ones(3, 2)}, ["y"])


def test_python_scalars_are_constants_and_output_count_is_checked() -> None:
    class Scale(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
            return (x * 3.5 + 2,)

    traced = trace_graph(Scale(), {"x": torch.ones(3, 2)}, ["y"])
    assert [(p.name, p.kind) for p in traced.signature.parameters] == [("x", "input")]
    with pytest.raises(TraceError, match="tuple/list of 2 tensors"):
        trace_graph(Scale(), {"x": torch.ones(3, 2)}, ["y", "z"])
