"""Loading a model for inference, shared by the command-line tools and notebooks."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import checkpoint, memory_plan, mesh_choice, scoring, tuning
from .config import DTYPES, MistralConfig, Numerics
from .generator import Generator, SamplingParams
from .jsonl import check_ids
from .programs import CompileTimer, enable_compilation_cache  # noqa: F401 (the tools' entry points)
from .scoring import Inside
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


def load_model(
    path: str,
    dtype: str = "float32",
    tokenizer: str | None = None,
    mesh: ModelMesh | None = None,
    *,
    adapter: str | None = None,
    check_finite: bool = True,
    **config_overrides,
) -> LoadedModel:
    """Loads our orbax checkpoint, a transformers directory or a Mistral native directory, for inference.

    `dtype` is both the stored and the compute dtype. The params are read straight onto `mesh` (default:
    mesh_choice.default_mesh for generation: heads and the MLP on tensor, the batch on data; fsdp when that does
    not fit), a PEFT LoRA `adapter` directory is folded into them (W + scale A B), then they are tuned for
    inference on its devices (tuning.load_for_inference / for_inference, the one place). `check_finite` (default): a
    weight holding NaN or inf (or, from our format, not matching its checksum) is a CheckpointError naming it;
    False loads it anyway (the tools' --no-check)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    path = os.fspath(path)
    config = checkpoint.load_config(path, **config_overrides)
    if mesh is None:  # the inference default, checked with the weights plus one row's KV cache
        mesh = mesh_choice.default_mesh(
            config, "generate", lambda c, sizes: memory_plan.inference(c, sizes, dtype, 1, c.max_seq_len)
        )
    if adapter is None:
        params = tuning.load_for_inference(path, config, dtype, mesh, check_finite=check_finite)
    else:  # the adapter folds into the plain params, which are then tuned
        params = checkpoint.load_params(path, config, dtype, shardings=mesh.param_shardings, check_finite=check_finite)
        params = checkpoint.merge_adapter(params, os.fspath(adapter), config, check_finite=check_finite)
        params = tuning.for_inference(params, mesh)
    return LoadedModel(config, Numerics.of(dtype), params, find_tokenizer(path, tokenizer), mesh)


class Mistral:
    """A loaded model for notebooks: load once, then generate from strings, chat messages or ids.

        m = Mistral.load("checkpoints/my-model")            # ours, or a transformers directory
        m = Mistral.load("base", adapter="my-peft-adapter")  # a PEFT LoRA adapter folded in
        m.generate("The capital of France is", max_new_tokens=20)[0].text
        m.generate([[{"role": "user", "content": "Hi"}]], temperature=0.7, seed=1)
        for piece in m.stream("Once upon a time"): print(piece, end="")
        m.logprobs("Some text")                               # log p(x_t | x_<t), t = 1..n-1, as infer.score
        out = m.forward("Some text", hidden_states=True, attention_layers=[0])
        out.logits, out.hidden_states, out.attentions[0]      # [T, V], [L + 1, T, D], [N, T, T]

    A prompt is a str (BOS added), a list of chat messages or a list of token ids; `forward` and `logprobs`
    take one (and return one result) or a list of them (and return a list).
    """

    def __init__(self, loaded: LoadedModel, batch_size: int = 8, **generator_kw):
        self.config, self.numerics, self.params = loaded.config, loaded.numerics, loaded.params
        self.tokenizer, self.mesh = loaded.tokenizer, loaded.mesh
        self.generator = Generator(
            self.params,
            self.config,
            self.numerics,
            self.tokenizer,
            batch_size=batch_size,
            mesh=self.mesh,
            **generator_kw,
        )

    @classmethod
    def load(
        cls,
        path: str,
        dtype: str = "float32",
        tokenizer: str | None = None,
        batch_size: int = 8,
        mesh: ModelMesh | None = None,
        *,
        adapter: str | None = None,
        check_finite: bool = True,
        **config_overrides,
    ) -> Mistral:
        """load_model(...) (its arguments) wrapped for generation and experiments."""
        enable_compilation_cache()
        return cls(
            load_model(path, dtype, tokenizer, mesh, adapter=adapter, check_finite=check_finite, **config_overrides),
            batch_size=batch_size,
        )

    def encode_prompt(self, prompt) -> list[int]:
        """str -> BOS + text; list of {"role", "content"} -> chat format; list of ints -> as given."""
        if isinstance(prompt, str):
            return self._tok().encode(prompt, bos=True)
        if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict):
            return self._tok().encode_chat(list(prompt))
        if isinstance(prompt, (list, tuple)) and all(
            isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in prompt
        ):
            return [int(i) for i in prompt]
        # Strings or floats are never read as token ids.
        raise TypeError(
            'a prompt is a str, a list of {"role", "content"} messages or a list of int token ids, '
            f"got {type(prompt).__name__}"
        )

    def _tok(self):
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer.model: pass tokenizer=PATH, or give token ids")
        return self.tokenizer

    def generate(self, prompts, **sampling):
        """prompts: one prompt or a list (str, chat messages, or ids); sampling: SamplingParams fields.
        Returns a list of generator.Completion (text set when a tokenizer is known)."""
        return self.generator.generate(self._encode_all(prompts)[0], SamplingParams(**sampling))

    def forward(
        self, prompts, hidden_states: bool = False, attention_layers: Sequence[int] = ()
    ) -> Inside | list[Inside]:
        """What the model computes on one prompt or a list: a scoring.Inside each (ids, logits [T, V], and when
        asked hidden_states [L + 1, T, D] as transformers' output_hidden_states, attentions {layer: [N, T, T]}).

        Jitted and batched: prompts are sorted by length into batches of at most `batch_size` (a power of two),
        padded to a few bucket lengths, so calls of other lengths in the same bucket compile nothing new."""
        ids, single = self._encode_all(prompts)
        out = self._run(scoring.look_inside, ids, hidden_states=hidden_states, attention_layers=tuple(attention_layers))
        return out[0] if single else out

    def logprobs(self, texts) -> np.ndarray | list[np.ndarray]:
        """log p(x_t | x_<t) for t = 1..n-1 of one prompt (an array [n-1]) or of each of a list, the numbers
        infer.score writes (the same compiled program). A str is tokenized with BOS, as infer.score does."""
        ids, single = self._encode_all(texts)
        for i, row in enumerate(ids):
            if len(row) < 2:
                raise ValueError(f"text {i}: needs at least 2 tokens to score, got {len(row)}")
        out = self._run(scoring.score, ids, batch=self.generator.batch_size)  # infer.score's batches
        return out[0] if single else out

    def _run(self, fn, ids: list[list[int]], batch: int | None = None, **kw) -> list:
        for i, row in enumerate(ids):
            err = check_ids(row, self.config.vocab_size, self.config.max_seq_len, f"prompt {i}")
            if err:
                raise ValueError(err)
        if batch is None:
            # Fewer rows than batch_size run in a smaller batch: a power of two, so a few programs serve any count.
            n = 1 << max(0, len(ids) - 1).bit_length()
            batch = self.mesh.round_batch(min(n, self.generator.batch_size))
        results: list = [None] * len(ids)
        for i, r in fn(self.params, self.config, self.numerics, ids, batch, self.mesh, **kw):
            results[i] = r
        return results

    def _encode_all(self, prompts) -> tuple[list[list[int]], bool]:
        """(ids of each prompt, whether one prompt was given rather than a list)."""
        if isinstance(prompts, np.ndarray):
            prompts = prompts.tolist()  # [T] ids, or [B, T]
        single = isinstance(prompts, str) or bool(prompts) and isinstance(prompts[0], (dict, int, np.integer))
        if single:
            prompts = [prompts]
        elif not isinstance(prompts, (list, tuple)):
            raise TypeError(f"give one prompt or a list of prompts, got {type(prompts).__name__}")
        return [self.encode_prompt(p) for p in prompts], single

    def stream(self, prompt, steps_per_call: int = 8, **sampling):
        """Yields the text of one completion as it is produced."""
        return self.generator.stream(self.encode_prompt(prompt), SamplingParams(**sampling), steps_per_call)
