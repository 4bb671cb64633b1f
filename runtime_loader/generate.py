"""Generation for decoder LMs: the context_encoding graph once over the padded prompts, then
token_generation step by step with the KV cache kept where the executor keeps it; the logits
of each step come to the host to choose the next tokens.

Two buckets are chosen per call: the smallest token_generation bucket that holds the longest
prompt plus the new tokens, and the shortest context_encoding bucket of the same batch that
holds the longest prompt. When the second is shorter (a release compiled with
``buckets.context``), its KV cache is zero-padded to the first's length on the host once,
before the first decode step: encoding an 11-token prompt at 16 positions, not 128."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from runtime_loader import inputs
from runtime_loader.errors import BadRelease, InputTooLarge
from runtime_loader.model import Bucket, CompiledModel
from runtime_loader.sampling import SamplingConfig, next_tokens


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
        context_bucket = self._context_bucket(bucket, int(lengths.max()))
        pad = self.pad_token_id if pad_token_id is None else int(pad_token_id)
        rng = np.random.default_rng(seed)
        return self._steps(
            prompts,
            lengths,
            (context_bucket, bucket),
            max_new_tokens,
            eos_token_id,
            config,
            rng,
            pad,
        )

    def _steps(
        self,
        prompts: list[list[int]],
        lengths: np.ndarray,
        buckets: tuple[Bucket, Bucket],
        max_new_tokens: int,
        eos_token_id: int | None,
        config: SamplingConfig,
        rng: np.random.Generator,
        pad: int,
    ) -> Iterator[np.ndarray]:
        host = self._executor.to_host
        context_bucket, bucket = buckets
        first = [self.graphs[("context_encoding", context_bucket.batch, context_bucket.seq)]]
        if max_new_tokens > 1:
            first.append(self.graphs[("token_generation", bucket.batch, bucket.seq)])
        self.prepare(first)
        ids = np.full((bucket.batch, context_bucket.seq), pad, dtype=np.int64)
        mask = np.zeros((bucket.batch, context_bucket.seq), dtype=np.int64)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = prompt
            mask[row, : len(prompt)] = 1
        mask[len(prompts) :, 0] = 1  # filler rows: one real token keeps their math finite
        context = self._execute(
            "context_encoding",
            context_bucket,
            {"input_ids": ids, "attention_mask": mask},
            on_device=True,
        )
        logits = np.asarray(host(context[0]), dtype=np.float32)  # bf16/fp16 logits too
        cache = context[1:]
        if context_bucket.seq < bucket.seq:
            cache = [_grown(host(value), bucket.seq) for value in cache]
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
            logits = np.asarray(host(outputs[0]), dtype=np.float32)
            cache = outputs[1:]
            position = position + 1

    def _generation_bucket(self, batch: int, need: int) -> Bucket:
        try:
            return self.choose_bucket("token_generation", batch, need)
        except InputTooLarge:
            listed = ", ".join(str(b) for b in self.buckets("token_generation"))
            raise InputTooLarge(
                f"{self.name}: {batch} prompt(s) needing {need} positions (longest prompt +"
                f" max_new_tokens - 1) fit no bucket (batch x seq: {listed}); shorten the prompt"
                " or lower max_new_tokens"
            ) from None

    def _context_bucket(self, bucket: Bucket, longest: int) -> Bucket:
        """The shortest context_encoding bucket of ``bucket``'s batch holding ``longest``
        tokens and no longer than ``bucket``."""
        fits = [
            b
            for b in self.buckets("context_encoding")
            if b.batch == bucket.batch and longest <= b.seq <= bucket.seq
        ]
        if not fits:
            listed = ", ".join(str(b) for b in self.buckets("context_encoding"))
            raise BadRelease(
                f"release {self.name}@{self.digest.short}: no context_encoding graph for"
                f" batch {bucket.batch} holds a {longest}-token prompt within the"
                f" {bucket} token_generation bucket (context_encoding buckets: {listed})"
            )
        return min(fits, key=lambda b: b.seq)


def _grown(cache: Any, seq: int) -> np.ndarray:
    """One layer's K or V ``[batch, kv_heads, s, head_dim]`` zero-padded to ``seq`` slots.
    The slots past each row's position are masked, so their values never count."""
    array = np.asarray(cache)
    grown = np.zeros((*array.shape[:-2], seq, array.shape[-1]), dtype=array.dtype)
    grown[..., : array.shape[-2], :] = array
    return grown
