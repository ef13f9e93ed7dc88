"""Tests for mistral_jax.train_step: the loss against an independent cross-entropy, LoRA at step 0 and merged,
gradient accumulation against the big batch, the non-finite skip, the weight-decay mask."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from chats import asst, user

from mistral_jax import lora as lora_lib
from mistral_jax import model as model_lib
from mistral_jax import params as params_lib
from mistral_jax import train_step as ts
from mistral_jax.config import Numerics, get_preset
from mistral_jax.data import DataIterator, load_examples, pack
from mistral_jax.lora import LoraConfig
from mistral_jax.tokenizer import Tokenizer
from mistral_jax.train_state import TrainState

CONFIG = get_preset("tiny")
F32 = Numerics()  # float32 params and compute


CONVERSATIONS = [
    [user("What is 2+2?"), asst("4")],
    [user("Capital of France?"), asst("Paris."), user("And of Italy?"), asst("Rome, of course.")],
    [{"role": "system", "content": "Be brief."}, user("Name a colour"), asst("Teal")],
    [user("Spell cat backwards"), asst("tac")],
    [user("Hi"), asst("Hello! How can I help you today?")],
    [user("Count to three"), asst("one two three")],
    [user("Opposite of up?"), asst("down"), user("And of left?"), asst("right")],
    [user("Say nothing else but yes"), asst("yes")],
    [user("What is 10-3?"), asst("7")],
]


@pytest.fixture(scope="module")
def tok(v1_tokenizer_path):
    return Tokenizer.from_file(v1_tokenizer_path)


@pytest.fixture(scope="module")
def packed(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS))
    examples, _ = load_examples(str(path), tok, 48)
    return pack(examples, 48)


def random_params(config, seed=0):
    """Random weights (N(0, 0.02), norm scales near 1) made on the host: no init program to compile."""
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        if "norm" in jax.tree_util.keystr(path):
            return jnp.asarray(1 + 0.1 * rng.standard_normal(s.shape), s.dtype)
        return jnp.asarray(0.02 * rng.standard_normal(s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(leaf, params_lib.param_shapes(config))


@pytest.fixture(scope="module")
def params():
    return random_params(CONFIG)


# One jitted function per module, so tests that share shapes share the compiled program.
_GRADS = jax.jit(ts.accumulate_grads, static_argnames=("config", "numerics", "lora_spec", "grad_accum"))


def grads(params, batch, numerics=F32, grad_accum=1):
    """(grads, loss, count) of the full-model loss; always the same call signature, so one compile per shape."""
    return _GRADS(
        params, None, batch, jax.random.key(0), config=CONFIG, numerics=numerics, lora_spec=None, grad_accum=grad_accum
    )


LOSS = jax.jit(ts.loss_sums, static_argnames=("config", "numerics", "lora_spec"))
FORWARD = jax.jit(model_lib.forward, static_argnames=("config", "numerics"))


@functools.partial(jax.jit, static_argnums=2)
def lora_logits(params, adapters, spec, tokens):
    """Logits of the base `params` with `adapters` attached (lora.attach, no dropout)."""
    return model_lib.forward(lora_lib.attach(params, adapters, spec), tokens, config=CONFIG)


def batch_of(packed, n):
    """The first `n` packed rows (zero rows appended as padding if there are fewer)."""
    return next(DataIterator(packed, n, seed=0, shuffle=False))


def assistant_targets(tok, messages):
    """Positions t whose token ids[t] belongs to an assistant turn (content or its EOS), found from prefix
    encodings alone: each assistant turn is what its conversation prefix adds over the prompt before it."""
    ids = tok.encode_chat(messages)
    targets = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start = len(tok.encode_chat(messages[:i]))
            end = len(tok.encode_chat(messages[: i + 1]))
            targets += range(start, end)
    return ids, targets


def test_loss_is_cross_entropy_over_assistant_tokens_only(tok, packed, params):
    """The packed batch's loss equals torch's cross-entropy over exactly the assistant tokens, each example
    run alone through the model."""
    rows = packed["tokens"].shape[0]
    assert rows < len(CONVERSATIONS)  # several examples share a row
    s, n = LOSS(params, None, batch_of(packed, rows), config=CONFIG, numerics=F32)
    encoded = [assistant_targets(tok, messages) for messages in CONVERSATIONS]
    alone = np.zeros((len(encoded), 48), np.int32)  # one example per row; causal, so the padding after is inert
    for i, (ids, _) in enumerate(encoded):
        alone[i, : len(ids)] = ids
    all_logits = np.asarray(FORWARD(params, jnp.asarray(alone), config=CONFIG), np.float64)
    nll, count = [], 0
    for (ids, targets), logits in zip(encoded, all_logits):
        t = torch.tensor(targets)
        logits = torch.from_numpy(logits)
        nll.append(torch.nn.functional.cross_entropy(logits[t - 1], torch.tensor(ids)[t], reduction="sum").item())
        count += len(targets)
    assert float(n) == count
    np.testing.assert_allclose(float(s) / float(n), sum(nll) / count, rtol=2e-6)


# LoRA on a subset of targets, with both layouts of attention (wq [D, N, H]; wo [N, H, D]) and an MLP matrix.
# (Dropout, which doubles the compile time of the step, is exercised by the trainer's LoRA runs.)
LORA_SPEC = LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "o", "down"))


@pytest.fixture(scope="module")
def lora0():
    """init_lora's adapters on the host (each test makes its own device copy: steps donate their state)."""
    return jax.device_get(lora_lib.init_lora(CONFIG, LORA_SPEC, jax.random.key(1)))


