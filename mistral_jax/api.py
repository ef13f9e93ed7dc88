"""Loading a model for inference, shared by the command-line tools and notebooks."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from . import checkpoint, tuning
from .config import DTYPES, MistralConfig, Numerics
from .generator import Generator, SamplingParams
from .programs import CompileTimer, enable_compilation_cache  # noqa: F401 (the tools' entry points)
from .sharding import ModelMesh
from .tokenizer import Tokenizer


@dataclasses.dataclass
class LoadedModel:
    config: MistralConfig
    numerics: Numerics
    params: Any
    tokenizer: Tokenizer | None
    mesh: ModelMesh


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


def load_model(path: str, dtype: str = "float32", tokenizer: str | None = None, mesh: ModelMesh | None = None,
               **config_overrides) -> LoadedModel:
    """Loads our orbax checkpoint, a transformers directory or a Mistral native directory, for inference.

    `dtype` is both the stored and the compute dtype. The params are read straight onto `mesh` (default:
    every device on fsdp), then tuned for inference on its devices (tuning.for_inference, the one place)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    path = os.fspath(path)
    config = checkpoint.load_config(path, **config_overrides)
    mesh = mesh if mesh is not None else ModelMesh.build(config, None)
    params = checkpoint.load_params(path, config, dtype, shardings=mesh.param_shardings)
    params = tuning.for_inference(params, mesh)
    return LoadedModel(config, Numerics.of(dtype), params, find_tokenizer(path, tokenizer), mesh)


class Mistral:
    """A loaded model for notebooks: load once, then generate from strings, chat messages or ids.

        m = Mistral.load("checkpoints/my-model")            # ours, or a transformers directory
        m.generate("The capital of France is", max_new_tokens=20)[0].text
        m.generate([[{"role": "user", "content": "Hi"}]], temperature=0.7, seed=1)
        for piece in m.stream("Once upon a time"): print(piece, end="")
    """

    def __init__(self, loaded: LoadedModel, batch_size: int = 8, **generator_kw):
        self.config, self.numerics, self.params = loaded.config, loaded.numerics, loaded.params
        self.tokenizer, self.mesh = loaded.tokenizer, loaded.mesh
        self.generator = Generator(self.params, self.config, self.numerics, self.tokenizer, batch_size=batch_size,
                                   mesh=self.mesh, **generator_kw)

    @classmethod
    def load(cls, path: str, dtype: str = "float32", tokenizer: str | None = None, batch_size: int = 8,
             mesh: ModelMesh | None = None, **config_overrides) -> Mistral:
        enable_compilation_cache()
        return cls(load_model(path, dtype, tokenizer, mesh, **config_overrides), batch_size=batch_size)

    def encode_prompt(self, prompt) -> list[int]:
        """str -> BOS + text; list of {"role", "content"} -> chat format; list of ints -> as given."""
        if isinstance(prompt, str):
            return self._tok().encode(prompt, bos=True)
        if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict):
            return self._tok().encode_chat(list(prompt))
        if isinstance(prompt, (list, tuple)) and all(isinstance(i, (int, np.integer)) and not isinstance(i, bool)
                                                     for i in prompt):
            return [int(i) for i in prompt]
        # Strings or floats are never read as token ids.
        raise TypeError("a prompt is a str, a list of {\"role\", \"content\"} messages or a list of int token ids, "
                        f"got {type(prompt).__name__}")

    def _tok(self):
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer.model: pass tokenizer=PATH, or give token ids")
        return self.tokenizer

    def generate(self, prompts, **sampling):
        """prompts: one prompt or a list (str, chat messages, or ids); sampling: SamplingParams fields.
        Returns a list of generator.Completion (text set when a tokenizer is known)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], (dict, int))):
            prompts = [prompts]
        ids = [self.encode_prompt(p) for p in prompts]
        return self.generator.generate(ids, SamplingParams(**sampling))

    def stream(self, prompt, steps_per_call: int = 8, **sampling):
        """Yields the text of one completion as it is produced."""
        return self.generator.stream(self.encode_prompt(prompt), SamplingParams(**sampling), steps_per_call)
