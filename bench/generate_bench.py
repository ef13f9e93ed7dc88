"""Inference benchmark: this project against transformers (PyTorch, CPU) on the same random 125M Mistral.

  python bench/generate_bench.py [--quick] [--rounds N]

Prints, in one run:
  1. a whole batch job (32 prompts of 65-192 tokens, 64 new greedy tokens, batch 8) as whole processes,
     load and compile included: `python -m infer.generate` (cold compile cache, then warm) against a
     transformers script doing the same, in N rounds (default 3) of the three; tokens/s, each round's ratios
     and their median;
  2. decode tokens/s at batch 1, 8 and 32 for both, and batch-1 decode as a fraction of this machine's
     memory-bandwidth ceiling (weight + KV-cache bytes read per token over a measured read bandwidth);
  3. a floor under the whole job's time for any implementation on XLA:CPU's matmul kernels: the import, the
     prefill FLOPs of the real prompt tokens at this machine's large-matmul rate, and the job's decode steps
     timed as their weight products alone at batch 8; and the best whole-job ratio that floor allows.
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
HF_CONFIG = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=4, head_dim=64, sliding_window=256,
                 max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=False)
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


def run_process(cmd, env=None):
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})})
    if res.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{res.stderr[-3000:]}")
    return time.perf_counter() - t0, res.stdout


def whole_job(tmp, hf_dir, rounds):
    """The job `rounds` times over, each round running ours with an empty compilation cache (cold), ours again
    (warm), then transformers, back to back: this VM's speed drifts by tens of percent within minutes, so each
    ratio is taken within its round."""
    rng = np.random.default_rng(0)
    rows = [{"id": i, "prompt_ids": [1] + rng.integers(3, 32000, int(n) - 1).tolist()}
            for i, n in enumerate(rng.integers(65, 193, 32))]
    inp = os.path.join(tmp, "prompts.jsonl")
    with open(inp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    script = os.path.join(tmp, "hf_job.py")
    with open(script, "w") as f:
        f.write(HF_JOB)
    results = {"prompt_lengths": [len(r["prompt_ids"]) for r in rows], "rounds": []}
    for r in range(rounds):
        cache = os.path.join(tmp, f"xla-cache-{r}")
        one = {}
        for label in ("cold", "warm"):
            out = os.path.join(tmp, f"out-{r}-{label}.jsonl")
            secs, _ = run_process([sys.executable, "-m", "infer.generate", "--checkpoint", hf_dir, "--input", inp,
                                   "--output", out, "--max-new-tokens", str(NEW), "--batch-size", "8",
                                   "--ignore-eos"], env={"MISTRAL_JAX_CACHE": cache})
            one[label] = (sum(json.loads(x)["completion_tokens"] for x in open(out)), secs)
        secs, stdout = run_process([sys.executable, script, hf_dir, inp])
        one["transformers"] = (json.loads(stdout.strip().splitlines()[-1])["tokens"], secs)
        results["rounds"].append(one)
    return results


def read_bandwidth():
    """Bytes/s of a sum over a 1 GiB float32 array: the best of several runs of a jitted JAX reduction and of
    torch.sum (the faster of the two sets the ceiling). This machine's bandwidth drifts with its neighbours,
    so the benchmark measures it several times (before and after the decode timings) and keeps the best:
    the highest ceiling, the hardest fraction to reach."""
    import jax
    import jax.numpy as jnp
    import torch

    x = jnp.ones((2**28,), jnp.float32)
    f = jax.jit(lambda a: jnp.sum(a))
    f(x).block_until_ready()
    best = min(_timeit(lambda: f(x).block_until_ready()) for _ in range(5))
    t = torch.ones(2**28)
    best = min(best, min(_timeit(lambda: t.sum()) for _ in range(5)))
    return 2**30 / best


def _timeit(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def decode_rates(hf_dir, hf_model, batches, steps, bandwidths):
    import jax
    import jax.numpy as jnp
    import torch

    from mistral_jax import api, generate
    from mistral_jax.kv_cache import init_cache

    loaded = api.load_model(hf_dir)  # the layout the tools use (unrolled layers on the CPU)
    config, params = loaded.config, loaded.params
    rng = np.random.default_rng(1)
    ours, theirs = {}, {}
    for b in batches:
        prompts = rng.integers(3, 32000, (b, 128)).astype(np.int32)
        pre, dec = generate._compiled(config, 512)

        def state_after_prefill():
            cache = init_cache(config, b, config.sliding_window)
            logits, cache = pre(params, tokens=jnp.asarray(prompts), lengths=jnp.full((b,), 128, jnp.int32),
                                cache=cache)
            z = lambda v, d=jnp.int32: jnp.full((b,), v, d)  # noqa: E731
            return dict(cache=cache, logits=logits, out=jnp.zeros((b, steps), jnp.int32), n=z(0), pos=z(128),
                        done=z(False, bool), reason=z(0), seeds=z(0, jnp.uint32), temperature=z(0.0, jnp.float32),
                        top_k=z(0), top_p=z(1.0, jnp.float32), max_new=z(steps), stop_ids=jnp.full((b, 1), -1))

        # compile; sampled=False: the greedy-only program that a greedy job runs
        jax.block_until_ready(dec(params, state=state_after_prefill(), max_steps=jnp.int32(steps), sampled=False))
        times = []
        for _ in range(3):
            st = jax.block_until_ready(state_after_prefill())
            t0 = time.perf_counter()
            jax.block_until_ready(dec(params, state=st, max_steps=jnp.int32(steps), sampled=False))
            times.append(time.perf_counter() - t0)
        ours[b] = b * steps / min(times)
        if b == 1:
            bandwidths.append(read_bandwidth())

        ids = torch.tensor(prompts.astype(np.int64))
        with torch.no_grad():
            def hf(n):
                t0 = time.perf_counter()
                hf_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, pad_token_id=0)
                return time.perf_counter() - t0
            hf(2)
            t_full = min(hf(steps + 1) for _ in range(2))
            t_pre = min(hf(1) for _ in range(2))
        theirs[b] = b * steps / max(t_full - t_pre, 1e-9)
    return config, ours, theirs


def decode_matmul_step(hf_dir, batch, repeats=16):
    """Seconds of one decode step's weight products alone at `batch` rows, with XLA:CPU's kernels: x [batch, D]
    through every layer's wq, wk, wv, wo, w1, w3, w2 and the head, nothing else (no attention, norms or
    sampling). The best of the weight layouts (in-major, out-major, out-major with q/k/v and w1/w3 fused; see
    model._matmul and fuse_projections) each with Eigen and with XLA's default (YNNPACK)."""
    import jax
    import jax.numpy as jnp

    from mistral_jax import api
    from mistral_jax.generate import _CPU_IN_MAJOR_DECODE_OPTIONS
    from mistral_jax.model import _matmul

    def steps(x, params, out_major):
        def mm(x, w, n_in=1):
            return _matmul(x, w, n_in, out_major)

        def products(x):
            for lp in params["layers"]:
                a, f = lp["attention"], lp["feed_forward"]
                if "wqkv" in a:
                    qkv = mm(x, a["wqkv"])
                    n, h = a["wo"].shape[1:]  # out-major wo [D, N, H]
                    q = qkv[:, :n * h].reshape(-1, n, h) + qkv.sum()
                    gate, up = jnp.split(mm(x, f["w13"]), 2, axis=-1)
                else:
                    q = mm(x, a["wq"])
                    q = q + mm(x, a["wk"]).sum() + mm(x, a["wv"]).sum()
                    gate, up = mm(x, f["w1"]), mm(x, f["w3"])
                x = x + 1e-3 * mm(q, a["wo"], 2)
                x = x + 1e-3 * mm(gate * up, f["w2"])
            return x, mm(x, params["output"]["kernel"])

        def body(_, carry):
            x, acc = carry
            x, logits = products(x)
            return x + 1e-6 * logits[:, :1], acc + logits[:, 0].sum()
        return jax.lax.fori_loop(0, repeats, body, (x, jnp.float32(0)))

    best = float("inf")
    for out_major, fused in ((False, False), (True, False), (True, True)):
        loaded = api.load_model(hf_dir, out_major=out_major, fused=fused)
        x = jnp.ones((batch, loaded.config.dim), jnp.float32)
        for options in (_CPU_IN_MAJOR_DECODE_OPTIONS, None):
            f = jax.jit(lambda x, p: steps(x, p, out_major), compiler_options=options)
            jax.block_until_ready(f(x, loaded.params))
            best = min(best, min(_timeit(lambda: jax.block_until_ready(f(x, loaded.params)))
                                 for _ in range(3)) / repeats)
    return best


