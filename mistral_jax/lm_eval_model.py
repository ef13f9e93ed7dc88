"""Our model for EleutherAI's lm-evaluation-harness, registered as "mistral_jax".

    import lm_eval
    from mistral_jax.lm_eval_model import MistralJaxLM
    lm_eval.simple_evaluate(model=MistralJaxLM("checkpoints/my-model"), tasks=["hellaswag"])
    python -m infer.eval --checkpoint checkpoints/my-model --tasks hellaswag      (lm_eval's own flags after)

Requests are tokenized and split the way lm_eval's `hf` model does, so scores compare with it number for
number: `tok_encode` adds BOS (add_bos_token), a context's trailing spaces move to the continuation and the
pair is split by encoding the whole text (TemplateLM._encode_pair), an empty context becomes the prefix
token (BOS), inputs longer than `max_length` lose tokens on the left, and rolling log-likelihoods use lm_eval's
disjoint windows. Scoring runs batched and length-bucketed on the model's mesh; generation goes through
generator.Generator (per-request stop strings, max_gen_toks, greedy or sampled).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from mistral_jax import api
from mistral_jax import checkpoint as checkpoint_lib
from mistral_jax import model as model_lib
from mistral_jax.batching import bucket_length, pad_rows
from mistral_jax.config import MistralConfig, Numerics
from mistral_jax.generator import Generator, SamplingParams
from mistral_jax.sharding import ModelMesh

log = logging.getLogger(__name__)

BOS_TEXT = "<s>"
# Generation settings of lm_eval tasks that we honour; others must keep their no-op value.
_NO_OP_GEN_KWARGS = {"num_beams": 1, "repetition_penalty": 1.0, "num_return_sequences": 1, "use_cache": True}


def continuation_scores(params, inputs, targets, lengths, *, config: MistralConfig, numerics: Numerics):
    """inputs/targets [B, T] right-padded (targets = inputs shifted by one), lengths [B] -> (log p(target)
    [B, T] float32, target == argmax [B, T] bool); padding never influences real tokens."""
    idx = jnp.arange(inputs.shape[1])
    segment_ids = (idx[None, :] < lengths[:, None]).astype(jnp.int32)
    logits = model_lib.forward(params, inputs, None, segment_ids, config=config, numerics=numerics)
    target = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return target - jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, axis=-1) == targets


@functools.cache
def _jitted(config: MistralConfig, numerics: Numerics):
    return jax.jit(functools.partial(continuation_scores, config=config, numerics=numerics))


def _int_or_none(value, what: str) -> int | None:
    if value is None or value == "" or (isinstance(value, str) and value.startswith("auto")):
        return None  # our batches are fixed-size and bucketed: no search for a batch size
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be an integer or 'auto', got {value!r}") from None


@register_model("mistral_jax")
class MistralJaxLM(TemplateLM):
    """lm_eval's LM over one of our checkpoints (`checkpoint`: ours, transformers or native; `adapter`: a PEFT
    LoRA adapter folded in; `mesh`: a ModelMesh spec such as "data=2,fsdp=-1", default every device on fsdp),
    or over an already loaded `model` (api.Mistral or api.LoadedModel).

    batch_size: rows per compiled batch (lm_eval's "auto" means our default, 8). max_length: the context
    the harness may use (default: the model's max_seq_len). max_gen_toks: generate_until's default length.
    add_bos_token / prefix_token_id: as lm_eval's `hf` model (BOS added; BOS conditions an empty context).
    seed: the first sampled request's seed; request i of a call samples with seed + i."""

    def __init__(
        self,
        checkpoint: str | None = None,
        dtype: str = "float32",
        tokenizer: str | None = None,
        adapter: str | None = None,
        batch_size: int | str | None = 8,
        max_batch_size: int | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        add_bos_token: bool = True,
        prefix_token_id: int | None = None,
        seed: int = 0,
        mesh: str | None = None,
        model: Any = None,
        device: str | None = None,
        **unused,
    ):
        super().__init__()
        if unused:
            log.warning("mistral_jax: ignoring model arguments %s", sorted(unused))
        if (checkpoint is None) == (model is None):
            raise ValueError("mistral_jax: give exactly one of checkpoint=DIR and model=(api.Mistral or LoadedModel)")
        if model is None:
            mm = None if mesh is None else ModelMesh.build(checkpoint_lib.load_config(checkpoint), str(mesh))
            model = api.load_model(checkpoint, dtype, tokenizer, mm, adapter=adapter or None)
        elif adapter:
            raise ValueError("mistral_jax: adapter= applies to checkpoint=; load the model with its adapter instead")
        if model.tokenizer is None:
            raise ValueError("mistral_jax: the checkpoint has no tokenizer.model; pass tokenizer=PATH")
        self.config, self.numerics, self.params = model.config, model.numerics, model.params
        self.tok, self.mesh = model.tokenizer, model.mesh
        size = _int_or_none(batch_size, "batch_size") or 8
        cap = _int_or_none(max_batch_size, "max_batch_size")
        self._batch_size = self.mesh.round_batch(min(size, cap) if cap else size)
        self._max_length = _int_or_none(max_length, "max_length") or self.config.max_seq_len
        if not 1 < self._max_length <= self.config.max_seq_len:
            raise ValueError(
                f"mistral_jax: max_length must be in [2, {self.config.max_seq_len}] (the model's "
                f"max_seq_len), got {self._max_length}"
            )
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token if isinstance(add_bos_token, bool) else str(add_bos_token) == "True"
        self.custom_prefix_token_id = None if prefix_token_id is None else int(prefix_token_id)
        self.seed = int(seed)
        self._device = device
        self.generator = Generator(
            self.params, self.config, self.numerics, self.tok, batch_size=self._batch_size, mesh=self.mesh
        )

    @classmethod
    def from_model(cls, model, **kwargs) -> MistralJaxLM:
        return cls(model=model, **kwargs)

    # ---- what lm_eval asks of a TemplateLM -------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id if self.custom_prefix_token_id is None else self.custom_prefix_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None, **kwargs
    ) -> list[int]:
        """As the `hf` model: BOS unless add_special_tokens (default add_bos_token) says otherwise; a string that
        starts with the BOS text keeps that BOS and gets no second one."""
        bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        if add_special_tokens is None and string.startswith(BOS_TEXT):
            ids = [self.tok.bos_id] + self.tok.encode(string[len(BOS_TEXT) :], bos=False)
        else:
            ids = self.tok.encode(string, bos=bos)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Sequence[int], **kwargs) -> str:
        return self.tok.decode(tokens)

    def get_model_info(self) -> dict:
        c = self.config
        return {
            "model_dtype": self.numerics.dtype,
            "model_num_layers": c.n_layers,
            "model_dim": c.dim,
            "model_vocab_size": c.vocab_size,
            "max_seq_len": c.max_seq_len,
        }

    # ---- log-likelihoods -------------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) or None, context ids, continuation ids) -> (sum of the
        continuation's log-probs, whether greedy decoding gives it), in order."""
        rows = []
        for _, ctx, cont in requests:
            if not ctx or not cont:
                raise ValueError("loglikelihood: a request needs at least one context and one continuation token")
            if len(cont) > self.max_length:
                raise ValueError(
                    f"loglikelihood: continuation of {len(cont)} tokens exceeds max_length {self.max_length}"
                )
            # Truncated from the left so that the inputs fit max_length (the last token is only a target).
            rows.append((ctx + cont)[-(self.max_length + 1) :])
        out = self._score_rows(rows, [len(c) for _, _, c in requests], disable_tqdm)
        for (key, _, _), answer in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return out

    def _score_rows(self, rows: list[list[int]], n_scored: list[int], disable_tqdm: bool):
        """(sum of the log-probs of the last n_scored[i] tokens of rows[i], all of them argmax), per row."""
        fn = _jitted(self.config, self.numerics)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))  # longest first, as lm_eval
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        bs = self.batch_size
        with (
            self.mesh.activate(),
            tqdm(total=len(rows), disable=disable_tqdm or self.rank != 0, desc="Running loglikelihood requests") as bar,
        ):
            for start in range(0, len(order), bs):
                idx = order[start : start + bs]
                t = bucket_length(max(len(rows[i]) - 1 for i in idx), self.config.max_seq_len)
                inputs, lengths = pad_rows([rows[i][:-1] for i in idx], bs, t)
                targets, _ = pad_rows([rows[i][1:] for i in idx], bs, t)
                lp, greedy = self.mesh.fetch(fn(self.params, *self.mesh.place(inputs, targets, lengths)))
                for j, i in enumerate(idx):
                    n, k = len(rows[i]) - 1, n_scored[i]
                    out[i] = (float(lp[j, n - k : n].sum(dtype=np.float64)), bool(greedy[j, n - k : n].all()))
                bar.update(len(idx))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood in lm_eval's disjoint windows of max_length tokens: the first conditions
        on the prefix token, later ones on as many earlier tokens as fit; every token is scored once."""
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, ctx, cont))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm) if windows else []
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, scores):
            totals[i] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation ------------------------------------------------------------------------------------------

    def _sampling(self, gen_kwargs: dict, seed: int) -> tuple[SamplingParams, list[str]]:
        """lm_eval's generation kwargs -> (our SamplingParams, the stop strings to cut at)."""
        if not isinstance(gen_kwargs, dict):
            raise ValueError(f"generate_until: generation kwargs must be a dict, got {type(gen_kwargs).__name__}")
        kw = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        eos = self.tok.id_to_piece(self.eot_token_id)
        until = handle_stop_sequences(kw.pop("until", None), eos=eos)
        max_new = kw.pop("max_gen_toks")
        do_sample, temperature = kw.pop("do_sample", False), float(kw.pop("temperature", 0.0) or 0.0)
        top_k, top_p = int(kw.pop("top_k", 0) or 0), float(kw.pop("top_p", 1.0) or 1.0)
        kw.pop("max_length", None)  # prompt + generation; max_gen_toks decides
        bad = {k: v for k, v in kw.items() if _NO_OP_GEN_KWARGS.get(k, object()) != v}
        if bad:
            raise ValueError(
                f"generate_until: unsupported generation settings {bad} (supported: until, "
                "max_gen_toks, do_sample, temperature, top_k, top_p)"
            )
        if do_sample and temperature == 0.0:
            temperature = 1.0  # transformers' default when sampling
        if not do_sample:
            temperature = 0.0
        # The EOS token stops generation by id; its text, as lm_eval adds it, is only cut at afterwards.
        return SamplingParams(
            max_new_tokens=max_new,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop_strings=tuple(s for s in until if s and s != eos),
        ), until

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations of each context until a stop string (cut before it), EOS or max_gen_toks tokens;
        the context keeps its last max_length - max_gen_toks tokens."""
        prompts, settings, stops = [], [], []
        for i, (context, gen_kwargs) in enumerate(req.args for req in requests):
            sampling, until = self._sampling(gen_kwargs, self.seed + i)
            room = self.max_length - sampling.max_new_tokens
            if room <= 0:
                raise ValueError(
                    f"generate_until: max_gen_toks {sampling.max_new_tokens} leaves no room for the "
                    f"context in max_length {self.max_length}"
                )
            prompts.append(self.tok_encode(context, left_truncate_len=room))
            settings.append(sampling)
            stops.append(until)
        bar = tqdm(total=len(prompts), disable=disable_tqdm or self.rank != 0, desc="Running generate_until requests")
        comps = self.generator.generate(prompts, settings, on_batch=lambda idx, _: bar.update(len(idx)))
        bar.close()
        out = []
        for req, comp, until in zip(requests, comps, stops):
            text = postprocess_generated_text(comp.text, until, None)
            self.cache_hook.add_partial("generate_until", req.args, text)
            out.append(text)
        return out
