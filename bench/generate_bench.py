"""Inference benchmark: this project against its own earlier code and transformers (PyTorch, CPU), on the same
random 125M Mistral, in one run.

  python bench/generate_bench.py [--quick] [--rounds N] [--b1-rounds M] [--baseline REV] [--decode-only] [--tuning]

Prints:
  1. a whole batch job (32 prompts of 65-192 tokens, 64 new greedy tokens, batch 8) as whole processes, load
     and compile included: `python -m infer.generate` of this tree with an empty compile cache (cold) and
     again warm, the same command of git revision REV (default 1111997, the code before the one-model-one-layout
     change) cold, and a transformers script doing the same job, in N interleaved rounds (default 3); each
     round's tokens/s and ratios and their medians. The machine's speed drifts, so ratios are taken in a round;
  2. decode tokens/s at batch 1, 8 and 32 for this tree and transformers, and batch-1 decode as a fraction of
     this machine's memory-bandwidth ceiling (weight + KV-cache bytes read per token over the read bandwidth
     measured just before and after it), in M rounds (default 5): each round's fraction and their median;
  3. with --tuning: decode tokens/s at batch 1 and 8 and prefill tokens/s at batch 8 for the plain stacked
     params and each platform tuning of mistral_jax/tuning.py alone and together (the default), in N rounds.
Config: dim 768, 12 layers, 12 heads, 4 KV heads, head_dim 64, ffn 2048, vocab 32000, window 256, f32.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE = "1111997"
HF_CONFIG = dict(
    vocab_size=32000,
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=4,
    head_dim=64,
    sliding_window=256,
    max_position_embeddings=4096,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)
NEW = 64

HF_JOB = r"""
import json, sys, time, torch
t0 = time.perf_counter()
from transformers import MistralForCausalLM
model = MistralForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.float32).eval()
rows = [json.loads(x) for x in open(sys.argv[2])]
n_tok = 0
for s in range(0, len(rows), 8):
    batch = [r["prompt_ids"] for r in rows[s:s + 8]]
    width = max(map(len, batch))
    ids = torch.tensor([[0] * (width - len(b)) + b for b in batch])
    mask = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=64, min_new_tokens=64,
                             do_sample=False, pad_token_id=0)
    n_tok += (out.shape[1] - width) * len(batch)
