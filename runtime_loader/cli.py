"""Deploy-side commands: pull, run, generate, cache ls, cache prune. No build-side imports."""

from __future__ import annotations

import re
from pathlib import Path

import click

from artifacts.cli import emit_json, json_option, store_options
from artifacts.config import CACHE_ENV
from artifacts.progress import ProgressLine
from artifacts.table import human_size, human_time, render_table
from runtime_loader.errors import BadInput

cache_option = click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar=CACHE_ENV,
    help=f"The host's local cache [env {CACHE_ENV}; default ~/.cache/kiln/loader].",
)
offline_option = click.option(
    "--offline", is_flag=True, default=None, help="Use only the local cache [env KILN_OFFLINE=1]."
)


@click.command("pull")
@click.argument("ref")
@click.option("--target", default=None, help="Fail unless the release is for this target.")
@click.option("--workers", default=8, show_default=True, help="Parallel blob downloads.")
@store_options
@cache_option
@json_option
def pull_command(
    ref: str,
    target: str | None,
    workers: int,
    store_url: str | None,
    index_url: str | None,
    cache_dir: Path | None,
    as_json: bool,
) -> None:
    """Fetch (and verify) only the blobs REF needs into the local cache."""
    # Deferred, as below: the store, the cache and numpy stay out of `kiln --help`.
    from runtime_loader.api import resolve_and_pull  # noqa: PLC0415
    from runtime_loader.cache import LocalCache  # noqa: PLC0415

    _, _, report = resolve_and_pull(
        ref,
        store_url,
        LocalCache(cache_dir),
        index_url,
        workers,
        ProgressLine("pull", not as_json),
        target=target,
    )
    if as_json:
        emit_json(report.to_json())
        return
    click.echo(
        f"pulled {ref} ({report.digest}) for {report.target}: {report.fetched} blobs"
        f" fetched ({human_size(report.bytes_fetched)}), {report.cached} already cached,"
        f" {report.seconds:.2f}s"
    )


def _load(ref, store_url, index_url, cache_dir, offline):  # type: ignore[no-untyped-def]
    from runtime_loader.api import load  # noqa: PLC0415

    return load(ref, store=store_url, index=index_url, cache_dir=cache_dir, offline=offline)


@click.command("run")
@click.argument("ref")
@click.option("--text", "texts", multiple=True, help="Text to embed (repeatable).")
@click.option(
    "--input",
    "input_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="An .npz with named inputs (input_ids, attention_mask).",
)
@click.option(
    "--output",
    "output_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write all outputs to this .npz.",
)
@store_options
@cache_option
@offline_option
@json_option
def run_command(
    ref: str,
    texts: tuple[str, ...],
    input_path: Path | None,
    output_path: Path | None,
    store_url: str | None,
    index_url: str | None,
    cache_dir: Path | None,
    offline: bool | None,
    as_json: bool,
) -> None:
    """Run an encoder release on text or on an .npz of inputs."""
    import numpy as np  # noqa: PLC0415

    from runtime_loader.inputs import load_npz  # noqa: PLC0415

    if bool(texts) == bool(input_path):
        raise click.UsageError("give either --text (one or more) or --input FILE.npz")
    model = _load(ref, store_url, index_url, cache_dir, offline)
    if not hasattr(model, "encode"):
        raise BadInput(f"{ref} is a {model.task} model: use `kiln generate`")
    if texts:
        outputs = {"embeddings": model.encode(list(texts))}
    else:
        data = load_npz(input_path)
        if "input_ids" not in data:
            listed = ", ".join(sorted(data)) or "none"
            raise BadInput(f"{input_path}: needs an input_ids array (it has: {listed})")
        try:
            outputs = model(data["input_ids"], data.get("attention_mask"))
        except BadInput as exc:
            raise BadInput(f"{input_path}: {exc}") from None
    if output_path is not None:
        np.savez(output_path, **outputs)
    summary = {
        name: {
            "shape": list(value.shape),
            "dtype": str(value.dtype),
            "first": [round(float(x), 6) for x in value.reshape(-1)[:8]],
        }
        for name, value in outputs.items()
    }
    if as_json:
        emit_json(summary)
        return
    for name, info in summary.items():
        click.echo(f"{name}: shape {tuple(info['shape'])} {info['dtype']}")
        click.echo(f"  first values: {' '.join(f'{v:.6f}' for v in info['first'])}")


def _ids(text: str) -> list[list[int]]:

    rows = []
    for row in text.split(";"):
        if not re.fullmatch(r"\s*\d+(\s*,\s*\d+)*\s*", row):
            # A LoaderError, so `kiln` prints one line (no usage block) like other input errors.
            raise BadInput(
                f"--prompt-ids {text!r}: expected comma-separated token ids,"
                " rows separated by ';' (e.g. 1,2,3;4,5)"
            )
        rows.append([int(t) for t in row.split(",")])
    return rows


