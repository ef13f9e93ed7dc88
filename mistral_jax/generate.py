"""Batched generation: chunked prefill into the KV cache, then one compiled `lax.while_loop` that decodes
until every row has stopped (no Python call per token).

Shapes are bucketed (batching.bucket_length): the batch is padded to `batch_size` rows, prompts and
`max_new_tokens` to a few bucket lengths, so a job of many prompts compiles a handful of programs; those are
kept per call signature, also across runs (see _program).
Rows are right-padded; each row carries its own absolute positions, so RoPE and the window are exact for
every row whatever its length.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import os
import struct
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import model as model_lib
from .batching import bucket_length, pad_rows
from .config import MistralConfig
from .kv_cache import cache_shape, init_cache, num_slots
from .sampling import greedy, sample

EOS_ID = 2
_REASONS = {1: "stop", 2: "length"}


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0          # 0 = greedy
    top_k: int = 0                    # 0 = off
    top_p: float = 1.0                # 1.0 = off
    seed: int = 0                     # per row: a fixed seed gives the same text on every run and batch size
    stop_token_ids: tuple[int, ...] | None = None   # None: the tokenizer's EOS
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
    ids: list[int]                    # generated tokens, without the stop token
    finish_reason: str                # "stop" | "length"
    prompt_tokens: int
    text: str | None = None           # when a tokenizer is known; cut before a stop string

    @property
    def completion_tokens(self) -> int:
        return len(self.ids)


# ---- pure, jitted pieces ---------------------------------------------------------------------------------

def prefill(params, config: MistralConfig, tokens, lengths, cache, chunk: int):
    """tokens [B, T] right-padded, lengths [B], an empty cache -> (logits of each row's last prompt token
    [B, V], cache).

    Prompts longer than `chunk` are prefilled chunk by chunk (a scan); each chunk after the first attends
    (cache, chunk) and is then written into the rolling buffer, so the cache never holds more than its slots.
    The first chunk attends itself alone (there is nothing cached yet), with the configured attention kernel.

    Per-layer params (config.scan_layers False, the CPU inference layout) run as L calls of one traced layer
    (model._unrolled_layer), as in decode. Stacking them inside the program to run one scanned layer copied
    every weight at every call, twice the weights' memory during a prefill; the benchmark's job took as long
    either way (docs/benchmarks.md), the unrolled program's first run being the slower one.
    """
    b, t = tokens.shape
    c = min(chunk, t)
    n = t // c
    chunks = tokens.reshape(b, n, c).transpose(1, 0, 2)

    def step(cache, i, first=False):
        start = i * c
        pos = jnp.broadcast_to(start + jnp.arange(c, dtype=jnp.int32), (b, c))
        seg = (pos < lengths[:, None]).astype(jnp.int32)
        at = jnp.clip(lengths - 1 - start, 0, c - 1)
        logits, cache = model_lib.apply(params, config, chunks[i], pos, seg, cache, logits_at=at, cache_empty=first)
        return cache, logits[:, 0]

    cache, logits = step(cache, 0, first=True)
    if n > 1:
        cache, rest = jax.lax.scan(step, cache, jnp.arange(1, n))
        logits = jnp.concatenate([logits[None], rest])[jnp.clip((lengths - 1) // c, 0, n - 1), jnp.arange(b)]
    return logits, cache


def decode(params, config: MistralConfig, state, max_steps, sampled: bool = True, final: bool = False):
    """Runs the decode loop for at most `max_steps` tokens or until every row is done. `sampled=False` (static)
    compiles a greedy-only loop: the sampler (top-k, top-p, sort, random draws) roughly doubled the decode
    program's compile time on the CPU, and an all-greedy batch never runs it. `final=True` (static): no call
    follows this one, so the last token picked is not fed to the model (one forward fewer per batch); the
    returned `logits` and cache then do not include it.

    state: cache, logits [B, V] (next-token logits), out [B, M], n [B] (tokens generated), pos [B] (position
    of the next token fed), done [B], reason [B] (1 stop, 2 length), and per-row settings seeds,
    temperature, top_k, top_p, max_new [B], stop_ids [B, NS] (-1 padded). Optionally (all three or none) the
    end of each prompt, fed here instead of prefilled (Generator's folding): tail [B, TT] its tokens,
    tail_start [B] the position of the first, tail_len [B] how many. A row first feeds those, one per step,
    generating and counting nothing (its random draws depend on `n` only, so they do not shift)."""
    b = state["n"].shape[0]
    rows = jnp.arange(b)

    def pick(st):
        """The next token of every active row, written to `out`; stop and length bookkeeping. A row still in
        its prompt's tail takes its next tail token instead and writes nothing."""
        active = ~st["done"]
        tok = sample(st["logits"], st["seeds"], st["n"], st["temperature"], st["top_k"], st["top_p"]) \
            if sampled else greedy(st["logits"])
        new = active
        if "tail" in st:
            fed = st["pos"] - st["tail_start"]  # tail tokens fed so far
            forcing = fed < st["tail_len"]
            tail_tok = st["tail"][rows, jnp.clip(fed, 0, st["tail"].shape[1] - 1)]
            tok = jnp.where(forcing, tail_tok, tok)
            new = active & ~forcing
        out = st["out"].at[rows, st["n"]].set(jnp.where(new, tok, 0), mode="drop")
        n = st["n"] + new
        is_stop = new & jnp.any(tok[:, None] == st["stop_ids"], axis=-1)
        is_len = new & ~is_stop & (n >= st["max_new"])
        reason = jnp.where(is_stop, 1, jnp.where(is_len, 2, st["reason"]))
        done = st["done"] | is_stop | is_len
        return dict(st, out=out, n=n, done=done, reason=reason), tok

    def cond(carry):
        i, st = carry
        return (i < max_steps - final) & jnp.any(~st["done"])

    def body(carry):
        i, st = carry
        st, tok = pick(st)
        done = st["done"]
        # Always one forward per step, also after the last row finished: a lax.cond here would make XLA
        # copy its operands (the whole params) into the branch at every step.
        seg = (~done).astype(jnp.int32)[:, None]
        logits, cache = model_lib.apply(params, config, tok[:, None], st["pos"][:, None], seg, st["cache"])
        return i + 1, dict(st, cache=cache, logits=logits[:, 0], pos=st["pos"] + (~done))

    _, state = jax.lax.while_loop(cond, body, (jnp.int32(0), state))
    if final:  # the last token: picked, not fed (a no-op when every row is already done)
        state, _ = pick(state)
    return state


# XLA:CPU sends matmuls to YNNPACK by default. For decode's few-row products ([B, D] x [D, F], B <= 32) with
# in-major weights ([D, F], the training layout) its Eigen path was faster on the 125M benchmark. Out-major
# weights (model.out_major_weights, what load_model gives on the CPU) are fastest with the default: the weight is
# then the left operand of YNNPACK's product.
_CPU_IN_MAJOR_DECODE_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


# LLVM's optimization level for the code XLA:CPU generates itself (elementwise and reduction fusions; the products
# run in YNNPACK or Eigen, compiled beforehand). Level 1 compiled the 125M benchmark's prefill and decode
# programs faster than the default 3, and they ran as fast, with the same tokens (scratch A/B scripts at batch 1,
# 8 and 32); level 0 was faster still to compile but ran prefill and decode markedly slower.
_CPU_OPTIONS = {"xla_backend_optimization_level": 1}


def _cpu_options(extra: dict | None = None) -> dict | None:
    return {**_CPU_OPTIONS, **(extra or {})} if jax.default_backend() == "cpu" else None


def _versioned(fn: functools.partial) -> Callable:
    """`fn` named after itself and this package's source (_source_hash). The name goes into the lowered module,
    so into the key of JAX's persistent compilation cache: a new version of this code then compiles afresh,
    and keeps that program (_load_or_compile keeps no program that JAX's cache gave, and a hit there, its
    lowered module unchanged by the new version, would have had every later run trace and look it up again)."""
    def run(*args, **kwargs):
        return fn(*args, **kwargs)
    functools.update_wrapper(run, fn)  # the signature (donated and static argument names) is fn's
    run.__name__ = run.__qualname__ = f"{fn.func.__name__}_{_source_hash()[:16]}"
    return run


@functools.lru_cache(maxsize=None)
def _compiled(config: MistralConfig, chunk: int):
    """(prefill, decode) jitted for `config`; prefill per chunk length, decode shared by every chunk length."""
    pre = jax.jit(_versioned(functools.partial(prefill, config=config, chunk=chunk)), donate_argnames=("cache",),
                  compiler_options=_cpu_options())
    return pre, _compiled_decode(config)


@functools.lru_cache(maxsize=None)
def _compiled_decode(config: MistralConfig):
    options = _cpu_options(None if config.out_major_weights else _CPU_IN_MAJOR_DECODE_OPTIONS)
    return jax.jit(_versioned(functools.partial(decode, config=config)), donate_argnames=("state",),
                   static_argnames=("sampled", "final"),
                   compiler_options=options)


# ---- programs: compiled ahead of time, kept per call signature, and across runs -------------------------------
# A warm run of a job spent most of its start-up tracing and lowering the model again only to look the result up
# in JAX's persistent compilation cache (whose key is the lowered program). Programs are kept by their call
# signature instead: in this process, and, when JAX's compilation cache directory is set
# (api.enable_compilation_cache), as serialized executables beside it, keyed by everything that determines the
# program: this package's source, the jax and jaxlib versions, the backend and its devices, XLA_FLAGS and the
# jax settings that change tracing, the config, the static arguments, and every argument's shape, dtype and
# sharding. A file that fails to load is removed and compiled again; only freshly compiled programs are
# written (see _load_or_compile).
_PROGRAMS: dict[str, tuple[str, object]] = {}  # signature key -> (name, program)
PROGRAM_EVENT = "/mistral_jax/program/load_duration"  # seconds spent loading a kept program (api.CompileTimer)


@functools.lru_cache(maxsize=None)
def _source_hash() -> str:
    h = hashlib.sha256()
    here = os.path.dirname(os.path.abspath(__file__))
    for name in sorted(os.listdir(here)):
        if name.endswith(".py"):
            with open(os.path.join(here, name), "rb") as f:
                h.update(name.encode() + b"\0" + f.read())
    return h.hexdigest()


def _signature(name: str, bound, static: dict, args: tuple, kwargs: dict) -> str:
    import jaxlib

    leaves, tree = jax.tree.flatten((args, kwargs))
    avals = [(tuple(x.shape), str(x.dtype), getattr(x, "weak_type", False),
              repr(getattr(x, "sharding", None))) for x in leaves]
    devices = [(d.platform, d.device_kind, d.id) for d in jax.devices()]
    settings = [str(getattr(jax.config, k, None)) for k in (
        "jax_enable_x64", "jax_default_matmul_precision", "jax_default_prng_impl", "jax_threefry_partitionable")]
    text = repr((name, bound, sorted(static.items()), str(tree), avals, devices, jax.__version__,
                 jaxlib.__version__, os.environ.get("XLA_FLAGS", ""), os.environ.get("LIBTPU_INIT_ARGS", ""),
                 settings, _source_hash()))
    return hashlib.sha256(text.encode()).hexdigest()


def _program_dir() -> str | None:
    base = jax.config.jax_compilation_cache_dir
    if not base or jax.process_count() != 1:  # executables of several processes are not kept
        return None
    return os.path.join(base, "mistral_jax_programs")


def _program(jitted, name: str, bound, args: tuple, kwargs: dict, static: dict | None = None):
    """The program for jitted(*args, **static, **kwargs), kept per call signature (see above): compiled or
    loaded on the first call, in the calling thread. `bound`: what `jitted` has bound by functools.partial
    (the config, the prefill chunk), part of the key."""
    static = static or {}
    key = _signature(name, bound, static, args, kwargs)
    if key not in _PROGRAMS:
        _PROGRAMS[key] = (name, _load_or_compile(jitted, key, args, {**kwargs, **static}))
    return _PROGRAMS[key][1]


_HITS = [0]  # persistent-cache hits seen in this process (JAX's monitoring events)


@functools.lru_cache(maxsize=None)
def _count_persistent_cache_hits() -> None:
    def on_event(event: str, **_):
        if event == "/jax/compilation_cache/cache_hits":
            _HITS[0] += 1
    jax.monitoring.register_event_listener(on_event)


def _persistent_cache_hits() -> int:
    _count_persistent_cache_hits()
    return _HITS[0]


def _load_or_compile(jitted, key: str, args, kwargs):
    from jax.experimental import serialize_executable

    directory = _program_dir()
    path = os.path.join(directory, key + ".bin") if directory else None
    if path and os.path.exists(path):
        t0 = time.perf_counter()
        try:
            with open(path, "rb") as f:
                executable, in_tree, out_tree = _unpack(f.read())
            program = serialize_executable.deserialize_and_load(executable, in_tree, out_tree)
            jax.monitoring.record_event_duration_secs(PROGRAM_EVENT, time.perf_counter() - t0)
            return program
        except Exception:  # unreadable or from an incompatible build: removed, and compiled again below
            with contextlib.suppress(OSError):
                os.unlink(path)
    hits = _persistent_cache_hits()
    program = jitted.lower(*args, **kwargs).compile()
    if not path or _persistent_cache_hits() != hits:
        # Only a fresh compilation is kept: an executable that JAX took from its persistent cache serializes
        # without some of its kernels (XLA:CPU, jax 0.10.2: the reloaded program failed with "Function ... not
        # found"). Such a program is found in that cache again next time.
        return program
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(_pack(*serialize_executable.serialize(program)))
        os.replace(tmp, path)  # atomic: a reader never sees a partial file
    except Exception:  # a cache that cannot be written only costs the next run a compilation
        if tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return program


_MAGIC = b"mistral-jax program 1\n"


def _pack(executable: bytes, in_tree, out_tree) -> bytes:
    """A kept program's file: a magic line, then the executable and its two tree structures (protobufs), each
    length-prefixed. No pickle: loading a file from the cache directory runs no code of its own."""
    parts = [executable, in_tree.serialize_using_proto(), out_tree.serialize_using_proto()]
    return _MAGIC + b"".join(struct.pack("<Q", len(x)) + x for x in parts)


def _unpack(data: bytes):
    if not data.startswith(_MAGIC):
        raise ValueError("not a kept program")
    parts, at = [], len(_MAGIC)
    for _ in range(3):
        (n,) = struct.unpack_from("<Q", data, at)
        parts.append(data[at + 8:at + 8 + n])
        at += 8 + n
        if len(parts[-1]) != n:
            raise ValueError("truncated kept program")
    trees = [jax.tree_util.PyTreeDef.deserialize_using_proto(jax.tree_util.default_registry, x) for x in parts[1:]]
    return parts[0], *trees


def program_count(name: str | None = None) -> int:
    """Programs this process holds (all, or those of `name`: "prefill" / "decode")."""
    return sum(1 for n, _ in _PROGRAMS.values() if name is None or n == name)


# ---- host driver -----------------------------------------------------------------------------------------

def overlaps_prefill(devices) -> bool:
    """Whether a Generator on `devices` (those holding its params) runs the next batch's prefill during this
    batch's decode, unless told otherwise (Generator's overlap_prefill): with one CPU device in one process."""
    devices = list(devices)
    return jax.process_count() == 1 and len(devices) == 1 and devices[0].platform == "cpu"


def _ready_time(x) -> Future:
    """The time at which the array `x` becomes ready, seen by a thread that waits for it: the end of the
    computation that produces it while the calling thread goes on with other work."""
    done: Future = Future()

    def wait():
        try:
            jax.block_until_ready(x)
        finally:
            done.set_result(time.perf_counter())
    threading.Thread(target=wait, daemon=True, name="mistral-jax-wait").start()
    return done


def _run_prefill(program, params, kwargs, busy: list):
    t0 = time.perf_counter()
    # Waited for: a worker's future is then done when the prefill is, and `busy` holds the span it ran.
    out = jax.block_until_ready(program(params, **kwargs))
    busy.append((t0, time.perf_counter()))
    return out


@dataclasses.dataclass
class _Batch:
    """One batch between its prefill and its decode."""
    prompts: list
    sampling: list
    max_new: list
    m: int             # completion buffer length (bucketed max_new)
    lengths: np.ndarray  # [batch_size] prompt lengths, padding rows included
    prefilled_info: object  # shapes, dtypes and shardings of (logits, cache): the decode program's inputs
    prefilled: object  # (logits, cache), or a Future of them
    tails: dict | None  # the prompts' ends fed by the decode loop (decode's tail, tail_start, tail_len), or None


# Generator's folding (see _fold_lengths): the most prompt tokens a row feeds through the decode loop, and what
# one decode step of a batch costs in prefilled tokens per row: on the development VM's CPU a batch-8 step cost
# about 3.2 times a prefilled column of 8 rows (bench/generate_bench.py; the figures in docs/benchmarks.md),
# rounded up.
TAIL_TOKENS = 32
FOLD_STEP_COST = 4


class Generator:
    """Generates from token-id prompts in batches; see api.Mistral for strings and chat messages.

    `overlap_prefill`: run the next batch's prefill in a worker thread while this batch decodes. None (default)
    does so when the params are on one CPU device in one process (overlaps_prefill): there the next batch's
    prefill program compiles beside a running decode, so a job that compiles takes less time. The two programs
    themselves do not run side by side (XLA:CPU runs one device's programs one at a time; a profile showed the
    worker's prefill starting when the decode ended), so once its programs are compiled the overlap saves only
    their look-up (docs/benchmarks.md). Two batches' KV caches are then held at once. Elsewhere, several
    processes must issue their programs in one order.

    `fold`: a batch whose longest prompt only just passes a shorter bucket that the job prefills anyway is
    prefilled to that bucket, and the rest of its longer prompts (at most TAIL_TOKENS) is fed by the decode loop,
    one token per step (decode's tail), when those steps cost less than the padding they save (see
    _fold_lengths). None (default): on where overlap_prefill is (one CPU device, where the rule was measured,
    see FOLD_STEP_COST)."""

    def __init__(self, params, config: MistralConfig, tokenizer=None, batch_size: int = 8,
                 prefill_chunk: int = 512, place: Callable | None = None, cache_slots: int | None = None,
                 fetch: Callable | None = None, make_cache: Callable | None = None,
                 overlap_prefill: bool | None = None, fold: bool | None = None):
        self.params, self.config, self.tokenizer = params, config, tokenizer
        self.overlap_prefill = overlap_prefill
        self.fold = fold
        self._busy: list[tuple[float, float]] = []  # wall-clock spans in which a prefill or a decode ran
        # None: the rolling buffer of min(W, length) slots. A larger value keeps more (a full-length cache
        # when >= prompt + new tokens); the window rule still applies through the mask, so tokens agree.
        self.cache_slots = cache_slots
        self.last_cache_shape: tuple[int, ...] | None = None
        self.batch_size = batch_size
        self.prefill_chunk = prefill_chunk
        self.place = place  # optional: puts host batch arrays on a mesh (sharding.py)
        # Optional mesh hooks (sharding.ModelMesh): outputs to host from every process, the cache made sharded.
        self.fetch = fetch or jax.device_get
        self.make_cache = make_cache or init_cache
        self.eos_id = tokenizer.eos_id if tokenizer is not None else EOS_ID

    def check_prompt(self, ids) -> str | None:
        from .jsonl import check_ids
        return check_ids(ids, self.config.vocab_size, self.config.max_seq_len, "prompt")

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams | Sequence[SamplingParams],
                 on_update: Callable[[int, Completion], None] | None = None,
                 steps_per_call: int | None = None,
                 on_batch: Callable[[list[int], list[Completion]], None] | None = None) -> list[Completion]:
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
        batches = [order[s:s + self.batch_size] for s in range(0, len(prompts), self.batch_size)]
        tails = bool(batches) and self._folding()
        longest = [max(len(prompts[j]) for j in idx) for idx in batches]
        folds = self._fold_lengths(longest) if tails else [None] * len(batches)
        # With the overlap (see overlap_prefill), the next batch's prefill runs in a worker thread while this
        # batch decodes. Its program is compiled here, in the calling thread (which holds the mesh and axis-rule
        # contexts that tracing needs), once this batch's decode has been dispatched: the compilation, bound by
        # arithmetic, then runs beside the decode, bound by memory reads. Without the overlap, the next batch is
        # prefilled after this one has decoded: one batch's KV cache at a time.
        pool = ThreadPoolExecutor(1, thread_name_prefix="mistral-jax-prefill") \
            if len(batches) > 1 and self._overlap() else None

        def prefill(k):
            idx = batches[k]
            return self._prefill([list(prompts[j]) for j in idx], [sampling[j] for j in idx], pool, tails, folds[k])

        try:
            upcoming = prefill(0) if batches else None
            for k, idx in enumerate(batches):
                current, upcoming = upcoming, None
                nxt = k + 1 if k + 1 < len(batches) else None

                def ahead(_nxt=nxt):
                    nonlocal upcoming
                    upcoming = prefill(_nxt)

                comps = self._decode(current, None if on_update is None else
                                     (lambda i, c, _idx=idx: on_update(_idx[i], c)), steps_per_call,
                                     ahead if pool is not None and nxt is not None else None)
                if upcoming is None and nxt is not None:
                    upcoming = prefill(nxt)
                for j, comp in zip(idx, comps):
                    results[j] = comp
                if on_batch is not None:
                    on_batch(idx, comps)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        return results

    def busy_seconds(self) -> float:
        """Wall-clock seconds in which some prefill or decode of this generator was running, in any thread
        (overlapping spans counted once): the time of generating, without the compilations that ran alone
        (a compilation during which the worker thread prefilled does count)."""
        total, end = 0.0, float("-inf")
        for a, b in sorted(self._busy):
            if b > end:
                total += b - max(a, end)
                end = b
        return total

    def _folding(self) -> bool:
        return self.fold if self.fold is not None else self._overlap()

    def _fold_lengths(self, longest: list[int]) -> list[int | None]:
        """The length each batch (by its longest prompt) is prefilled to when shorter than its bucket, else None.

        Batches are taken by bucket, shortest first; a batch folds into the smallest bucket already prefilled by
        an earlier one (so no program is added) that leaves its longest prompt at most TAIL_TOKENS longer, when
        the decode steps that feed those tokens cost less than the padding they save: a decode step of the
        batch's rows counted as FOLD_STEP_COST prefilled tokens per row (measured on the CPU, see the class
        docstring). Prefills of several chunks (prompts past `prefill_chunk`) do not fold."""
        c = self.config
        used: list[int] = []
        folds: list[int | None] = [None] * len(longest)
        for k in sorted(range(len(longest)), key=lambda i: longest[i]):
            t = bucket_length(longest[k], c.max_seq_len)
            if t > self.prefill_chunk:
                continue
            fits = [b for b in used if b < t and longest[k] - b <= TAIL_TOKENS
                    and (longest[k] - b) * FOLD_STEP_COST <= t - b]
            if fits:
                folds[k] = min(fits)
            elif t not in used:
                used.append(t)
        return folds

    def _overlap(self) -> bool:
        if self.overlap_prefill is not None:
            return self.overlap_prefill
        devices = set()
        for x in jax.tree.leaves(self.params):
            devices |= x.sharding.device_set if isinstance(x, jax.Array) else set()
        return overlaps_prefill(devices)

    def _prefill(self, prompts, sampling, pool=None, tails: bool = False, fold: int | None = None) -> "_Batch":
        """Pads one batch, then runs its prefill: here, or in `pool` (a worker thread) with the returned batch's
        `prefilled` a future. The program is found or compiled here, in the calling thread, which holds the
        mesh and axis-rule contexts that tracing needs. `tails`: the batch carries decode's tail arrays
        (TAIL_TOKENS wide, so that every batch of a job shares one decode program); `fold`: the prompts are
        prefilled up to this length, the rest goes to those arrays (_fold_lengths)."""
        c, bs = self.config, self.batch_size
        lengths_list = [len(p) for p in prompts]
        # Never generate past the model's context (the cache of an unwindowed model is sized by it).
        max_new = [min(s.max_new_tokens, c.max_seq_len - L) for s, L in zip(sampling, lengths_list)]
        t = bucket_length(max(lengths_list), c.max_seq_len)
        chunk = min(self.prefill_chunk, t)
        t = -(-t // chunk) * chunk
        m = bucket_length(max(max_new), 1 << 30)
        # Cache slots for prompt + completion, rounded up to a power of two (still at most the window): the
        # decode program depends on them, so a job whose batches have different prompt buckets compiles one
        # decode program, not one per bucket. A folded batch keeps the slots of its own bucket.
        slots = self.cache_slots or num_slots(c, min(1 << (t + m - 1).bit_length(), c.max_seq_len))
        prefilled, tail_info = prompts, None
        if tails:
            tail_info = dict(tail=np.zeros((bs, TAIL_TOKENS), np.int32), tail_start=np.zeros((bs,), np.int32),
                             tail_len=np.zeros((bs,), np.int32))
            if fold is not None:
                t = chunk = fold
                for i, p in enumerate(prompts):
                    rest = p[fold:]
                    tail_info["tail"][i, :len(rest)] = rest
                    tail_info["tail_start"][i], tail_info["tail_len"][i] = min(len(p), fold), len(rest)
                prefilled = [p[:fold] for p in prompts]
        tokens, lengths = pad_rows(prefilled, bs, t)

        pre, _ = _compiled(c, chunk)
        cache = self.make_cache(c, bs, slots)
        self.last_cache_shape = cache_shape(cache)
        host = dict(tokens=tokens, lengths=lengths)
        if self.place is not None:
            host = self.place(host)
        kwargs = dict(tokens=host["tokens"], lengths=host["lengths"], cache=cache)
        program = _program(pre, "prefill", (c, chunk), (self.params,), kwargs)
        run = functools.partial(_run_prefill, program, self.params, kwargs, self._busy)
        return _Batch(prompts, sampling, max_new, m, lengths, program.out_info,
                      pool.submit(run) if pool is not None else run(), tail_info)

    def _decode(self, batch: "_Batch", on_update, steps_per_call, ahead: Callable[[], None] | None = None):
        """Decodes one batch. Its program is found or compiled from the prefill's output shapes, so while the
        prefill still runs. `ahead`: called once the first decode call has been dispatched, before its result
        is waited for."""
        c, bs = self.config, self.batch_size
        prompts, sampling, max_new, m, lengths = batch.prompts, batch.sampling, batch.max_new, batch.m, batch.lengths
        n = len(prompts)
        stop_lists = [list(s.stop_token_ids) if s.stop_token_ids is not None else [self.eos_id] for s in sampling]
        ns = max(1, max(len(x) for x in stop_lists))
        stop_ids = np.full((bs, ns), -1, np.int32)
        for i, x in enumerate(stop_lists):
            stop_ids[i, : len(x)] = x

        def per_row(values, fill, dtype):
            arr = np.full((bs,), fill, dtype)
            arr[:n] = values
            return arr

        row_max_new = per_row(max_new, 1, np.int32)
        host = dict(
            out=np.zeros((bs, m), np.int32), n=np.zeros((bs,), np.int32), pos=lengths,
            # Padding rows, and prompts that already fill the context, start done.
            done=(np.arange(bs) >= n) | (row_max_new <= 0),
            reason=np.where(row_max_new <= 0, 2, 0).astype(np.int32),
            seeds=per_row([s.seed for s in sampling], 0, np.uint32),
            temperature=per_row([s.temperature for s in sampling], 0.0, np.float32),
            top_k=per_row([s.top_k for s in sampling], 0, np.int32),
            top_p=per_row([s.top_p for s in sampling], 1.0, np.float32),
            max_new=row_max_new,
            stop_ids=stop_ids,
            **(batch.tails or {}),
        )
        sampled = any(s.temperature > 0 for s in sampling)
        need_host = on_update is not None or any(s.stop_strings for s in sampling)
        # Steps that finish every row: its prompt's tail, then its tokens.
        total = m + (int(batch.tails["tail_len"].max()) if batch.tails else 0)
        step = np.int32(steps_per_call or (16 if need_host else total))
        # step >= total: one call generates every row's tokens, so its last token is not fed (decode's `final`);
        # with several calls, each call's last forward gives the next call its logits.
        # Every call of this batch has these shapes (a call returns the state it was given, updated). Host arrays
        # are abstract without a sharding: transferred uncommitted, as they are below.
        logits_info, cache_info = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding, weak_type=x.weak_type),
            batch.prefilled_info)
        abstract = dict(cache=cache_info, logits=logits_info,
                        **{k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in host.items()})
        program = _program(_compiled_decode(c), "decode", c, (self.params,), dict(state=abstract, max_steps=step),
                           {"sampled": sampled, "final": bool(step >= total)})
        prefilled = batch.prefilled
        logits, cache = prefilled.result() if isinstance(prefilled, Future) else prefilled
        # Host arrays are transferred, not built by small compiled programs.
        state = dict(cache=cache, logits=logits, **{k: jax.device_put(v) for k, v in host.items()})
        cut: dict[int, tuple[list[int], str]] = {}  # rows stopped by a stop string: (ids, text)
        while True:
            t0 = time.perf_counter()
            state = program(self.params, state=state, max_steps=step)
            end = None
            if ahead is not None:  # the decode runs meanwhile; a waiting thread notes when it ends
                end = _ready_time(state["n"])
                ahead()
                ahead = None
            out, cnt, done, reason = self.fetch((state["out"], state["n"], state["done"], state["reason"]))
            self._busy.append((t0, time.perf_counter() if end is None else end.result()))
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
                    d = np.array(done)
                    d[newly_done] = True
                    state["done"] = jax.device_put(d)
                    done = d
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

    def stream(self, prompt: Sequence[int], sampling: SamplingParams = SamplingParams(),
               steps_per_call: int = 8) -> Iterator[str]:
        """Yields the text of one completion as it is produced, `steps_per_call` tokens per compiled call."""
        if self.tokenizer is None:
            raise ValueError("streaming text needs a tokenizer")
        import queue
        import threading

        q: queue.Queue = queue.Queue()
        sent = [""]

        def on_update(_, comp):
            if comp.text is not None and len(comp.text) > len(sent[0]) and comp.text.startswith(sent[0]):
                q.put(comp.text[len(sent[0]):])
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
