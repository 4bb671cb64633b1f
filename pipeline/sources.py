"""Model sources: their config without torch (for keys), and the model itself (for tracing)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from pathlib import Path
from typing import Any

from pipeline.errors import SpecError
from pipeline.file_digests import file_digest
from pipeline.spec import ModelSource, ModelSpec
from pipeline.tracers.versions import tracer_versions

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)


def source_folder(source: ModelSource, model: str) -> Path | None:
    """The folder holding config.json and weights, or None for a config-only source."""
    if source.kind == "folder":
        folder = Path(source.path or "")
    elif source.kind == "package":
        spec = importlib.util.find_spec(source.package or "")
        if spec is None or not spec.submodule_search_locations:
            raise SpecError(
                f"model {model}: package {source.package!r} is not installed"
                f" (pip install it, or point source at a folder)"
            )
        folder = Path(list(spec.submodule_search_locations)[0]) / (source.path or "")
        if not (folder / "config.json").is_file():
            found = sorted(
                p.parent for p in folder.rglob("config.json") if any(p.parent.glob("*.safetensors"))
            )
            if len(found) == 1:
                folder = found[0]
    else:
        return None
    if not (folder / "config.json").is_file():
        raise SpecError(f"model {model}: no config.json in {folder}")
    return folder


def raw_config(model: ModelSpec) -> dict[str, Any]:
    """The model's config as written (config.json or the spec's config), read without torch."""
    folder = source_folder(model.source, model.name)
    if folder is None:
        return dict(model.source.config or {})
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SpecError(
            f"model {model.name}: cannot read {folder / 'config.json'}: {exc}"
        ) from None


SAFETENSORS_INDEX = "model.safetensors.index.json"


def weight_files(folder: Path, model: str) -> list[Path]:
    """The checkpoint's weight files: the shards its safetensors index names (each must
    exist), else every *.safetensors (or *.bin) file in the folder."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SpecError(f"model {model}: bad checkpoint index {index}: {exc}") from None
        for name in names:
            if not (folder / name).is_file():
                raise SpecError(
                    f"model {model}: {index} names shard {name}, which is not in {folder}"
                )
        return [folder / name for name in names]
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        raise SpecError(f"model {model}: no *.safetensors weights in {folder}")
    return files


def weights_identity(model: ModelSpec) -> dict[str, Any]:
    """What decides the weights: the weight files' digests, or the config and seed."""
    folder = source_folder(model.source, model.name)
    if folder is None:
        return {
            "config": model.source.config,
            "seed": model.source.seed,
            "torch": tracer_versions().get("torch", ""),
        }
    return {"files": {f.name: file_digest(f) for f in weight_files(folder, model.name)}}


def tokenizer_files(model: ModelSpec) -> list[Path]:
    folder = source_folder(model.source, model.name)
    if folder is None:
        return []
    return [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]


TORCH_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def load_model(model: ModelSpec) -> Any:
    """Build the transformers model in eval mode (weights from the folder or a seeded init)."""
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    transformers.utils.logging.disable_progress_bar()
    dtype = getattr(torch, TORCH_DTYPES[model.dtype])
    folder = source_folder(model.source, model.name)
    auto = (
        transformers.AutoModelForCausalLM if model.task == "causal-lm" else transformers.AutoModel
    )
    if folder is not None:
        loaded, info = auto.from_pretrained(
            str(folder), dtype=dtype, attn_implementation="eager", output_loading_info=True
        )
        missing = sorted(info.get("missing_keys") or ())
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise SpecError(
                f"model {model.name}: the checkpoint in {folder} has no tensor {missing[0]}{more}"
            )
    else:
        config = transformers.AutoConfig.for_model(**model.source.config)  # type: ignore[arg-type]
        config._attn_implementation = "eager"
        torch.manual_seed(model.source.seed)
        loaded = auto.from_config(config, dtype=dtype, attn_implementation="eager")
    return loaded.eval()