print(json.dumps({"tokens": n_tok, "seconds": time.perf_counter() - t0}))
"""


def make_model(path):
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**HF_CONFIG)).float().eval()
    model.save_pretrained(path)
    return model


def run_process(cmd, env=None, cwd=ROOT):
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env={**os.environ, **(env or {})})
    if res.returncode:
        sys.exit(f"failed: {' '.join(cmd)} (in {cwd})\n{res.stderr[-3000:]}")
    return time.perf_counter() - t0, res.stdout


def baseline_tree(tmp, rev):
    """A checkout of `rev` in tmp: its `python -m infer.generate` runs from there (cwd first on sys.path)."""
    path = os.path.join(tmp, "baseline")
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", path, rev], check=True, capture_output=True)
    return path


def whole_job(tmp, hf_dir, rounds, baseline):
    """The job `rounds` times over; each round runs ours cold (empty compilation cache), ours warm, the
    baseline revision cold, then transformers, back to back."""
    rng = np.random.default_rng(0)
    rows = [
        {"id": i, "prompt_ids": [1] + rng.integers(3, 32000, int(n) - 1).tolist()}
        for i, n in enumerate(rng.integers(65, 193, 32))
    ]
    inp = os.path.join(tmp, "prompts.jsonl")
    with open(inp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    script = os.path.join(tmp, "hf_job.py")
    with open(script, "w") as f:
        f.write(HF_JOB)
    results = {"prompt_lengths": [len(r["prompt_ids"]) for r in rows], "rounds": []}
    runs = [("cold", ROOT, "new"), ("warm", ROOT, "new")] + ([("baseline", baseline, "old")] if baseline else [])
    for r in range(rounds):
        one = {}
        for label, cwd, cache_name in runs:
            cache = os.path.join(tmp, f"xla-cache-{r}-{cache_name}")
            out = os.path.join(tmp, f"out-{r}-{label}.jsonl")
            secs, _ = run_process(
                [
                    sys.executable,
                    "-m",
                    "infer.generate",
                    "--checkpoint",
                    hf_dir,
                    "--input",
                    inp,
                    "--output",
                    out,
                    "--max-new-tokens",
                    str(NEW),
                    "--batch-size",
                    "8",
                    "--ignore-eos",
                ],
                env={"MISTRAL_JAX_CACHE": cache},
                cwd=cwd,
            )
            one[label] = (sum(json.loads(x)["completion_tokens"] for x in open(out)), secs)
        secs, stdout = run_process([sys.executable, script, hf_dir, inp])
        one["transformers"] = (json.loads(stdout.strip().splitlines()[-1])["tokens"], secs)
        results["rounds"].append(one)
    return results


def bandwidth_probe():
    """A function returning bytes/s of a sum over a 1 GiB float32 array: the best of several runs of a jitted
    JAX reduction and of torch.sum (the faster of the two sets the ceiling). The arrays are made once, so a
    measure takes a fraction of a second and can sit right beside the decode it is compared with."""
    import jax
    import jax.numpy as jnp
    import torch

    x = jnp.ones((2**28,), jnp.float32)
    f = jax.jit(lambda a: jnp.sum(a))
    f(x).block_until_ready()
    t = torch.ones(2**28)

    def read():
        best = min(_timeit(lambda: f(x).block_until_ready()) for _ in range(5))
        best = min(best, min(_timeit(lambda: t.sum()) for _ in range(5)))
        return 2**30 / best

    return read


def matvec_probe():
    """A function returning bytes/s that XLA's matrix-vector product reads: a [32000, 768] float32 matrix (the
    125M model's output head, out-major as the CPU tuning lays it) times one vector, the best of 5. Beside the
    ceiling it splits the batch-1 gap into the kernel's read rate and the rest of the step."""
    import jax
    import jax.numpy as jnp

    w = jax.random.normal(jax.random.key(0), (32000, 768), jnp.float32)
    x = jnp.ones((1, 768), jnp.float32)
    f = jax.jit(lambda x, w: jnp.einsum("BD,VD->BV", x, w))
    f(x, w).block_until_ready()
    return lambda: w.nbytes / min(_timeit(lambda: f(x, w).block_until_ready()) for _ in range(5))


def _timeit(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _programs(config, numerics, steps):
    """(prefill, decode, state): jitted prefill and greedy decode, and state(params, prompts) -> the decode
    state after prefilling `prompts` [B, T]."""
    import jax
    import jax.numpy as jnp

    from mistral_jax import decode

    pre = jax.jit(lambda p, t, n, c: decode.prefill(p, t, n, c, config=config, numerics=numerics, chunk=512))
    dec = jax.jit(
        lambda p, st, m: decode.decode(p, st, m, config=config, numerics=numerics, sampled=False), donate_argnums=1
    )

    def state(params, prompts):
        b, t = prompts.shape
        cache = decode.KVCache.init(config, b, config.sliding_window)
        logits, cache = pre(params, jnp.asarray(prompts), jnp.full((b,), t, jnp.int32), cache)
        return decode.DecodeState.greedy(cache, logits, t, steps, steps)

    return pre, dec, state


def decode_rates(hf_dir, hf_model, batches, steps, b1_rounds):
    """(config, ours, theirs, pairs): decode tokens/s per batch size for this tree and transformers, and for
    batch 1 `b1_rounds` (tokens/s, bandwidth, matvec) triples: a timed decode (best of 3), the read bandwidth
    measured just before and just after it (the higher of the two), then matvec_probe's rate. The machine's
    bandwidth moves within seconds, so a decode is only compared with the bandwidth of its own moment."""
    import jax
    import jax.numpy as jnp
    import torch

    from mistral_jax import api

    loaded = api.load_model(hf_dir)  # as the tools load it (tuning.for_inference included)
    config, params = loaded.config, loaded.params
    _, dec, state = _programs(config, loaded.numerics, steps)
    read_bandwidth, read_matvec = bandwidth_probe(), matvec_probe()
    rng = np.random.default_rng(1)
    ours, theirs, pairs = {}, {}, []
    for b in batches:
        prompts = rng.integers(3, 32000, (b, 128)).astype(np.int32)
        jax.block_until_ready(dec(params, state(params, prompts), jnp.int32(steps)))  # compile

        def rate(prompts=prompts, b=b):
            times = []
            for _ in range(3):
                st = jax.block_until_ready(state(params, prompts))
                t0 = time.perf_counter()
                jax.block_until_ready(dec(params, st, jnp.int32(steps)))
                times.append(time.perf_counter() - t0)
            return b * steps / min(times)

        if b == 1:
            for _ in range(b1_rounds):
                before = read_bandwidth()
                r = rate()
                pairs.append((r, max(before, read_bandwidth()), read_matvec()))
            ours[b] = max(p[0] for p in pairs)
        else:
            ours[b] = rate()

        ids = torch.tensor(prompts.astype(np.int64))
        with torch.no_grad():

            def hf(n, ids=ids):
                t0 = time.perf_counter()
                hf_model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    pad_token_id=0,
                )
                return time.perf_counter() - t0

            hf(2)
            t_full = min(hf(steps + 1) for _ in range(2))
            t_pre = min(hf(1) for _ in range(2))
        theirs[b] = b * steps / max(t_full - t_pre, 1e-9)
    return config, ours, theirs, pairs


