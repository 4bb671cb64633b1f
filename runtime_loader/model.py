"""A loaded release: bucket choice, padding, execution and trimming; generation for LMs."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from artifacts.digest import Digest
from artifacts.manifest import Graph, Release
from runtime_loader import inputs
from runtime_loader.cache import LocalCache
from runtime_loader.cache_reads import map_cached, read_cached
from runtime_loader.errors import BadExecutable, InputTooLarge, LoaderError
from runtime_loader.release_check import check_release, check_weights
from runtime_loader.sampling import SamplingConfig, next_tokens
from runtime_loader.weights import MappedWeights


@dataclass(frozen=True)
class Bucket:
    batch: int
    seq: int

    def __str__(self) -> str:
        return f"{self.batch}x{self.seq}"


class _Runner:
    """Executes graphs of one executable format; weights uploaded once, shared by buckets."""

    def __init__(self, fmt: str, weights: Mapping[str, np.ndarray]) -> None:
        self.format = fmt
        self.weights = weights
        self._uploaded: dict[str, Any] = {}
        self._executables: dict[Digest, Any] = {}
        if fmt == "xla-cpu":
            from runtime_loader.executors.xla_cpu import DeviceBuffers  # noqa: PLC0415

            self._buffers = DeviceBuffers()
        elif fmt == "neff":
            from runtime_loader.executors.neff import NeuronRuntime, find_libnrt  # noqa: PLC0415

            lib = find_libnrt()
            if lib is None:
                raise LoaderError(
                    "this release holds NEFF executables but no Neuron runtime (libnrt) is"
                    " installed here: run it on an Inferentia/Trainium host, or load a release"
                    " compiled for target cpu"
                )
            self._runtime = NeuronRuntime(lib)
        else:
            raise LoaderError(f"unknown executable format {fmt!r}")

    def executable(self, graph: Graph, read: Callable[[], bytes]) -> Any:
        """The graph's executable, deserialized on first use (buckets load lazily)."""
        exe = self._executables.get(graph.executable.digest)
        if exe is None:
            if self.format == "xla-cpu":
                from runtime_loader.executors.xla_cpu import XlaCpuExecutable  # noqa: PLC0415

                exe = XlaCpuExecutable.load(read(), self._buffers)
            else:
                from runtime_loader.executors.neff import NeffExecutable  # noqa: PLC0415

                exe = NeffExecutable.load(self._runtime, read())
            self._executables[graph.executable.digest] = exe
        return exe

    def weight(self, name: str) -> Any:
        if self.format != "xla-cpu":
            return self.weights[name]
        handle = self._uploaded.get(name)
        if handle is None:
            handle = self._uploaded[name] = self._buffers.upload(self.weights[name])
            release = getattr(self.weights, "release", None)
            if release is not None and not handle.aliases_host:  # the device has its own copy
                release(name)
        return handle

    def run(
        self, graph: Graph, exe: Any, inputs: dict[str, Any], on_device: bool = False
    ) -> list[Any]:
        params = graph.signature["parameters"]
        args = [
            inputs[p["name"]] if p["kind"] == "input" else self.weight(p["name"]) for p in params
        ]
        if self.format == "xla-cpu":
            return exe.run_on_device(args) if on_device else exe.run(args)
        named = {f"input{i}": np.asarray(a) for i, a in enumerate(args)}
        outputs = exe.run(named)
        return [outputs[f"output{i}"] for i in range(len(graph.signature["outputs"]))]


class CompiledModel:
    """Common part of every loaded release: graphs by (kind, bucket), weights, executables."""

    def __init__(
        self, release: Release, digest: Digest, cache: LocalCache, refetch: Any = None
    ) -> None:
        self.release = release
        self.digest = digest
        self.name = release.name
        self.target = release.target
        self.task = release.source.task
        self.config = release.source.config
        self._cache = cache
        self._refetch = refetch
        check_release(release, digest)
        self.graphs: dict[tuple[str, int, int], Graph] = {
            (g.kind, g.bucket["batch"], g.bucket["seq"]): g for g in release.graphs
        }
        formats = {g.format for g in release.graphs}
        if len(formats) != 1:
            raise LoaderError(f"release {digest}: mixed executable formats {sorted(formats)}")
        weights = MappedWeights(
            [
                (f"weights {w.digest}", map_cached(cache, w.digest, refetch))
                for w in release.source.weights
            ]
        )
        check_weights(release, digest, weights)
        self._runner = _Runner(formats.pop(), weights)

    def _blob(self, digest: Digest) -> bytes:
        return read_cached(self._cache, digest, self._refetch)

    def buckets(self, kind: str | None = None) -> list[Bucket]:
        kind = kind or self.release.graphs[0].kind
        return sorted(
            {Bucket(b, s) for (k, b, s) in self.graphs if k == kind}, key=lambda b: (b.batch, b.seq)
        )

    def signature(self, kind: str, bucket: Bucket) -> dict[str, Any]:
        return self.graphs[(kind, bucket.batch, bucket.seq)].signature

    def choose_bucket(self, kind: str, batch: int, seq: int) -> Bucket:
        """The smallest bucket holding (batch, seq): least padding first."""
        fits = [b for b in self.buckets(kind) if b.batch >= batch and b.seq >= seq]
        if not fits:
            listed = ", ".join(str(b) for b in self.buckets(kind))
            raise InputTooLarge(
                f"{self.name}: an input of batch {batch} x sequence {seq} fits no {kind} bucket"
                f" (batch x seq: {listed})"
            )
        return min(fits, key=lambda b: (b.batch * b.seq, b.seq, b.batch))

    def _execute(
        self, kind: str, bucket: Bucket, inputs: dict[str, Any], on_device: bool = False
    ) -> list[Any]:
        graph = self.graphs[(kind, bucket.batch, bucket.seq)]
        try:
            exe = self._runner.executable(graph, lambda: self._blob(graph.executable.digest))
        except LoaderError:
            raise
        except ValueError as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise BadExecutable(
                f"release {self.name}@{self.digest.short}: graph {graph.kind}"
                f" {graph.bucket_label}: executable {graph.executable.digest}: {reason}"
            ) from exc
        return self._runner.run(graph, exe, inputs, on_device)

    @property
    def vocab_size(self) -> int | None:
        """From the config; token ids outside 0..vocab_size-1 are refused."""
        return inputs.vocab_size(self.config)

    @property
    def pad_token_id(self) -> int:
        value = self.config.get("pad_token_id")
        return int(value) if isinstance(value, int) else 0


