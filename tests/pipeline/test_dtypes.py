"""bfloat16 and float16 releases end to end: `kiln compile` (real tracing and xla-cpu
compiles), then the deploy-side loader, against eager transformers in the same dtype."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch_xla")
pytest.importorskip("jaxlib")
ml_dtypes = pytest.importorskip("ml_dtypes")

import runtime_loader  # noqa: E402
from runtime_loader.executors.xla_cpu import DeviceBuffers  # noqa: E402
from runtime_loader.safetensors_np import load_safetensors  # noqa: E402
from tests.helpers.loader_helpers import HEAVY, kiln_env  # noqa: E402
from tests.helpers.model_helpers import TINY_BERT  # noqa: E402
from tests.helpers.pipeline_helpers import (  # noqa: E402
    MICRO_LLAMA,
    compile_json,
    graph_of,
    micro_model,
    read_blob,
    release,
    run_graph,
    write_spec,
)

DTYPES = ("bfloat16", "float16")
# Per dtype: (encoder hidden-state atol, decoder logit atol). The reference runs torch's CPU
# kernels in that dtype and XLA fuses and orders the math differently, so a few ulps of the
# output scale apart is expected.
TOLERANCE = {"bfloat16": (0.08, 0.05), "float16": (0.01, 0.01)}
PROMPTS = [[3, 5, 7, 9, 11], [42, 17, 8]]
NEW_TOKENS = 6
BERT_BUCKET = {"batch": [2], "seq": [16]}
LLAMA_BUCKET = {"batch": [1], "seq": [16]}


def _bert(dtype: str) -> dict[str, Any]:
    source = {"seed": 0, "config": TINY_BERT}
    return {"name": f"bert-{dtype}", "task": "encoder", "source": source, "buckets": BERT_BUCKET,
            "dtype": dtype}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("dtypes")
    models = []
    for dtype in DTYPES:
        llama = {**micro_model(f"llama-{dtype}"), "dtype": dtype, "buckets": LLAMA_BUCKET}
        models += [llama, _bert(dtype)]
    report = compile_json(write_spec(tmp / "spec.yaml", *models), tmp / "store", workers=1)
    assert report["failed"] == 0, [i["error"] for i in report["items"] if i["error"]]
    return tmp / "store"


def _eager(task: str, config: dict[str, Any], dtype: str) -> Any:
    """The eager model as pipeline/sources.load_model builds it (config + seed), in dtype."""
    import torch
    import transformers

    cfg = transformers.AutoConfig.for_model(**config)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    auto = transformers.AutoModelForCausalLM if task == "causal-lm" else transformers.AutoModel
    return auto.from_config(cfg, dtype=getattr(torch, dtype), attn_implementation="eager").eval()


def _as_float(array: Any) -> np.ndarray:
    return np.asarray(array).astype(np.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_encoder_matches_eager_in_its_dtype(store: Path, dtype: str, tmp_path: Path) -> None:
    import torch

    model = runtime_loader.load(f"bert-{dtype}:latest", store=str(store), cache_dir=tmp_path)
    ids = np.array([[1, 5, 9, 13, 2, 0], [4, 8, 15, 16, 23, 42]], dtype=np.int64)
    mask = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], dtype=np.int64)
    got = model(ids, mask)
    assert got["last_hidden_state"].dtype == np.dtype(getattr(ml_dtypes, dtype, dtype))
    with torch.no_grad():
        want = _eager("encoder", TINY_BERT, dtype)(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
        )
    hidden = want.last_hidden_state.float().numpy()
    error = np.abs(_as_float(got["last_hidden_state"]) - hidden)[mask.astype(bool)].max()
    assert error <= TOLERANCE[dtype][0], error
    pooled = np.abs(_as_float(got["pooler_output"]) - want.pooler_output.float().numpy()).max()
    assert pooled <= TOLERANCE[dtype][0], pooled


@pytest.mark.parametrize("dtype", DTYPES)
def test_decoder_logits_and_greedy_tokens_match_eager(
    store: Path, dtype: str, tmp_path: Path
) -> None:
    import torch

    ref = f"llama-{dtype}:latest"
    eager = _eager("causal-lm", MICRO_LLAMA, dtype)
    _, rel = release(store, ref)
    weights = load_safetensors(read_blob(store, rel.source.weights[0].digest))
    # every weight in the release's dtype but rotary inv_freq, which transformers keeps float32
    assert {str(w.dtype) for n, w in weights.items() if not n.endswith("inv_freq")} == {dtype}
    seq = 16
    ids = np.zeros((1, seq), dtype=np.int64)
    ids[0, : len(PROMPTS[0])] = PROMPTS[0]
    mask = (np.arange(seq) < len(PROMPTS[0]))[None].astype(np.int64)
    got = run_graph(store, graph_of(rel, "context_encoding", 1, seq), weights,
                    {"input_ids": ids, "attention_mask": mask})
    with torch.no_grad():
        want = eager(input_ids=torch.tensor([PROMPTS[0]])).logits[0, -1].float().numpy()
    error = np.abs(_as_float(got["logits"][0]) - want).max()
    assert error <= TOLERANCE[dtype][1], error

    model = runtime_loader.load(ref, store=str(store), cache_dir=tmp_path)
    for prompt in PROMPTS:
        tokens = model.generate([prompt], max_new_tokens=NEW_TOKENS)[0].tolist()
        with torch.no_grad():
            reference = eager.generate(
                torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=0,
            )[0, len(prompt):].tolist()
        assert tokens == reference, (dtype, prompt)


LOAD_AND_RUN = """
import json, sys
import runtime_loader
model = runtime_loader.load(sys.argv[1], store=sys.argv[2], cache_dir=sys.argv[3])
if sys.argv[1].startswith("bert"):
    model([[1, 2, 3]])
else:
    model.generate([[1, 2, 3]], max_new_tokens=3)
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


@pytest.mark.parametrize("ref", ["llama-bfloat16:latest", "bert-float16:latest"])
def test_half_precision_release_loads_without_torch_or_jax(
    store: Path, ref: str, tmp_path: Path
) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_AND_RUN, ref, str(store), str(tmp_path / "cache")],
        env=kiln_env(), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    modules = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert "jaxlib" in modules and modules.isdisjoint({*HEAVY, "pipeline"})


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_device_buffers_round_trip_half_precision(dtype: str) -> None:
    np_dtype = np.dtype(getattr(ml_dtypes, dtype, dtype))
    buffers = DeviceBuffers()
    for shape in [(3, 5), (), (2, 1, 4)]:
        array = (np.arange(int(np.prod(shape))).reshape(shape) / 7 - 1).astype(np_dtype)
        back = buffers.upload(array).numpy()
        assert back.dtype == np_dtype and back.shape == shape
        assert back.tobytes() == array.tobytes()


def test_safetensors_reader_reads_bfloat16_bits() -> None:
    import torch
    from safetensors.torch import save

    tensor = torch.linspace(-3, 3, 12, dtype=torch.bfloat16).reshape(3, 4)
    (name, array), = load_safetensors(save({"w": tensor})).items()
    assert name == "w" and array.dtype == np.dtype(ml_dtypes.bfloat16) and array.shape == (3, 4)
    assert np.array_equal(array.view(np.uint16), tensor.view(torch.int16).numpy().view(np.uint16))