def test_lora_step0_is_base_and_merge_equals_adapter(packed, params, lora0):
    spec = LORA_SPEC
    lora = jax.tree.map(jnp.asarray, lora0)
    assert all(
        not np.any(x) for k, x in jax.tree_util.tree_leaves_with_path(lora0) if jax.tree_util.keystr(k).endswith("_b']")
    )  # B starts at zero
    tokens = jnp.asarray(batch_of(packed, len(CONVERSATIONS))["tokens"])  # the loss test's shape: compiled once
    base = FORWARD(params, tokens, config=CONFIG)
    np.testing.assert_array_equal(lora_logits(params, lora, spec, tokens), base)

    # Non-zero B (as after training): the merged weights give the adapter model's logits.
    rng = np.random.default_rng(2)
    lora = jax.tree.map(lambda x: jnp.asarray(x + 0.05 * rng.standard_normal(x.shape, np.float32)), lora0)
    adapted = lora_logits(params, lora, spec, tokens)
    merged = FORWARD(lora_lib.merge_lora(params, lora, spec), tokens, config=CONFIG)
    assert float(jnp.max(jnp.abs(adapted - base))) > 1e-2
    np.testing.assert_allclose(merged, adapted, atol=2e-5, rtol=1e-5)


# The LoRA step of the next two tests: bf16 matmuls over f32 adapters (master weights).
BF16 = Numerics(dtype="bfloat16")
OPT = ts.OptimizerConfig(lr=1e-2, total_steps=10, warmup_steps=0)


def lora_state(lora0):
    return TrainState.create(jax.tree.map(jnp.asarray, lora0), ts.make_optimizer(OPT), seed=0)


def test_lora_step_trains_adapters_only(packed, params, lora0):
    state = lora_state(lora0)
    lora_leaves = len(jax.tree.leaves(state.params))
    assert sorted(state.params["layers"]["attention"]) == ["wo_a", "wo_b", "wq_a", "wq_b", "wv_a", "wv_b"]
    assert sorted(state.params["layers"]["feed_forward"]) == ["w2_a", "w2_b"]
    # Optimizer state covers the adapters alone: mu and nu hold one leaf per adapter leaf, none per base leaf.
    assert len(jax.tree.leaves(state.opt_state)) == 2 * lora_leaves + 2  # + adam's and the schedule's counts
    step = ts.jit_train_step(CONFIG, OPT, numerics=BF16, lora_spec=LORA_SPEC)
    frozen_before = jax.tree.map(np.asarray, params)
    batch = batch_of(packed, 8)
    _, f32_loss, _ = grads(params, batch)  # the base model's loss
    state, m0 = step(state, params, batch)
    state, m1 = step(state, params, batch)
    jax.tree.map(np.testing.assert_array_equal, frozen_before, jax.tree.map(np.asarray, params))
    assert float(jnp.abs(state.params["layers"]["attention"]["wq_b"]).max()) > 0  # B moved off zero
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.opt_state) if x.ndim)
    # Step 0 is the base model (B = 0): its loss in bf16 is the f32 loss to bf16 precision.
    np.testing.assert_allclose(float(m0["loss"]), float(f32_loss), rtol=2e-2)
    assert float(m1["loss"]) < float(m0["loss"])


