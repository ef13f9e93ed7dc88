"""Loading a model for inference, shared by the command-line tools and notebooks."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax

from . import checkpoint, model
from .config import DTYPES, MistralConfig
from .tokenizer import Tokenizer


@dataclasses.dataclass
class LoadedModel:
    config: MistralConfig
    params: Any
    tokenizer: Tokenizer | None


def find_tokenizer(checkpoint_dir: str, tokenizer: str | None = None) -> Tokenizer | None:
    """`tokenizer` when given, else `tokenizer.model` beside the weights (or `tokenizer.model.v*`, as
    Mistral's own repositories name it), else None."""
    if tokenizer:
        return Tokenizer.from_file(tokenizer)
    names = sorted(f for f in os.listdir(checkpoint_dir) if f.startswith("tokenizer.model"))
    if "tokenizer.model" in names:
        names = ["tokenizer.model"]
    if len(names) > 1:
        raise ValueError(f"{checkpoint_dir}: several tokenizer files {names}; choose one with --tokenizer")
    return Tokenizer.from_file(os.path.join(checkpoint_dir, names[0])) if names else None


def load_model(path: str, dtype: str = "float32", tokenizer: str | None = None, shardings=None,
               layers: str = "auto", out_major: bool | None = None, fused: bool | None = None,
               prefetched: checkpoint.Prefetch | None = None, **config_overrides) -> LoadedModel:
    """Loads our orbax checkpoint, a transformers directory or a Mistral native directory, for inference.

    `layers`: "scan" keeps the stacked layers; "unrolled" splits them per layer (model.unstack_params),
    which decodes about twice as fast on the CPU, where XLA copies a layer's weights out of the stack before
    each matmul; "auto" (default) unrolls on the CPU only. Training keeps the stacked form.
    `out_major`: hold the projection weights [out, in] (model.out_major_weights), faster decode products on
    XLA:CPU; None (default) does so when the model goes to one CPU device (no `shardings` on the CPU backend,
    or shardings that each hold one CPU device). Safetensors are read straight into these layouts.
    `fused`: q/k/v and w1/w3 joined into one weight each (model.fuse_projections); None (default): with
    per-layer, out-major weights, i.e. on the CPU.

    `dtype` sets both the stored and the compute dtype; `shardings` (a tree of shardings shaped like the
    stacked, in-major params, see sharding.py) places each tensor directly on its devices. `prefetched`: a
    checkpoint.prefetch of `path` started earlier (its reading overlaps whatever ran meanwhile)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    config = checkpoint.load_config(path, param_dtype=dtype, dtype=dtype, **config_overrides)
    if callable(shardings):
        shardings = shardings(config)
    if layers == "auto":
        layers = "unrolled" if jax.default_backend() == "cpu" else "scan"
    if layers not in ("scan", "unrolled"):
        raise ValueError(f"layers must be 'auto', 'scan' or 'unrolled', got {layers!r}")
    if out_major is None:
        out_major = (jax.default_backend() == "cpu") if shardings is None else all(
            model.on_one_cpu_device(s) for s in jax.tree.leaves(shardings))
    params = checkpoint.load_params(path, config, dtype=dtype, shardings=shardings, unrolled=layers == "unrolled",
                                    out_major=out_major, prefetched=prefetched)
    config = config.replace(scan_layers=layers == "scan", out_major_weights=bool(out_major))
    if fused if fused is not None else (out_major and layers == "unrolled"):
        params, config = model.fuse_projections(params, config)
    return LoadedModel(config, params, find_tokenizer(path, tokenizer))


def enable_compilation_cache(path: str | None = None) -> str:
    """Turns on JAX's persistent compilation cache (default ~/.cache/mistral_jax/xla, or
    $MISTRAL_JAX_CACHE), so a second run of the same job does not compile again. Returns the directory."""
    import jax

    path = path or os.environ.get("MISTRAL_JAX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "mistral_jax", "xla")
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


class CompileTimer:
    """Adds up the seconds JAX spends tracing and compiling (its monitoring events), so the tools can
    report throughput with compilation excluded. The /jax/core/compile/ events count (a persistent-cache hit's
    retrieval time is already inside backend_compile_duration), and the loading of a program that generate.py
    kept from an earlier run."""

    def __init__(self):
        import jax

        from .generate import PROGRAM_EVENT

        self.seconds = 0.0
        self._program_event = PROGRAM_EVENT
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **_):
        if event.startswith("/jax/core/compile/") or event == self._program_event:
            self.seconds += duration


class Mistral:
    """A loaded model for notebooks: load once, then generate from strings, chat messages or ids.

        m = Mistral.load("checkpoints/my-model")            # ours, or a transformers directory
        m.generate("The capital of France is", max_new_tokens=20)[0].text
        m.generate([[{"role": "user", "content": "Hi"}]], temperature=0.7, seed=1)
        for piece in m.stream("Once upon a time"): print(piece, end="")
    """

    def __init__(self, loaded: LoadedModel, batch_size: int = 8, place=None, **generator_kw):
        from .generate import Generator

        self.config, self.params, self.tokenizer = loaded.config, loaded.params, loaded.tokenizer
        self.generator = Generator(self.params, self.config, self.tokenizer, batch_size=batch_size, place=place,
                                   **generator_kw)

    @classmethod
    def load(cls, path: str, dtype: str = "float32", tokenizer: str | None = None, batch_size: int = 8,
             **config_overrides) -> "Mistral":
        enable_compilation_cache()
        return cls(load_model(path, dtype, tokenizer, **config_overrides), batch_size=batch_size)

    def encode_prompt(self, prompt) -> list[int]:
        """str -> BOS + text; list of {"role", "content"} -> chat format; list of ints -> as given."""
        if isinstance(prompt, str):
            return self._tok().encode(prompt, bos=True)
        if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict):
            return self._tok().encode_chat(list(prompt))
        return [int(i) for i in prompt]

    def _tok(self):
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer.model: pass tokenizer=PATH, or give token ids")
        return self.tokenizer

    def generate(self, prompts, **sampling):
        """prompts: one prompt or a list (str, chat messages, or ids); sampling: SamplingParams fields.
        Returns a list of generate.Completion (text set when a tokenizer is known)."""
        from .generate import SamplingParams

        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], (dict, int))):
            prompts = [prompts]
        ids = [self.encode_prompt(p) for p in prompts]
        return self.generator.generate(ids, SamplingParams(**sampling))

    def stream(self, prompt, steps_per_call: int = 8, **sampling):
        """Yields the text of one completion as it is produced."""
        from .generate import SamplingParams

        return self.generator.stream(self.encode_prompt(prompt), SamplingParams(**sampling), steps_per_call)
