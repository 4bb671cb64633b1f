"""The `torch-neuronx` tracer: real tracing where the AWS Neuron SDK's torch-neuronx can be
imported (skipped elsewhere, with the reason), and a clear plan-time error where it cannot."""

from __future__ import annotations

import pytest

from artifacts.store import Store
from pipeline.errors import PipelineError
from pipeline.jobs import plan_spec
from pipeline.spec import parse_spec
from pipeline.tracers import DEFAULT_TRACER, get_tracer, tracer_identity
from pipeline.tracers.torch_neuronx import import_problem
from tests.helpers.model_helpers import TINY_BERT

PROBLEM = import_problem()
needs_torch_neuronx = pytest.mark.skipif(
    PROBLEM is not None,
    reason=f"torch-neuronx (AWS Neuron SDK, Neuron's package index) unusable here: {PROBLEM}",
)
without_torch_neuronx = pytest.mark.skipif(
    PROBLEM is None, reason="torch-neuronx is installed here"
)


def _spec(tracer: str | None = None):  # type: ignore[no-untyped-def]
    model = {
        "name": "bert",
        "task": "encoder",
        "source": {"config": TINY_BERT},
        "buckets": {"batch": [1], "seq": [16]},
        "targets": ["inf2"],
    }
    if tracer:
        model["tracer"] = tracer
    return parse_spec({"models": [model]}, "spec.yaml")


def test_tracer_key_defaults_to_torch_xla() -> None:
    assert _spec().models[0].tracer == DEFAULT_TRACER == "torch-xla"
    assert _spec("torch-neuronx").models[0].tracer == "torch-neuronx"


def test_default_tracer_identity_is_unchanged() -> None:
    from pipeline.sources import tracer_versions

    # direct keys of torch-xla graphs do not move because tracers became selectable
    assert tracer_identity("torch-xla") == tracer_versions()
    assert tracer_identity("torch-neuronx")["tracer"] == "torch-neuronx"


@without_torch_neuronx
def test_missing_torch_neuronx_fails_the_plan_naming_the_package(store: Store) -> None:
    with pytest.raises(PipelineError, match=r"tracer torch-neuronx needs the torch-neuronx"):
        plan_spec(_spec("torch-neuronx"), store)
    with pytest.raises(PipelineError, match=r"install the Neuron SDK, or use `tracer: torch-xla`"):
        get_tracer("torch-neuronx")


@without_torch_neuronx
def test_missing_torch_neuronx_fails_each_graph_at_trace_time(store: Store) -> None:
    from pipeline.jobs import plan_model
    from pipeline.tasks import trace_model

    pytest.importorskip("torch_xla")
    model = _spec().models[0]
    jobs = plan_model(model, "auto", store, None).jobs
    neuronx = _spec("torch-neuronx").models[0]
    outcome = trace_model(store.backend.url, store.index_url, neuronx, jobs, None, write=False)
    assert not outcome.traced and len(outcome.failed) == len(jobs)
    assert all("torch-neuronx" in message for _, message in outcome.failed)


@needs_torch_neuronx
def test_torch_neuronx_traces_with_weights_as_parameters() -> None:
    import torch  # noqa: F401
    import transformers

    from pipeline.graphs.encoder import build_encoder_graph
    from pipeline.trace import hlo_digest_bytes, weights_state_dict

    config = transformers.AutoConfig.for_model(**TINY_BERT)
    model = transformers.AutoModel.from_config(config).eval()
    module, inputs, outputs = build_encoder_graph(model, 1, 16)
    graph = get_tracer("torch-neuronx")(module, inputs, outputs)
    sig = graph.signature
    assert [p.index for p in sig.parameters] == list(range(len(sig.parameters)))
    assert {p.name for p in sig.parameters if p.kind == "input"} == {"input_ids", "attention_mask"}
    weights = weights_state_dict(module)
    for p in sig.parameters:
        if p.kind == "weight":  # not inlined: every weight is a named HLO parameter
            assert p.name in weights and tuple(weights[p.name].shape) == p.shape
    assert [o.name for o in sig.outputs] == outputs
    assert hlo_digest_bytes(graph.hlo_proto)