class EncoderModel(CompiledModel):
    """Encoders: call with named numpy inputs; get outputs trimmed to the caller's shape."""

    kind = "encode"

    @property
    def max_batch(self) -> int:
        return max(b.batch for b in self.buckets(self.kind))

    @property
    def max_seq(self) -> int:
        return max(b.seq for b in self.buckets(self.kind))

    def __call__(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray | None = None,
        truncate: bool = False,
    ) -> dict[str, np.ndarray]:
        ids = inputs.token_ids(input_ids, self.vocab_size)
        mask = (
            np.ones_like(ids)
            if attention_mask is None
            else inputs.attention_mask(attention_mask, ids.shape)
        )
        if ids.shape[1] > self.max_seq:
            if not truncate:
                listed = ", ".join(str(s) for s in sorted({b.seq for b in self.buckets()}))
                raise InputTooLarge(
                    f"{self.name}: sequence length {ids.shape[1]} exceeds every bucket"
                    f" (sequence buckets: {listed}); pass truncate=True to cut it"
                )
            ids, mask = ids[:, : self.max_seq], mask[:, : self.max_seq]
        chunks = [
            self._run_chunk(ids[i : i + self.max_batch], mask[i : i + self.max_batch])
            for i in range(0, ids.shape[0], self.max_batch)
        ]
        return {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}

    def _run_chunk(self, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        batch, seq = ids.shape
        bucket = self.choose_bucket(self.kind, batch, seq)
        signature = self.signature(self.kind, bucket)
        dtypes = {t["name"]: t["dtype"] for t in signature["inputs"]}
        padded_ids = np.full(
            (bucket.batch, bucket.seq), self.pad_token_id, dtype=dtypes.get("input_ids", "int64")
        )
        padded_mask = np.zeros(
            (bucket.batch, bucket.seq), dtype=dtypes.get("attention_mask", "int64")
        )
        padded_ids[:batch, :seq] = ids
        padded_mask[:batch, :seq] = mask
        outputs = self._execute(
            self.kind, bucket, {"input_ids": padded_ids, "attention_mask": padded_mask}
        )
        result = {}
        for spec, value in zip(signature["outputs"], outputs, strict=True):
            value = np.asarray(value)[:batch]
            if value.ndim >= 3:  # per-token outputs [batch, seq, ...]
                value = value[:, :seq]
            result[spec["name"]] = value
        return result

    def encode(
        self, texts: Sequence[str], normalize: bool = False, truncate: bool = True
    ) -> np.ndarray:
        """Sentence embeddings: tokenize (tokenizers), run, mean-pool over the attention mask."""
        tokenizer = self.tokenizer()
        encodings = tokenizer.encode_batch(list(texts))
        length = max(len(e.ids) for e in encodings)
        ids = np.full((len(encodings), length), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(encodings), length), dtype=np.int64)
        for row, encoding in enumerate(encodings):
            ids[row, : len(encoding.ids)] = encoding.ids
            mask[row, : len(encoding.ids)] = encoding.attention_mask
        if truncate and length > self.max_seq:
            ids, mask = ids[:, : self.max_seq], mask[:, : self.max_seq]
        hidden = self(ids, mask)["last_hidden_state"].astype(np.float32)
        weights = mask[:, :, None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        if normalize:
            pooled /= np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
        return pooled

    def tokenizer(self) -> Any:
        files = {f.name: f for f in self.release.source.files}
        if "tokenizer.json" not in files:
            raise LoaderError(
                f"release {self.name}@{self.digest.short} carries no"
                " tokenizer.json: pass input_ids instead of text"
            )
        try:
            from tokenizers import Tokenizer  # noqa: PLC0415
        except ImportError:
            raise LoaderError(
                "text input needs the tokenizers package: pip install 'kiln[loader]'"
            ) from None
        tokenizer = Tokenizer.from_str(self._blob(files["tokenizer.json"].digest).decode())
        tokenizer.no_padding()
        tokenizer.no_truncation()
        return tokenizer


class CausalLM(CompiledModel):
    """Decoder LMs: context_encoding once, then token_generation with the KV cache."""

    def generate(
        self,
        input_ids: Any,
        max_new_tokens: int = 32,
        eos_token_id: int | None = None,
        do_sample: bool = False,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float = 1.0,
        seed: int | None = None,
        pad_token_id: int | None = None,
    ) -> np.ndarray:
        """New tokens [batch, steps]; rows that hit EOS are filled with the pad token."""
        steps = list(
            self.generate_stream(
                input_ids,
                max_new_tokens,
                eos_token_id,
                do_sample,
                top_k,
                top_p,
                temperature,
                seed,
                pad_token_id,
            )
        )
        return np.stack(steps, axis=1)

    def generate_stream(
        self,
        input_ids: Any,
        max_new_tokens: int = 32,
        eos_token_id: int | None = None,
        do_sample: bool = False,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float = 1.0,
        seed: int | None = None,
        pad_token_id: int | None = None,
    ) -> Iterator[np.ndarray]:
        """Yield one token per row per step as soon as it is chosen. Bad arguments (BadInput)
        and a prompt too long for every bucket (InputTooLarge) fail here, before the first
        step is asked for."""
        prompts = inputs.prompts(input_ids, self.vocab_size)
        inputs.generation(max_new_tokens, eos_token_id, seed, pad_token_id, self.vocab_size)
        config = SamplingConfig(do_sample, temperature, top_k, top_p)
        lengths = np.array([len(p) for p in prompts])
        need = int(lengths.max()) + max_new_tokens - 1
        bucket = self._generation_bucket(len(prompts), need)
        pad = self.pad_token_id if pad_token_id is None else int(pad_token_id)
        rng = np.random.default_rng(seed)
        return self._steps(prompts, lengths, bucket, max_new_tokens, eos_token_id, config, rng, pad)

    def _steps(
        self,
        prompts: list[list[int]],
        lengths: np.ndarray,
        bucket: Bucket,
        max_new_tokens: int,
        eos_token_id: int | None,
        config: SamplingConfig,
        rng: np.random.Generator,
        pad: int,
    ) -> Iterator[np.ndarray]:
        ids = np.full((bucket.batch, bucket.seq), pad, dtype=np.int64)
        mask = np.zeros((bucket.batch, bucket.seq), dtype=np.int64)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = prompt
            mask[row, : len(prompt)] = 1
        mask[len(prompts) :, 0] = 1  # filler rows: one real token keeps their math finite
        context = self._execute(
            "context_encoding", bucket, {"input_ids": ids, "attention_mask": mask}, on_device=True
        )
        logits = np.asarray(context[0].numpy(), dtype=np.float32)  # bf16/fp16 logits too
        cache = context[1:]
        names = [t["name"] for t in self.signature("token_generation", bucket)["outputs"]][1:]
        done = np.zeros(len(prompts), dtype=bool)
        position = np.zeros(bucket.batch, dtype=np.int64)
        position[: len(prompts)] = lengths
        for step in range(max_new_tokens):
            chosen = next_tokens(logits[: len(prompts)], config, rng)
            chosen = np.where(done, pad, chosen)
            yield chosen
            if eos_token_id is not None:
                done |= chosen == eos_token_id
            if done.all() or step == max_new_tokens - 1:
                return
            feed = np.full((bucket.batch, 1), pad, dtype=np.int64)
            feed[: len(prompts), 0] = chosen
            outputs = self._execute(
                "token_generation",
                bucket,
                {
                    "input_ids": feed,
                    "position": position,
                    **dict(zip(names, cache, strict=True)),
                },
                on_device=True,
            )
            logits = np.asarray(outputs[0].numpy(), dtype=np.float32)
            cache = outputs[1:]
            position = position + 1

    def _generation_bucket(self, batch: int, need: int) -> Bucket:
        try:
            return self.choose_bucket("context_encoding", batch, need)
        except InputTooLarge:
            listed = ", ".join(str(b) for b in self.buckets("context_encoding"))
            raise InputTooLarge(
                f"{self.name}: {batch} prompt(s) needing {need} positions (longest prompt +"
                f" max_new_tokens - 1) fit no bucket (batch x seq: {listed}); shorten the prompt"
                " or lower max_new_tokens"
            ) from None


def model_for(
    release: Release, digest: Digest, cache: LocalCache, refetch: Any = None
) -> CompiledModel:
    cls = CausalLM if release.source.task == "causal-lm" else EncoderModel
    return cls(release, digest, cache, refetch)