def prefill_flops(config, lengths):
    """FLOPs of prefilling prompts of these lengths with no padding, the head at each one's last position."""
    from train_bench import forward_flops

    return sum(forward_flops(config, n, head_tokens=1) for n in lengths)


def import_seconds():
    return min(run_process([sys.executable, "-c", "import jax, flax, mistral_jax.api"])[0] for _ in range(2))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="skip the batch-32 decode")
    ap.add_argument("--decode-only", action="store_true", help="skip the whole batch job (part 1)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the whole batch job (part 1)")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {args.rounds}")
    import torch

    torch.set_num_threads(os.cpu_count())
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = os.path.join(tmp, "hf")
        hf_model = make_model(hf_dir)
        job = None if args.decode_only else whole_job(tmp, hf_dir, args.rounds)
        batches = [1, 8] if args.quick else [1, 8, 32]
        bandwidths = [read_bandwidth()]
        config, ours, theirs = decode_rates(hf_dir, hf_model, batches, NEW, bandwidths)
        bandwidths.append(read_bandwidth())
        bw = max(bandwidths)
        if job:
            from train_bench import matmul_flops_per_s

            step8 = decode_matmul_step(hf_dir, 8)
            peak = matmul_flops_per_s()
            t_import = import_seconds()

    print(f"machine: {os.cpu_count()} CPU cores; torch {torch.__version__}")
    print("\n1. whole batch job: 32 prompts of 65-192 tokens, 64 new greedy tokens, batch 8 (whole processes; "
          "per round: mistral-jax with an empty compile cache, again with it warm, then transformers)")
    ratios = {"cold": [], "warm": []}
    for r, one in enumerate(job["rounds"] if job else ()):
        hf_rate = one["transformers"][0] / one["transformers"][1]
        for label in ("cold", "warm", "transformers"):
            n, s = one[label]
            name = {"cold": "mistral-jax, cold compile cache", "warm": "mistral-jax, warm compile cache"}.get(
                label, label)
            ratio = n / s / hf_rate
            if label in ratios:
                ratios[label].append(ratio)
            print(f"   round {r + 1}  {name:33s} {n} tokens in {s:6.1f}s = {n / s:6.1f} tok/s   ratio {ratio:4.2f}x")
    if job:
        print("   median ratio over the rounds: " + ", ".join(
            f"{label} {float(np.median(v)):.2f}x (range {min(v):.2f}-{max(v):.2f}x)" for label, v in ratios.items()))

    print("\n2. decode tokens/s (prompt 128, 64 greedy steps, compile excluded)")
    for b in batches:
        print(f"   batch {b:2d}: mistral-jax {ours[b]:7.1f}   transformers {theirs[b]:7.1f}   ratio {ours[b] / theirs[b]:4.2f}x")
    # Bytes read per batch-1 decode step: every weight but the embedding table (one row is gathered), and
    # the KV cache (window slots, keys and values, every layer).
    weight_bytes = (config.num_params - config.vocab_size * config.dim) * 4
    kv_bytes = 2 * config.n_layers * config.sliding_window * config.n_kv_heads * config.head_dim * 4
    ceiling = bw / (weight_bytes + kv_bytes)
    print(f"\n   read bandwidth (1 GiB sum, best of JAX and torch; measured {len(bandwidths)} times: "
          f"{', '.join(f'{x / 1e9:.1f}' for x in bandwidths)} GB/s): {bw / 1e9:.1f} GB/s; bytes per batch-1 token: "
          f"{(weight_bytes + kv_bytes) / 1e6:.0f} MB; ceiling {ceiling:.1f} tok/s")
    print(f"   batch-1 decode: {ours[1]:.1f} tok/s = {100 * ours[1] / ceiling:.0f}% of the bandwidth ceiling")

    if job:
        # What bounds the whole-job ratio: a floor under any implementation built on XLA:CPU's matmul kernels.
        lengths = job["prompt_lengths"]
        n_batches = -(-len(lengths) // 8)
        t_dec = n_batches * NEW * step8
        t_pre = prefill_flops(config, lengths) / peak
        t_hf = float(np.median([one["transformers"][1] for one in job["rounds"]]))
        floor = t_import + t_pre + t_dec
        print("\n3. a floor under the whole job (same machine, same run)")
        print(f"   python + jax import: {t_import:.1f}s")
        print(f"   prefill of the {sum(lengths)} prompt tokens, no padding, at the 4096^3 matmul rate "
              f"({peak / 1e9:.0f} GFLOP/s): {t_pre:.1f}s")
        print(f"   decode: {n_batches} batches x {NEW} steps x {step8 * 1e3:.1f} ms, the weight products alone of one "
              f"batch-8 step with XLA:CPU's kernels: {t_dec:.1f}s (ours, whole steps: "
              f"{n_batches * NEW * 8 / ours[8]:.1f}s)")
        print(f"   floor {floor:.1f}s, no load or compile counted: at most {t_hf / floor:.2f}x transformers' "
              f"{t_hf:.1f}s (its median job)")


if __name__ == "__main__":
    main()
