"""The compiled generation programs: decode.prefill and decode.decode jitted once per (config, numerics, static
arguments, mesh), compiled ahead of their calls on a background thread (a job's later programs compile while
its first ones run), their compilations counted, and JAX's persistent compilation cache, which lets a second
run of a job skip compiling them.

The programs' outputs are pinned to the mesh's batch and cache shardings, the same that ModelMesh.place and
ModelMesh.cache give the inputs, so a state fed back from one call to the next never compiles again.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import jax
from jax.sharding import Mesh

from . import decode as decode_lib
from .config import MistralConfig, Numerics
from .sharding import ModelMesh, batch_sharding, cache_shardings

_JITTED: dict[str, list] = {"prefill": [], "decode": []}  # every program made, by kind, for count()


def prefill_program(config: MistralConfig, numerics: Numerics, chunk: int, mesh: ModelMesh):
    """jit of decode.prefill for `chunk`: (params, tokens, lengths, cache) -> (logits, cache); the cache is
    donated."""
    return _prefill(config, numerics, chunk, mesh.mesh, mesh.rules)


def decode_program(config: MistralConfig, numerics: Numerics, mesh: ModelMesh):
    """jit of decode.decode: (params, state, max_steps, *, sampled, final) -> state; the state is donated."""
    return _decode(config, numerics, mesh.mesh, mesh.rules)


@functools.cache
def _prefill(config: MistralConfig, numerics: Numerics, chunk: int, mesh: Mesh, rules):
    fn = jax.jit(
        functools.partial(decode_lib.prefill, config=config, numerics=numerics, chunk=chunk),
        donate_argnames=("cache",),
        out_shardings=(batch_sharding(mesh, 2, rules), cache_shardings(mesh, rules)),
    )
    _JITTED["prefill"].append(fn)
    return fn


@functools.cache
def _decode(config: MistralConfig, numerics: Numerics, mesh: Mesh, rules):
    fn = jax.jit(
        functools.partial(decode_lib.decode, config=config, numerics=numerics),
        donate_argnames=("state",),
        static_argnames=("sampled", "final"),
        out_shardings=state_shardings(mesh, rules),
    )
    _JITTED["decode"].append(fn)
    return fn


def state_shardings(mesh: Mesh, rules) -> decode_lib.DecodeState:
    """A DecodeState of shardings: rows over the batch axes, the cache as ModelMesh.cache lays it out."""
    rows, table = batch_sharding(mesh, 1, rules), batch_sharding(mesh, 2, rules)
    return decode_lib.DecodeState(
        cache=cache_shardings(mesh, rules),
        logits=table,
        out=table,
        n=rows,
        pos=rows,
        done=rows,
        reason=rows,
        seeds=rows,
        temperature=rows,
        top_k=rows,
        top_p=rows,
        max_new=rows,
        stop_ids=table,
    )


def count(kind: str | None = None) -> int:
    """Compiled programs held in this process: all, or those of `kind` ("prefill" / "decode")."""
    kinds = _JITTED if kind is None else {kind: _JITTED[kind]}
    fns = [fn for fns in kinds.values() for fn in fns]
    ahead = sum(1 for key, f in _COMPILED.items() if key[0] in fns and f.done() and not f.exception())
    return sum(fn._cache_size() for fn in fns) + ahead


# ---- compiling ahead ----------------------------------------------------------------------------------------

_COMPILED: dict[tuple, Future] = {}  # (jitted, argument signature, static arguments) -> its compiled program
_LOCK = threading.Lock()


@functools.cache
def _worker() -> ThreadPoolExecutor:
    # One thread: programs compile one at a time, in the order the calls will need them.
    return ThreadPoolExecutor(1, thread_name_prefix="mistral-jax-compile")


def _sharding(x):
    return getattr(x, "sharding", None)  # None: a host value, placed by the call


def _signature(args) -> tuple:
    leaves, treedef = jax.tree.flatten(args)
    return treedef, tuple((tuple(x.shape), str(x.dtype), _sharding(x)) for x in leaves)


def ahead(jitted, mesh: ModelMesh, args: tuple, statics: dict) -> Future:
    """The compiled program of jitted(*args, **statics) (args: arrays or jax.ShapeDtypeStructs with their
    shardings), queued on the compile thread unless this process has it or has queued it already."""
    key = (jitted, _signature(args), tuple(sorted(statics.items())))
    with _LOCK:
        fut = _COMPILED.get(key)
        if fut is None or fut.cancelled() or (fut.done() and fut.exception() is not None):
            abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=_sharding(x)), args)
            fut = _COMPILED[key] = _worker().submit(_compile, jitted, mesh, abstract, statics)
    return fut


def _compile(jitted, mesh: ModelMesh, abstract: tuple, statics: dict):
    with mesh.activate():  # the logical constraints' mesh is per thread
        return jitted.lower(*abstract, **statics).compile()


def cancel(futures) -> None:
    """Drops queued compilations that have not started (a job that stopped early)."""
    for f in futures:
        f.cancel()


# ---- compilation time ---------------------------------------------------------------------------------------


class CompileTimer:
    """Adds up the seconds JAX spends tracing and compiling from its creation on, in every thread (its
    /jax/core/compile/ monitoring events; a persistent-cache hit's retrieval is inside
    backend_compile_duration)."""

    def __init__(self):
        self.seconds = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **_):
        if event.startswith("/jax/core/compile/"):
            self.seconds += duration


def enable_compilation_cache(path: str | None = None) -> str | None:
    """Turns on JAX's persistent compilation cache (default ~/.cache/mistral_jax/xla, or $MISTRAL_JAX_CACHE),
    so a second run of the same job does not compile again. Returns the directory, or None (with a note) when
    it cannot be made: the job then compiles as usual.

    Nothing else is kept there, and nothing there is ever run as code: JAX reads an entry as bytes,
    decompresses it and hands it to XLA's executable deserializer (no pickle), and an entry it cannot read is
    a cache miss (a warning, then a compilation)."""
    path = (
        path
        or os.environ.get("MISTRAL_JAX_CACHE")
        or os.path.join(os.path.expanduser("~"), ".cache", "mistral_jax", "xla")
    )
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        print(f"note: no compilation cache ({path}: {e.strerror or e}); compiling as usual", file=sys.stderr)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
