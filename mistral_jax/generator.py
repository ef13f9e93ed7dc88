"""Batched generation on the host: prompts sorted by length into batches, each padded to bucketed shapes
(batching.bucket_length), prefilled and decoded by the compiled programs (programs.py), with stop strings,
streaming and per-batch callbacks.

The batch is padded to `batch_size` rows, prompts and `max_new_tokens` to a few bucket lengths, so a job of
many prompts compiles a handful of programs, never one per prompt.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np

from . import programs
from .batching import bucket_length, pad_rows
from .config import MistralConfig, Numerics
from .decode import LENGTH, STOP, DecodeState
from .kv_cache import KVCache, num_slots
from .sharding import ModelMesh

EOS_ID = 2
_REASONS = {STOP: "stop", LENGTH: "length"}


@dataclasses.dataclass(frozen=True)
class _Batch:
    """One batch on the host (Generator._prepare): everything its prefill and decode calls need but the cache."""

    prompts: list
    sampling: list
    stop_lists: list  # per row, the stop ids
    tokens: np.ndarray  # [batch_size, T] right-padded
    lengths: np.ndarray  # [batch_size]
    host: dict  # the DecodeState's arrays but the cache and logits
    chunk: int  # prefill chunk
    slots: int  # KV cache slots
    step: int  # decode steps per call
    sampled: bool  # any row samples (else the greedy-only program)
    need_host: bool  # the host looks at every call's tokens (streaming, stop strings)
    final: bool  # one call does every step


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    seed: int = 0  # per row: a fixed seed gives the same text on every run and batch size
    stop_token_ids: tuple[int, ...] | None = None  # None: the tokenizer's EOS
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclasses.dataclass
class Completion:
    ids: list[int]  # generated tokens, without the stop token
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    text: str | None = None  # when a tokenizer is known; cut before a stop string

    @property
    def completion_tokens(self) -> int:
        return len(self.ids)


def default_mesh(params, config: MistralConfig) -> ModelMesh:
    """The mesh of the one device holding `params`, else every device on fsdp (ModelMesh.build's default)."""
    devices = set()
    for x in jax.tree.leaves(params):
        if isinstance(x, jax.Array):
            devices |= x.sharding.device_set
    if len(devices) == 1:
        return ModelMesh.build(config, None, devices=list(devices))
    return ModelMesh.build(config, None)


class Generator:
    """Generates from token-id prompts in batches; see api.Mistral for strings and chat messages.

    `mesh`: where the params live and the batches go (placement, fetching, the sharded KV cache); default: the
    params' one device, or every device on fsdp. `cache_slots`: None is the rolling buffer of min(W, length)
    slots; a larger value keeps more (the window still applies through the mask, so the tokens agree)."""

    def __init__(
        self,
        params,
        config: MistralConfig,
        numerics: Numerics,
        tokenizer=None,
        batch_size: int = 8,
        mesh: ModelMesh | None = None,
        prefill_chunk: int = 512,
        cache_slots: int | None = None,
    ):
        if not isinstance(numerics, Numerics):
            raise TypeError(f"numerics must be a config.Numerics, got {type(numerics).__name__}")
        self.params, self.config, self.numerics, self.tokenizer = params, config, numerics, tokenizer
        self.mesh = mesh if mesh is not None else default_mesh(params, config)
        if batch_size % self.mesh.data_parallel_size:
            raise ValueError(
                f"batch_size {batch_size} must be a multiple of the data-parallel size "
                f"{self.mesh.data_parallel_size} (ModelMesh.round_batch)"
            )
        self.batch_size, self.prefill_chunk, self.cache_slots = batch_size, prefill_chunk, cache_slots
        self.eos_id = tokenizer.eos_id if tokenizer is not None else EOS_ID
        self.last_cache_shape: tuple[int, ...] | None = None
        self._busy = 0.0  # seconds in prefill and decode calls, their compilations left out

    def check_prompt(self, ids) -> str | None:
        from .jsonl import check_ids

        return check_ids(ids, self.config.vocab_size, self.config.max_seq_len, "prompt")

    def busy_seconds(self) -> float:
        """Seconds spent running prefills and decodes, without the compilations: the time of generating."""
        return self._busy

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingParams | Sequence[SamplingParams],
        on_update: Callable[[int, Completion], None] | None = None,
        steps_per_call: int | None = None,
        on_batch: Callable[[list[int], list[Completion]], None] | None = None,
    ) -> list[Completion]:
        """Completions for `prompts` (lists of ids), in order. `sampling` is one setting or one per prompt.

        Prompts are batched by length (shortest first), so a batch pads its rows to a length close to its
        longest; results come back in the order given. `on_batch(indices, completions)` is called after each
        batch with the indices (into `prompts`) it held. `on_update(i, partial_completion)` is called after
        each compiled call of `steps_per_call` tokens (streaming); stop strings are also checked there
        (default: 16 tokens per call when needed)."""
        if isinstance(sampling, SamplingParams):
            sampling = [sampling] * len(prompts)
        if len(sampling) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(sampling)} sampling settings")
        for i, p in enumerate(prompts):
            err = self.check_prompt(list(p))
            if err:
                raise ValueError(f"prompt {i}: {err}")
        results: list[Completion | None] = [None] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda j: len(prompts[j]))  # stable: ties keep their order
        batches = [order[s : s + self.batch_size] for s in range(0, len(prompts), self.batch_size)]
        prepared = [
            self._prepare([list(prompts[j]) for j in idx], [sampling[j] for j in idx], on_update, steps_per_call)
            for idx in batches
        ]
        calls = [self._programs(b) for b in prepared]
        # Every program queued in call order, so later batches' programs compile while the first ones run.
        queued = [programs.ahead(fn, self.mesh, args, st) for batch in calls for fn, args, st in batch]
        try:
            with self.mesh.activate():
                for idx, b, call in zip(batches, prepared, calls):
                    update = None if on_update is None else (lambda i, c, _idx=idx: on_update(_idx[i], c))
                    comps = self._batch(b, call, update)
                    for j, comp in zip(idx, comps):
                        results[j] = comp
                    if on_batch is not None:
                        on_batch(idx, comps)
        finally:
            programs.cancel(queued)
        return results

    def _run(self, jitted, *args, **statics):
        """jitted(...) waited for; its running time, not its compilation, counts as busy."""
        program = programs.ahead(jitted, self.mesh, args, statics).result()
        t0 = time.perf_counter()
        out = jax.block_until_ready(program(*args))
        self._busy += time.perf_counter() - t0
        return out

    def _prepare(self, prompts, sampling, on_update, steps_per_call) -> _Batch:
        """One batch of at most batch_size prompts on the host: its padded tokens, its decode state's arrays
        and the shapes of its programs."""
        c, bs, n = self.config, self.batch_size, len(prompts)
        lengths_list = [len(p) for p in prompts]
        # Never generate past the model's context (the cache of an unwindowed model is sized by it).
        max_new = [min(s.max_new_tokens, c.max_seq_len - L) for s, L in zip(sampling, lengths_list)]
        t = bucket_length(max(lengths_list), c.max_seq_len)
        chunk = min(self.prefill_chunk, t)
        t = -(-t // chunk) * chunk
        m = bucket_length(max(max_new), 1 << 30)
        # Slots a power of two (at most the window): batches of different prompt buckets share one decode program.
        slots = self.cache_slots or num_slots(c, min(1 << (t + m - 1).bit_length(), c.max_seq_len))
        tokens, lengths = pad_rows(prompts, bs, t)

        stop_lists = [list(s.stop_token_ids) if s.stop_token_ids is not None else [self.eos_id] for s in sampling]
        stop_ids = np.full((bs, max(1, max(len(x) for x in stop_lists))), -1, np.int32)
        for i, x in enumerate(stop_lists):
            stop_ids[i, : len(x)] = x

        def per_row(values, fill, dtype):
            arr = np.full((bs,), fill, dtype)
            arr[:n] = values
            return arr

        row_max_new = per_row(max_new, 1, np.int32)
        host = dict(
            out=np.zeros((bs, m), np.int32),
            n=np.zeros((bs,), np.int32),
            pos=lengths,
            # Padding rows, and prompts that already fill the context, start done.
            done=(np.arange(bs) >= n) | (row_max_new <= 0),
            reason=np.where(row_max_new <= 0, LENGTH, 0).astype(np.int32),
            seeds=per_row([s.seed for s in sampling], 0, np.uint32),
            temperature=per_row([s.temperature for s in sampling], 0.0, np.float32),
            top_k=per_row([s.top_k for s in sampling], 0, np.int32),
            top_p=per_row([s.top_p for s in sampling], 1.0, np.float32),
            max_new=row_max_new,
            stop_ids=stop_ids,
        )
        need_host = on_update is not None or any(s.stop_strings for s in sampling)
        step = steps_per_call or (16 if need_host else m)
        return _Batch(
            prompts=prompts,
            sampling=sampling,
            stop_lists=stop_lists,
            tokens=tokens,
            lengths=lengths,
            host=host,
            chunk=chunk,
            slots=slots,
            step=step,
            sampled=any(s.temperature > 0 for s in sampling),
            need_host=need_host,
            # One call does every step: its last token need not be fed (decode's `final`).
            final=step >= m,
        )

    def _programs(self, b: _Batch) -> list[tuple]:
        """(jitted, abstract arguments, static arguments) of the batch's prefill and decode calls."""
        c, bs, mesh = self.config, self.batch_size, self.mesh

        def rows(x):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=mesh.batch_sharding(x.ndim))

        cache = jax.tree.map(
            lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
            KVCache.shapes(c, bs, b.slots, self.numerics.dtype),
            mesh.cache_shardings(),
        )
        logits = jax.ShapeDtypeStruct((bs, c.vocab_size), np.float32, sharding=mesh.batch_sharding(2))
        state = DecodeState(cache=cache, logits=logits, **{k: rows(v) for k, v in b.host.items()})
        return [
            (
                programs.prefill_program(c, self.numerics, b.chunk, mesh),
                (self.params, rows(b.tokens), rows(b.lengths), cache),
                {},
            ),
            (
                programs.decode_program(c, self.numerics, mesh),
                (self.params, state, np.int32(b.step)),
                dict(sampled=b.sampled, final=b.final),
            ),
        ]

    def _batch(self, b: _Batch, calls: list[tuple], on_update) -> list[Completion]:
        """Prefills and decodes one prepared batch; `calls`: its _programs."""
        n, prompts, stop_lists = len(b.prompts), b.prompts, b.stop_lists
        cache = self.mesh.cache(self.batch_size, b.slots, self.numerics.dtype)
        self.last_cache_shape = tuple(cache.k.shape)
        (prefill, _, _), (decode, _, statics) = calls
        logits, cache = self._run(prefill, self.params, *self.mesh.place(b.tokens, b.lengths), cache)
        state = DecodeState(cache=cache, logits=logits, **self.mesh.place(b.host))
        need_host, sampling = b.need_host, b.sampling

        cut: dict[int, tuple[list[int], str]] = {}  # rows stopped by a stop string: (ids, text)
        while True:
            state = self._run(decode, self.params, state, np.int32(b.step), **statics)
            out, cnt, done, reason = self.mesh.fetch((state.out, state.n, state.done, state.reason))
            if need_host:
                newly_done = []
                for i in range(n):
                    if i in cut:
                        continue
                    comp = self._completion(out[i], cnt[i], reason[i], len(prompts[i]), stop_lists[i])
                    hit = self._stop_string(comp, sampling[i].stop_strings)
                    if hit is not None:
                        cut[i] = hit
                        if not done[i]:
                            newly_done.append(i)
                        comp.ids, comp.text, comp.finish_reason = hit[0], hit[1], "stop"
                    if on_update is not None:
                        on_update(i, comp)
                if newly_done:
                    done = np.array(done)
                    done[newly_done] = True
                    state = state.replace(done=self.mesh.place(done))
            if done[:n].all():
                break
        comps = []
        for i in range(n):
            comp = self._completion(out[i], cnt[i], reason[i], len(prompts[i]), stop_lists[i])
            if i in cut:
                comp.ids, comp.text, comp.finish_reason = cut[i][0], cut[i][1], "stop"
            comps.append(comp)
        return comps

    def _completion(self, out_row, count, reason, prompt_len, stop_ids) -> Completion:
        ids = [int(x) for x in out_row[:count]]
        finish = _REASONS.get(int(reason), "length")
        if finish == "stop" and ids and ids[-1] in stop_ids:
            ids = ids[:-1]
        text = self.tokenizer.decode(ids) if self.tokenizer is not None else None
        return Completion(ids=ids, finish_reason=finish, prompt_tokens=prompt_len, text=text)

    def _stop_string(self, comp: Completion, stops) -> tuple[list[int], str] | None:
        """(ids through the token that completes the first stop string, text cut before it), or None."""
        if not stops or comp.text is None:
            return None
        hits = [comp.text.find(s) for s in stops if s and s in comp.text]
        if not hits:
            return None
        pos = min(hits)
        for k in range(1, len(comp.ids) + 1):
            if len(self.tokenizer.decode(comp.ids[:k])) > pos:
                return comp.ids[:k], comp.text[:pos]
        return comp.ids, comp.text[:pos]

    def stream(
        self, prompt: Sequence[int], sampling: SamplingParams = SamplingParams(), steps_per_call: int = 8
    ) -> Iterator[str]:
        """Yields the text of one completion as it is produced, `steps_per_call` tokens per compiled call."""
        if self.tokenizer is None:
            raise ValueError("streaming text needs a tokenizer")
        import queue
        import threading

        q: queue.Queue = queue.Queue()
        sent = [""]

        def on_update(_, comp):
            if comp.text is not None and len(comp.text) > len(sent[0]) and comp.text.startswith(sent[0]):
                q.put(comp.text[len(sent[0]) :])
                sent[0] = comp.text

        def run():
            try:
                self.generate([prompt], sampling, on_update=on_update, steps_per_call=steps_per_call)
            except BaseException as e:  # re-raised in the consumer
                q.put(e)
            q.put(None)

        threading.Thread(target=run, daemon=True).start()
        while (item := q.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