@click.command("generate")
@click.argument("ref")
@click.option("--prompt-ids", required=True, help="Token ids: 1,2,3 (rows separated by ';').")
@click.option("--max-new-tokens", default=32, show_default=True)
@click.option("--eos-token-id", type=int, default=None)
@click.option("--do-sample", is_flag=True)
@click.option("--top-k", type=int, default=None)
@click.option("--top-p", type=float, default=None)
@click.option(
    "--temperature", type=float, default=1.0, show_default=True, help="With --do-sample; 0: greedy."
)
@click.option("--seed", type=int, default=None)
@click.option("--stream", is_flag=True, help="Print tokens as they are generated.")
@store_options
@cache_option
@offline_option
@json_option
def generate_command(
    ref: str,
    prompt_ids: str,
    max_new_tokens: int,
    eos_token_id: int | None,
    do_sample: bool,
    top_k: int | None,
    top_p: float | None,
    temperature: float,
    seed: int | None,
    stream: bool,
    store_url: str | None,
    index_url: str | None,
    cache_dir: Path | None,
    offline: bool | None,
    as_json: bool,
) -> None:
    """Generate tokens with a causal-LM release (context encoding, then token generation).

    --temperature 0 means greedy decoding, as without --do-sample."""
    from runtime_loader import inputs  # noqa: PLC0415
    from runtime_loader.sampling import SamplingConfig  # noqa: PLC0415

    prompts = _ids(prompt_ids)
    SamplingConfig(do_sample, temperature, top_k, top_p)  # bad options fail before any pull
    inputs.generation(max_new_tokens, eos_token_id, seed, None, None)
    model = _load(ref, store_url, index_url, cache_dir, offline)
    if not hasattr(model, "generate"):
        raise BadInput(f"{ref} is an {model.task} model: use `kiln run`")
    inputs.prompts(prompts, model.vocab_size, name="--prompt-ids")
    options = dict(
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        do_sample=do_sample,
        top_k=top_k,
        top_p=top_p,
        temperature=temperature,
        seed=seed,
    )
    if stream and not as_json:
        for step in model.generate_stream(prompts, **options):
            click.echo(" ".join(str(int(t)) for t in step))
        return
    tokens = model.generate(prompts, **options)
    if as_json:
        emit_json({"tokens": tokens.tolist()})
        return
    for row in tokens:
        click.echo(",".join(str(int(t)) for t in row))


@click.group("cache")
def cache_group() -> None:
    """Inspect and prune the host's local cache."""


@cache_group.command("ls")
@cache_option
@json_option
def cache_ls(cache_dir: Path | None, as_json: bool) -> None:
    """Cached blobs, least recently used first."""
    from runtime_loader.cache import LocalCache  # noqa: PLC0415

    blobs = sorted(LocalCache(cache_dir).blobs(), key=lambda b: b.last_used)
    if as_json:
        emit_json([b.__dict__ for b in blobs])
        return
    click.echo(
        render_table(
            ["DIGEST", "SIZE", "LAST USED (UTC)"],
            [[b.digest, human_size(b.size), human_time(b.last_used)] for b in blobs],
        )
    )
    click.echo(f"{len(blobs)} blobs, {human_size(sum(b.size for b in blobs))}")


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", text, re.IGNORECASE)
    if not match:
        raise click.BadParameter(
            f"{text!r}: expected a size like 500M, 2G or 1024", param_hint="--max-size"
        )
    unit = (match.group(2) or "").upper().rstrip("B").rstrip("I")
    factor = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[unit]
    return int(float(match.group(1)) * factor)


@cache_group.command("prune")
@click.option("--max-size", required=True, help="Keep at most this much (e.g. 2G, 500M).")
@click.option("--dry-run", is_flag=True)
@cache_option
@json_option
def cache_prune(max_size: str, dry_run: bool, cache_dir: Path | None, as_json: bool) -> None:
    """Delete least recently used blobs until the cache fits in --max-size."""
    from runtime_loader.cache import LocalCache  # noqa: PLC0415

    removed = LocalCache(cache_dir).prune(parse_size(max_size), dry_run)
    freed = sum(b.size for b in removed)
    if as_json:
        emit_json({"dry_run": dry_run, "removed": [b.digest for b in removed], "bytes": freed})
        return
    verb = "would free" if dry_run else "freed"
    click.echo(f"{verb} {human_size(freed)} in {len(removed)} blobs")


__all__ = ["cache_group", "generate_command", "pull_command", "run_command"]
