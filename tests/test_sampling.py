"""sampling.py: greedy, temperature, top-k, top-p against numpy oracles, per-row seeding, one compilation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from mistral_jax.sampling import PREFIX, _filter, _thresholds, greedy, sample

sample_jit = jax.jit(sample)
B, V = 32, 400  # one shape for most tests: each new shape is a ~2 s CPU compilation


def settings(b, temperature=1.0, top_k=0, top_p=1.0, seed=0):
    def full(x, dt):
        return np.broadcast_to(np.asarray(x, dt), (b,)).copy()

    return (full(seed, np.uint32), full(temperature, np.float32), full(top_k, np.int32), full(top_p, np.float32))


def run(logits, seeds, steps, temperature, top_k, top_p):
    b = logits.shape[0]
    steps = np.broadcast_to(np.asarray(steps, np.int32), (b,))
    return np.asarray(
        sample_jit(
            jnp.asarray(logits, jnp.float32),
            jnp.asarray(seeds),
            jnp.asarray(steps),
            jnp.asarray(temperature),
            jnp.asarray(top_k),
            jnp.asarray(top_p),
        )
    )


def np_topk_set(row, k):
    """Tokens with logit >= the k-th largest (ties at the k-th value kept)."""
    kth = np.sort(row)[::-1][k - 1]
    return set(np.flatnonzero(row >= kth).tolist())


def np_nucleus(row, p, slack=1e-5):
    """Most likely tokens until their mass reaches p (float64), at least the top one; `slack` widens p a hair
    so that float32 cumsum rounding at the boundary cannot make the oracle stricter than the sampler."""
    x = row.astype(np.float64)
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    kept, mass = [], 0.0
    for i in order:
        kept.append(int(i))
        mass += probs[i]
        if mass >= p + slack:
            break
    # tokens tied with the last kept one are kept too
    return set(np.flatnonzero(x >= x[kept[-1]]).tolist())


def pad_vocab(logits):
    """Small-vocabulary logits [n, v] -> [n, V], the extra tokens at -inf (probability 0)."""
    out = np.full((logits.shape[0], V), -np.inf, np.float32)
    out[:, : logits.shape[1]] = logits
    return out


def test_greedy_is_argmax_first_on_ties():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((B, V)).astype(np.float32)
    logits[0, [3, 17, 40]] = 10.0  # tie: the first index wins
    logits[1, :] = 0.0  # all tied -> 0
    seeds, temp, k, p = settings(B, temperature=0.0, top_k=5, top_p=0.5)
    for step in (0, 7):
        out = run(logits, seeds, step, temp, k, p)
        np.testing.assert_array_equal(out, np.argmax(logits, axis=-1))
    assert out[0] == 3 and out[1] == 0
    assert out.dtype == np.int32
    # the greedy-only decode program's sampler (generate.decode with sampled=False)
    np.testing.assert_array_equal(np.asarray(greedy(jnp.asarray(logits))), out)


def test_tiny_temperature_equals_greedy():
    rng = np.random.default_rng(1)
    b, v = B, V
    # distinct values 0.015 apart: /1e-4 -> gaps of 150 nats, far beyond any Gumbel noise
    logits = np.stack([rng.permutation(np.linspace(-3, 3, v)) for _ in range(b)]).astype(np.float32)
    seeds, temp, k, p = settings(b, temperature=1e-4)
    seeds = np.arange(b, dtype=np.uint32)
    for step in range(5):
        np.testing.assert_array_equal(run(logits, seeds, step, temp, k, p), np.argmax(logits, axis=-1))


def test_top_k_stays_in_the_k_most_likely():
    rng = np.random.default_rng(2)
    b, v = B, V
    logits = (rng.standard_normal((b, v)) * 2).astype(np.float32)
    logits[0, :] = np.round(logits[0, :])  # many ties, including at the k-th value
    seeds = rng.integers(0, 2**31, b).astype(np.uint32)
    _, temp, _, p = settings(b, temperature=1.5)
    k = rng.integers(1, 12, b).astype(np.int32)
    allowed = [np_topk_set(logits[i], k[i]) for i in range(b)]
    seen = [set() for _ in range(b)]
    for step in range(60):
        out = run(logits, seeds, step, temp, k, p)
        for i in range(b):
            assert out[i] in allowed[i], (i, k[i], out[i])
            seen[i].add(int(out[i]))
    # it does sample (not just the argmax): rows with k >= 3 see several tokens over 60 steps
    assert sum(len(s) > 1 for s, kk in zip(seen, k) if kk >= 3) >= sum(k >= 3) - 1
    # k = 1 is greedy
    k1 = np.ones(b, np.int32)
    np.testing.assert_array_equal(run(logits, seeds, 3, temp, k1, p)[1:], np.argmax(logits, -1)[1:])


def test_top_p_stays_in_the_nucleus():
    rng = np.random.default_rng(3)
    b, v = B, V
    logits = (rng.standard_normal((b, v)) * 3).astype(np.float32)
    seeds = rng.integers(0, 2**31, b).astype(np.uint32)
    temp = rng.choice([0.7, 1.0, 1.3], b).astype(np.float32)
    top_p = rng.uniform(0.05, 0.95, b).astype(np.float32)
    top_k = np.zeros(b, np.int32)
    top_k[:8] = rng.integers(2, 30, 8)  # top-p applied after top-k on some rows
    allowed = []
    for i in range(b):
        row = logits[i].astype(np.float64) / temp[i]
        if top_k[i]:
            row = np.where(row >= np.sort(row)[::-1][top_k[i] - 1], row, -np.inf)
        allowed.append(np_nucleus(row, top_p[i]))
    for step in range(60):
        out = run(logits, seeds, step, temp, top_k, top_p)
        for i in range(b):
            assert out[i] in allowed[i], (i, top_p[i], out[i])
    # p tiny or 0 -> only the top token
    for p in (1e-6, 0.0):
        tiny = np.full(b, p, np.float32)
        np.testing.assert_array_equal(run(logits, seeds, 0, temp, top_k, tiny), np.argmax(logits, -1))


def np_filter_set(row, k, p, slack):
    """Oracle kept set of top-k then top-p on one row of (already temperature-scaled) logits."""
    row = row.astype(np.float64)
    if 0 < k < row.size:
        row = np.where(row >= np.sort(row)[::-1][k - 1], row, -np.inf)
    if p >= 1.0:
        return set(np.flatnonzero(np.isfinite(row)).tolist())
    return np_nucleus(row, p, slack)


def test_filter_matches_oracle_on_both_paths():
    """Kept sets equal the numpy oracle (up to float rounding exactly at the p boundary), whether the cut is
    found among the PREFIX largest logits or needs the full sort, and a row's mask does not depend on which
    path its batch took."""
    assert V > PREFIX  # otherwise only the full sort is exercised
    rng = np.random.default_rng(8)
    scale = rng.choice([0.2, 1.0, 4.0], B)[:, None]  # flat rows have nuclei of hundreds of tokens
    logits = (rng.standard_normal((B, V)) * scale).astype(np.float32)
    logits[0] = np.round(logits[0] * 4)  # ties
    top_k = rng.choice([0, 1, 7, 40, 250, 300, 399, 400, 1000], B).astype(np.int32)
    top_p = rng.choice([1.0, 0.0, 0.3, 0.9, 0.99], B).astype(np.float32)
    active = np.ones(B, bool)
    filt = jax.jit(_filter)

    def kept(lg, k, p):
        out = np.asarray(filt(jnp.asarray(lg), jnp.asarray(k), jnp.asarray(p), jnp.asarray(active)))
        finite = np.isfinite(out)
        np.testing.assert_array_equal(out[finite], lg[finite])  # kept logits untouched
        return finite

    mask = kept(logits, top_k, top_p)
    desc = -np.sort(-logits)[:, :PREFIX]
    ok = np.asarray(jax.jit(_thresholds)(*map(jnp.asarray, (logits, desc, top_k, top_p)))[1])
    assert not ok.all() and ok.any()  # this batch needs the full sort; some rows alone would not
    for i in range(B):
        mine = set(np.flatnonzero(mask[i]).tolist())
        lo = np_filter_set(logits[i], top_k[i], top_p[i], -1e-5)
        hi = np_filter_set(logits[i], top_k[i], top_p[i], 1e-5)
        assert lo <= mine <= hi, (i, top_k[i], top_p[i], len(lo), len(mine), len(hi))

    # rows that fit the prefix, alone in a batch (tiled): the fast path, same masks
    fits = np.flatnonzero(ok)
    tiled = np.resize(fits, B)
    np.testing.assert_array_equal(kept(logits[tiled], top_k[tiled], top_p[tiled]), mask[tiled])


def test_top_p_exact_nucleus_edges():
    # probabilities 0.5, 0.25, 0.125, 0.125 (exact in float32)
    logits = pad_vocab(np.log(np.array([[0.5, 0.25, 0.125, 0.125]] * B, np.float32)))
    seeds = np.arange(B, dtype=np.uint32)
    temp = np.ones(B, np.float32)
    k = np.zeros(B, np.int32)
    # 0.76: the 0.125 tie keeps both. At exactly 0.5 / 0.75 the mass reaches p (these sums are exact in
    # float32), so the next token is out, as in transformers (removed where the ascending cumsum <= 1 - p).
    cases = {
        0.0: {0},
        0.49: {0},
        0.5: {0},
        0.51: {0, 1},
        0.74: {0, 1},
        0.75: {0, 1},
        0.76: {0, 1, 2, 3},
        1.0: {0, 1, 2, 3},
    }
    for p, nucleus in cases.items():
        seen = set()
        for step in range(25):
            seen |= set(run(logits, seeds, step, temp, k, np.full(B, p, np.float32)).tolist())
        assert seen == nucleus, (p, seen)


@pytest.mark.parametrize(
    "setting",
    [dict(seed=1234, temperature=0.9, top_k=50, top_p=0.9), dict(seed=99, temperature=1.0, top_k=0, top_p=1.0)],
)
def test_seed_reproducible_across_batch_size_and_position(setting):
    rng = np.random.default_rng(4)
    v = V
    row = (rng.standard_normal(v) * 2).astype(np.float32)

    def batch(b, at):
        logits = (rng.standard_normal((b, v)) * 2).astype(np.float32)
        seeds = rng.integers(0, 2**31, b).astype(np.uint32)
        temp = rng.choice([0.0, 0.5, 1.0], b).astype(np.float32)
        k = rng.choice([0, 5, 100], b).astype(np.int32)
        p = rng.choice([1.0, 0.5, 0.95], b).astype(np.float32)
        logits[at] = row
        seeds[at], temp[at], k[at], p[at] = (
            setting["seed"],
            setting["temperature"],
            setting["top_k"],
            setting["top_p"],
        )
        return logits, seeds, temp, k, p

    results = []
    for b, at in [(1, 0), (5, 3), (B, 0), (B, 17), (B, 31)]:
        logits, seeds, temp, k, p = batch(b, at)
        toks = []
        for step in range(21):
            steps = rng.integers(0, 1000, b).astype(np.int32)  # other rows are at other steps
            steps[at] = step
            toks.append(run(logits, seeds, steps, temp, k, p)[at])
        results.append(toks)
    for r in results[1:]:
        assert r == results[0]
    assert len(set(results[0])) > 1  # the step changes the draw
    # and a different seed gives a different sequence
    logits, seeds, temp, k, p = batch(1, 0)
    other = [run(logits, seeds + 1, s, temp, k, p)[0] for s in range(21)]
    assert other != results[0]


def test_temperature_one_matches_softmax():
    v, steps = 8, 125  # B * steps = 4000 draws per temperature
    logits = np.array([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 0.3, 1.5], np.float32)
    seeds = np.arange(B, dtype=np.uint32) * 7919 + 11  # fixed: the test is deterministic
    _, _, k, p = settings(B)
    padded = pad_vocab(np.tile(logits, (B, 1)))
    for t in (1.0, 2.0):  # 2 flattens: softmax(logits / 2)
        draws = np.concatenate([run(padded, seeds, s, np.full(B, t, np.float32), k, p) for s in range(steps)])
        assert draws.max() < v
        probs = np.exp(logits.astype(np.float64) / t)
        probs /= probs.sum()
        counts = np.bincount(draws, minlength=v)
        expected = probs * draws.size
        chi2 = np.sum((counts - expected) ** 2 / expected)
        assert chi2 < 30.0, (t, chi2, counts, expected)  # 7 dof: P(chi2 > 30) ~ 1e-4 for a correct sampler


def test_mixed_batch_greedy_rows_stay_argmax():
    rng = np.random.default_rng(5)
    b, v = B, V
    logits = rng.standard_normal((b, v)).astype(np.float32)
    temp = np.where(np.arange(b) % 2 == 0, 0.0, 1.0).astype(np.float32)
    k = np.where(np.arange(b) % 3 == 0, 10, 0).astype(np.int32)
    p = np.where(np.arange(b) % 4 == 1, 0.8, 1.0).astype(np.float32)
    seeds = np.arange(b, dtype=np.uint32)
    greedy = np.argmax(logits, -1)
    sampled_differs = 0
    for step in range(20):
        out = run(logits, seeds, step, temp, k, p)
        np.testing.assert_array_equal(out[temp == 0], greedy[temp == 0])
        sampled_differs += np.sum(out[temp > 0] != greedy[temp > 0])
        assert np.all((out >= 0) & (out < v))
    assert sampled_differs > 0


def test_one_compilation_for_all_settings():
    traces = []

    def traced(*args):
        traces.append(1)  # Python side effect: runs once per trace
        return sample(*args)

    fn = jax.jit(traced)
    rng = np.random.default_rng(6)
    b, v = 4, 64
    logits = jnp.asarray(rng.standard_normal((b, v)), jnp.float32)
    steps = jnp.zeros(b, jnp.int32)
    for temp, k, p in [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 5, 1.0), (1.0, 0, 0.9), (0.5, 3, 0.5)]:
        seeds, t, kk, pp = settings(b, temperature=temp, top_k=k, top_p=p)
        t[0] = 0.0  # mixed rows too
        out = fn(logits, jnp.asarray(seeds), steps, jnp.asarray(t), jnp.asarray(kk), jnp.asarray(pp))
        assert out.shape == (b,) and out.dtype == jnp.int32
    assert len(traces) == 1
    assert fn._cache_size() == 1


def test_inside_while_loop():
    rng = np.random.default_rng(7)
    b, v, n = B, V, 10  # B, V: `run` below reuses its compilation
    logits = jnp.asarray(rng.standard_normal((b, v)), jnp.float32)
    seeds = np.arange(b, dtype=np.uint32) + 5
    temp = jnp.asarray(np.resize([0.0, 1.0, 0.8], b), jnp.float32)
    k = jnp.asarray(np.resize([0, 0, 20], b), jnp.int32)
    p = jnp.asarray(np.resize([1.0, 0.9, 1.0], b), jnp.float32)

    @jax.jit
    def generate():
        def body(carry):
            i, out = carry
            # int32 seeds here, uint32 in `run` below: the same keys
            tok = sample(logits, jnp.asarray(seeds, jnp.int32), jnp.full((b,), i, jnp.int32), temp, k, p)
            return i + 1, out.at[:, i].set(tok)

        return lax.while_loop(lambda c: c[0] < n, body, (0, jnp.zeros((b, n), jnp.int32)))[1]

    looped = np.asarray(generate())
    for i in range(n):
        np.testing.assert_array_equal(looped[:, i], run(logits, seeds, i, temp, k, p))