def test_grad_accumulation_equals_big_batch(packed, params):
    batch = batch_of(packed, 8)
    counts = batch["loss_mask"].sum(1)
    assert len(set(counts.tolist())) > 2  # uneven rows: a mean of microbatch means would differ
    g8, loss8, n8 = grads(params, batch)
    g42, loss42, n42 = grads(params, batch, grad_accum=4)
    assert float(n8) == float(n42) == counts.sum()
    np.testing.assert_allclose(float(loss42), float(loss8), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g42), jax.tree.leaves(g8)):
        np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.abs(b).max()), rtol=1e-5)

    # The microbatches are rows i, i+4 (see _microbatches); a mean of their means is a different number.
    means = []
    for i in range(4):
        rows = (np.arange(8) % 4 == i)[:, None]
        _, loss_i, _ = grads(params, dict(batch, loss_mask=batch["loss_mask"] * rows))
        means.append(float(loss_i))
    assert abs(np.mean(means) - float(loss8)) > 1e-3


def test_nonfinite_loss_skips_the_update(packed, params, lora0):
    step = ts.jit_train_step(CONFIG, OPT, numerics=BF16, lora_spec=LORA_SPEC)
    good = batch_of(packed, 8)
    bad = dict(good, loss_mask=np.where(good["loss_mask"] > 0, np.nan, 0).astype(np.float32))
    state, m = step(lora_state(lora0), params, good)
    before = jax.device_get(state)
    for i in range(2):
        state, m = step(state, params, bad)
        assert bool(m["skipped"]) and not np.isfinite(float(m["loss"]))
        assert int(m["bad_streak"]) == i + 1 and int(m["skipped_total"]) == i + 1
    after = jax.device_get(state)
    jax.tree.map(np.testing.assert_array_equal, before.params, after.params)
    jax.tree.map(np.testing.assert_array_equal, before.opt_state, after.opt_state)
    assert int(after.step) == 3 and int(after.skipped) == 2
    # The next good step resumes the schedule where the last applied update left it (update #2).
    state, m = step(state, params, good)
    assert not bool(m["skipped"]) and int(m["bad_streak"]) == 0
    np.testing.assert_allclose(float(m["lr"]), float(OPT.schedule()(1)), rtol=1e-6)
    assert not np.array_equal(
        jax.device_get(state.params)["layers"]["attention"]["wq_b"], after.params["layers"]["attention"]["wq_b"]
    )


def test_schedule_and_decay_mask(params):
    cfg = ts.OptimizerConfig(lr=1.0, total_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    sched = cfg.schedule()
    np.testing.assert_allclose([float(sched(s)) for s in (0, 5, 10, 60, 110)], [0, 0.5, 1.0, 0.55, 0.1], atol=1e-6)
    mask = ts.decay_mask(params)
    assert mask["norm"]["scale"] is False and mask["layers"]["attention_norm"]["scale"] is False
    assert mask["layers"]["ffn_norm"]["scale"] is False
    assert mask["layers"]["attention"]["wq"] is True and mask["tok_embeddings"]["embedding"] is True
    # AdamW with decay leaves a norm scale alone when its gradient is zero, and shrinks a matrix.
    opt = optax.adamw(0.1, weight_decay=0.5, mask=ts.decay_mask)
    small = {
        "norm": {"scale": np.ones(4, np.float32)},
        "layers": {
            "ffn_norm": {"scale": np.ones((2, 4), np.float32)},
            "feed_forward": {"w1": np.ones((2, 4, 8), np.float32)},
        },
    }
    updates, _ = jax.jit(opt.update)(jax.tree.map(np.zeros_like, small), opt.init(small), small)
    assert not np.any(updates["norm"]["scale"]) and not np.any(updates["layers"]["ffn_norm"]["scale"])
    np.testing.assert_allclose(updates["layers"]["feed_forward"]["w1"], -0.1 * 0.5)


def test_remat_gives_the_same_grads(packed, params):
    batch = batch_of(packed, 8)
    g, loss, _ = grads(params, batch)
    g_remat, loss_remat, _ = grads(params, batch, numerics=F32.replace(remat="dots"))
    np.testing.assert_allclose(float(loss_remat), float(loss), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_remat), jax.tree.leaves(g)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_bfloat16_first_moment():
    """OptimizerConfig.mu_dtype keeps AdamW's mu in bfloat16 (half its memory) and nu in float32, as optax does."""
    small = {"w": np.ones((4, 8), np.float32), "norm": {"scale": np.ones(4, np.float32)}}
    state = ts.make_optimizer(ts.OptimizerConfig(total_steps=10, mu_dtype="bfloat16", clip_norm=None)).init(small)
    adam = state[0]
    assert {x.dtype for x in jax.tree.leaves(adam.mu)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(adam.nu)} == {jnp.dtype(jnp.float32)}
    with pytest.raises(ValueError, match="mu_dtype"):
        ts.OptimizerConfig(mu_dtype="float16")