def tuning_rates(hf_dir, steps, rounds):
    """Each subset of tuning.TUNINGS against the plain stacked params, in interleaved rounds: decode tokens/s
    at batch 1 and 8 (prompt 128) and prefill tokens/s at batch 8 x 128, the best of the rounds. Every variant
    must decode the same tokens."""
    import jax
    import jax.numpy as jnp

    from mistral_jax import checkpoint, decode, sharding, tuning
    from mistral_jax.config import Numerics

    config, numerics = checkpoint.load_config(hf_dir), Numerics.of("float32")
    mesh = sharding.ModelMesh.build(config)
    subsets = {"plain": (), **{t: (t,) for t in tuning.TUNINGS}, "all (the default)": tuning.TUNINGS}
    variants = {
        name: tuning.for_inference(checkpoint.load_params(hf_dir, config, "float32", mesh.param_shardings), mesh, t)
        for name, t in subsets.items()
    }
    pre, dec, state = _programs(config, numerics, steps)
    rng = np.random.default_rng(2)
    rates = {}
    for b in (1, 8):
        prompts = jnp.asarray(rng.integers(3, 32000, (b, 128)).astype(np.int32))
        lengths = jnp.full((b,), 128, jnp.int32)
        tokens = {n: np.asarray(dec(p, state(p, prompts), jnp.int32(steps)).out) for n, p in variants.items()}
        for n in variants:  # compiled above; the same greedy tokens, or the tuning is wrong
            if not (tokens[n] == tokens["plain"]).all():
                sys.exit(f"tuning {n!r} decodes other tokens than the plain params")
        for _ in range(rounds):
            for n, p in variants.items():
                st = jax.block_until_ready(state(p, prompts))
                secs = _timeit(lambda: dec(p, st, jnp.int32(steps)).n.block_until_ready())  # noqa: B023
                rates.setdefault((n, f"decode b{b}"), []).append(b * steps / secs)
                if b == 8:
                    cache = decode.KVCache.init(config, b, config.sliding_window)
                    rates.setdefault((n, "prefill b8"), []).append(
                        b * 128 / _timeit(lambda: jax.block_until_ready(pre(p, prompts, lengths, cache)))  # noqa: B023
                    )
    return {k: max(v) for k, v in rates.items()}, list(variants)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="skip the batch-32 decode")
    ap.add_argument("--decode-only", action="store_true", help="skip the whole batch job (part 1)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the whole batch job (part 1)")
    ap.add_argument("--b1-rounds", type=int, default=5, help="batch-1 decodes, each beside its bandwidth measure")
    ap.add_argument("--tuning", action="store_true", help="also part 3: each platform tuning against the plain path")
    ap.add_argument("--baseline", default=BASELINE, help="git revision whose batch job runs beside ours ('' = none)")
    args = ap.parse_args()
    if args.rounds < 1 or args.b1_rounds < 1:
        ap.error(f"--rounds and --b1-rounds must be at least 1, got {args.rounds} and {args.b1_rounds}")
    import torch

    torch.set_num_threads(os.cpu_count())
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = os.path.join(tmp, "hf")
        hf_model = make_model(hf_dir)
        baseline = baseline_tree(tmp, args.baseline) if args.baseline and not args.decode_only else None
        try:
            job = None if args.decode_only else whole_job(tmp, hf_dir, args.rounds, baseline)
        finally:
            if baseline:
                subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", baseline], capture_output=True)
        batches = [1, 8] if args.quick else [1, 8, 32]
        config, ours, theirs, pairs = decode_rates(hf_dir, hf_model, batches, NEW, args.b1_rounds)
        tuned = tuning_rates(hf_dir, NEW, args.rounds) if args.tuning else None

    print(f"machine: {os.cpu_count()} CPU cores; torch {torch.__version__}")
    if job:
        print(
            "\n1. whole batch job: 32 prompts of 65-192 tokens, 64 new greedy tokens, batch 8 (whole processes; per "
            f"round: this tree cold, warm, revision {args.baseline} cold, then transformers)"
        )
    names = {
        "cold": "mistral-jax, cold compile cache",
        "warm": "mistral-jax, warm compile cache",
        "baseline": f"revision {args.baseline}, cold",
        "transformers": "transformers",
    }
    ratios = {"cold": [], "warm": [], "baseline": [], "cold / baseline": []}
    for r, one in enumerate(job["rounds"] if job else ()):
        hf_rate = one["transformers"][0] / one["transformers"][1]
        for label in names:
            if label not in one:
                continue
            n, s = one[label]
            ratio = n / s / hf_rate
            if label in ratios:
                ratios[label].append(ratio)
            print(
                f"   round {r + 1}  {names[label]:33s} {n} tokens in {s:6.1f}s = {n / s:6.1f} tok/s   "
                f"vs transformers {ratio:4.2f}x"
            )
        if "baseline" in one:
            ratios["cold / baseline"].append(one["baseline"][1] / one["cold"][1])
    if job:
        print(
            "   medians over the rounds: "
            + ", ".join(
                f"{label} {float(np.median(v)):.2f}x (range {min(v):.2f}-{max(v):.2f}x)"
                for label, v in ratios.items()
                if v
            )
        )

    print("\n2. decode tokens/s (prompt 128, 64 greedy steps, compile excluded)")
    for b in batches:
        print(
            f"   batch {b:2d}: mistral-jax {ours[b]:7.1f}   transformers {theirs[b]:7.1f}   "
            f"ratio {ours[b] / theirs[b]:4.2f}x"
        )
    # Bytes read per batch-1 decode step: every weight but the embedding table (one row is gathered), and
    # the KV cache (window slots, keys and values, every layer).
    weight_bytes = (config.num_params - config.vocab_size * config.dim) * 4
    kv_bytes = 2 * config.n_layers * config.sliding_window * config.n_kv_heads * config.head_dim * 4
    step_bytes = weight_bytes + kv_bytes
    print(
        f"\n   batch-1 decode against the bandwidth ceiling ({step_bytes / 1e6:.0f} MB read per token; read bandwidth "
        "= 1 GiB sum, best of JAX and torch, the higher of the measures just before and just after the decode):"
    )
    fractions = []
    for r, (rate, bw, mv) in enumerate(pairs):
        fractions.append(rate * step_bytes / bw)
        print(
            f"   round {r + 1}: {rate:6.1f} tok/s, bandwidth {bw / 1e9:5.1f} GB/s, ceiling {bw / step_bytes:6.1f} "
            f"tok/s: {100 * fractions[-1]:.0f}%   (decode reads {rate * step_bytes / 1e9:4.1f} GB/s; XLA's "
            f"matrix-vector product {mv / 1e9:4.1f} GB/s, {100 * mv / bw:.0f}% of the bandwidth)"
        )
    top = max(p[1] for p in pairs)
    print(
        f"   batch-1 decode: median {100 * float(np.median(fractions)):.0f}% of the bandwidth ceiling of its moment "
        f"(range {100 * min(fractions):.0f}-{100 * max(fractions):.0f}%); its best rate against the run's highest "
        f"bandwidth ({top / 1e9:.1f} GB/s): {100 * ours[1] * step_bytes / top:.0f}%"
    )
    if tuned:
        rates, names = tuned
        print(
            f"\n3. platform tunings (mistral_jax/tuning.py) on one CPU device, best of {args.rounds} interleaved "
            "rounds, tokens/s (ratio to the plain stacked params)"
        )
        for n in names:
            print(
                f"   {n:18s} "
                + "   ".join(
                    f"{m} {rates[(n, m)]:7.1f} ({rates[(n, m)] / rates[('plain', m)]:4.2f}x)"
                    for m in ("decode b1", "decode b8", "prefill b8")
                )
            )


if __name__ == "__main__":
    main()
