"""A loaded release: bucket choice, padding, execution and trimming (generation for LMs is in
generate.py)."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from artifacts.digest import Digest
from artifacts.manifest import Graph, Release
from runtime_loader import inputs
from runtime_loader.cache import LocalCache
from runtime_loader.cache_reads import map_cached, read_cached
from runtime_loader.errors import BadExecutable, InputTooLarge, LoaderError
from runtime_loader.executors import Executable, open_executor
from runtime_loader.release_check import check_release, check_weights
from runtime_loader.weights import BoundWeights, MappedWeights


@dataclass(frozen=True)
class Bucket:
    batch: int
    seq: int

    def __str__(self) -> str:
        return f"{self.batch}x{self.seq}"


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
        self._executor = open_executor(formats.pop())
        self._weights = BoundWeights(self._executor, weights)
        self._executables: dict[Digest, Executable] = {}

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
        self.prepare([graph])
        exe = self._executables[graph.executable.digest]
        weights = self._weights
        args = [
            inputs[p["name"]] if p["kind"] == "input" else weights[p["name"]]
            for p in graph.signature["parameters"]
        ]
        return exe.run_on_device(args) if on_device else exe.run(args)

    def prepare(self, graphs: Sequence[Graph]) -> None:
        """Load the executables of `graphs` not loaded yet (buckets load lazily, on first use)
        and bind their weights, side by side: deserializing releases the GIL, and the first
        bind pays the executor's one-time setup (jaxlib's dtype tables import ml_dtypes,
        most of a second), so doing them at once on two cores saves that much of the
        first call."""
        todo: dict[Digest, Graph] = {}
        for graph in graphs:
            if graph.executable.digest not in self._executables:
                todo.setdefault(graph.executable.digest, graph)  # the first graph names it
        if not todo:
            return
        names = [
            p["name"] for g in graphs for p in g.signature["parameters"] if p["kind"] != "input"
        ]
        with ThreadPoolExecutor(max_workers=len(todo) + 1) as pool:
            bound = pool.submit(lambda: [self._weights[n] for n in dict.fromkeys(names)])
            loaded = [(g, pool.submit(self._load_executable, g)) for g in todo.values()]
            for graph, future in loaded:
                self._executables[graph.executable.digest] = future.result()
            bound.result()

    def _load_executable(self, graph: Graph) -> Executable:
        try:
            return self._executor.load(self._blob(graph.executable.digest))
        except LoaderError:
            raise
        except ValueError as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise BadExecutable(
                f"release {self.name}@{self.digest.short}: graph {graph.kind}"
                f" {graph.bucket_label}: executable {graph.executable.digest}: {reason}"
            ) from exc

    def close(self) -> None:
        """Unload the executables and close the executor (a NEFF release's Neuron runtime)."""
        executables, self._executables = list(self._executables.values()), {}
        try:
            for exe in executables:
                exe.close()
        finally:
            self._executor.close()

    def __enter__(self) -> CompiledModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
