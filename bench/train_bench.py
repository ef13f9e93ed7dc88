"""Training benchmark: this project against transformers (PyTorch, CPU) on the same 125M Mistral, in one run.

  python bench/train_bench.py [--batch 4] [--seq 256] [--steps 5] [--warmup 2] [--baseline REV] [--json]

Both sides run full fine-tuning steps in float32 on the same shape ('mistral-125m': dim 768, 12 layers, 12 heads,
4 KV heads, head_dim 64, ffn 2048, vocab 32000, window 256), the same batch of random tokens with every target
carrying loss, AdamW and global-norm clipping at 1.0. Ours is mistral_jax.train_step's jitted step (state
donated); theirs is MistralForCausalLM(labels=...) + loss.backward() + clip_grad_norm_ + torch.optim.AdamW.
The first `warmup` steps (compilation for us, allocator warm-up for torch) are not timed. `--baseline REV`
also runs this script of git revision REV (default 1111997, the code before the one-model-one-layout change)
in a checkout of its own, between ours and transformers, and prints our speed against it.

MFU is against this machine's float32 matmul rate, measured here with a 4096^3 jnp matmul. Training FLOPs per
token = 6 N (N = params doing matmuls: all but the embedding table) + 12 x layers x heads x head_dim x keys
attended on average (causal, window-limited): three forward passes of forward_flops.
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
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def matmul_flops_per_s(n: int = 4096, repeats: int = 3) -> float:
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    mm(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        mm(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def forward_flops(config, seq: int, head_tokens: int | None = None) -> float:
    """FLOPs of one forward pass over a sequence of `seq` tokens: every weight product (the output head at
    `head_tokens` positions, default all), and per head the attention scores (q . k) and mixing (p . v), 2 x
    head_dim FLOPs each per key a query attends (causal, within the window)."""
    n_matmul = config.num_params - config.vocab_size * config.dim  # the embedding lookup does no matmul
    head = config.vocab_size * config.dim
    window = config.sliding_window or seq
    keys = sum(min(i + 1, window) for i in range(seq))
    head_tokens = seq if head_tokens is None else head_tokens
    return (
        2 * seq * (n_matmul - head)
        + 2 * head_tokens * head
        + 4 * config.n_layers * config.n_heads * config.head_dim * keys
    )


def flops_per_token(config, seq: int) -> float:
    """Training FLOPs per token: forward and backward, three forward passes."""
    return 3 * forward_flops(config, seq) / seq


def batch_arrays(batch: int, seq: int, vocab: int):
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, vocab, (batch, seq + 1)).astype(np.int32)
    return tokens


def bench_jax(config, tokens, steps: int, warmup: int) -> list[float]:
    import jax

    from mistral_jax import params as params_lib
    from mistral_jax import train_step as ts
    from mistral_jax.train_state import TrainState

    b, t1 = tokens.shape
    seq = t1 - 1
    mask = np.ones((b, seq), np.float32)
    batch = {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "loss_mask": mask,
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (b, seq)).copy(),
        "segment_ids": np.ones((b, seq), np.int32),
    }
    batch = jax.device_put(batch)
    opt_cfg = ts.OptimizerConfig(lr=1e-4, total_steps=1000, clip_norm=1.0, weight_decay=0.0)
    params = jax.jit(params_lib.init_params, static_argnums=0)(config, jax.random.key(0))
    state = TrainState.create(params, ts.make_optimizer(opt_cfg), 0)
    step = ts.jit_train_step(config, opt_cfg)
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        state, m = step(state, None, batch)
        float(m["loss"])
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return times


def bench_torch(config, tokens, steps: int, warmup: int, threads: int) -> list[float]:
    import torch
    from transformers import MistralConfig as HFConfig
    from transformers import MistralForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    hf = {k: v for k, v in config.to_hf().items() if k not in ("architectures", "model_type", "torch_dtype")}
    model = MistralForCausalLM(HFConfig(**hf)).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    ids = torch.from_numpy(tokens[:, :-1].astype(np.int64))
    labels = torch.from_numpy(tokens[:, 1:].astype(np.int64))
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return times


def bench_baseline(rev: str, args) -> dict:
    """This script at git revision `rev`, run in a checkout of its own; its --json result."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "baseline")
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", path, rev], check=True, capture_output=True)
        try:
            res = subprocess.run(
                [
                    sys.executable,
                    "bench/train_bench.py",
                    "--json",
                    "--batch",
                    str(args.batch),
                    "--seq",
                    str(args.seq),
                    "--steps",
                    str(args.steps),
                    "--warmup",
                    str(args.warmup),
                ],
                cwd=path,
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONPATH": path},
            )
        finally:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", path], capture_output=True)
    if res.returncode:
        sys.exit(f"baseline {rev} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    p.add_argument("--baseline", default="1111997", help="git revision to run beside ours ('' = none)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    from mistral_jax.config import get_preset

    config = get_preset("mistral-125m", max_seq_len=max(4096, args.seq))
    tokens = batch_arrays(args.batch, args.seq, config.vocab_size)
    n_tok = args.batch * args.seq

    peak = matmul_flops_per_s()
    ours = bench_jax(config, tokens, args.steps, args.warmup)
    baseline = bench_baseline(args.baseline, args) if args.baseline else None
    theirs = bench_torch(config, tokens, args.steps, args.warmup, args.threads)
    fpt = flops_per_token(config, args.seq)
    res = {
        "config": "mistral-125m",
        "params": config.num_params,
        "batch": args.batch,
        "seq": args.seq,
        "tokens_per_step": n_tok,
        "matmul_gflops": peak / 1e9,
        "flops_per_token": fpt,
    }
    for name, times in (("mistral_jax", ours), ("transformers", theirs)):
        step_s = float(np.median(times))
        tps = n_tok / step_s
        res[name] = {
            "step_s": step_s,
            "tokens_per_s": tps,
            "mfu": tps * fpt / peak,
            "step_s_all": [round(x, 3) for x in times],
        }
    res["speedup"] = res["mistral_jax"]["tokens_per_s"] / res["transformers"]["tokens_per_s"]
    if baseline:
        # MFU against this run's matmul rate and FLOPs count, like the rows above (its process measured its own).
        theirs_tps = baseline["mistral_jax"]["tokens_per_s"]
        res["baseline"] = {"rev": args.baseline, **baseline["mistral_jax"], "mfu": theirs_tps * fpt / peak}
        res["vs_baseline"] = res["mistral_jax"]["tokens_per_s"] / baseline["mistral_jax"]["tokens_per_s"]
    if args.json:
        print(json.dumps(res))
        return 0
    print(
        f"mistral-125m ({config.num_params / 1e6:.1f}M params), f32, AdamW, batch {args.batch} x {args.seq} tokens "
        f"= {n_tok} tokens/step, {args.steps} timed steps after {args.warmup} warm-up"
    )
    print(f"matmul rate (4096^3 f32, jnp): {peak / 1e9:.1f} GFLOP/s; training FLOPs/token {fpt / 1e6:.0f}M")
    for name in ("mistral_jax", "transformers"):
        r = res[name]
        print(f"  {name:13s} {r['step_s']:7.2f} s/step  {r['tokens_per_s']:8.1f} tokens/s  MFU {r['mfu']:.1%}")
    if baseline:
        r = res["baseline"]
        print(
            f"  {'rev ' + args.baseline:13s} {r['step_s']:7.2f} s/step  {r['tokens_per_s']:8.1f} tokens/s  "
            f"MFU {r['mfu']:.1%}"
        )
    print(
        f"  speedup: {res['speedup']:.2f}x transformers"
        + (f", {res['vs_baseline']:.2f}x rev {args.baseline}" if baseline else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
