"""GPU device check, one run on one GPU (sized for an H200 in under 8 minutes): what a lent device is for.

  python bench/device_check.py [--decode-batches 1 8 64] [--decode-steps 64] [--slots 2048]
      [--prefill-batch 4] [--seq 4096] [--train-batch 4] [--train-layers 32] [--json OUT.json] [--markdown]

Everything runs on a Mistral-7B-shaped model (mistral-7b-v0.1: 32 layers, dim 4096, 32 heads, 8 KV heads,
window 4096) with random bfloat16 weights, on one device:

  hbm       the device's memory bandwidth, measured here: a large bfloat16 array read and written.
  matmul    the measured bfloat16 matmul rate (8192^3), next to the datasheet peak MFU is quoted against.
  decode    tokens/s of the real decode loop (programs.decode_program, greedy) at each batch size, a cache of
            --slots slots, against the HBM floor: (weights + KV cache) / measured bandwidth per step.
  prefill   one forward pass over --prefill-batch x --seq tokens (attention "auto", cuDNN here): model FLOPs
            / time / peak.
            Decode and prefill run the params as api.load_model tunes them for the GPU (tuning.for_inference)
            and, beside them, the plain stacked params: the platform tuning earns its place here.
  lora      one LoRA train step (rank 16 on every target, remat full, attention "auto") of --train-batch x
            --seq tokens, --train-layers layers (fewer than 32 is said in the output): model FLOPs = forward +
            input gradients (4 N per token plus attention; frozen weights get no weight gradient, the
            rematerialized forward is not counted).
  cudnn     attention.fused_self_attention(..., "cudnn") against the blockwise XLA path on the same bfloat16
            inputs (packed segments, padding, GQA, with and without a window), outputs and gradients.

On a machine without a GPU it stops at once with `error: no GPU` (exit 2). Record the figures in
docs/benchmarks.md (--markdown prints the rows).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Datasheet dense bfloat16 peak FLOP/s by device kind (substring of jax's device_kind), for MFU.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python bench/device_check.py", description=__doc__.split("\n")[0])
    p.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--decode-steps", type=int, default=64, help="tokens per row per timed decode call")
    p.add_argument("--slots", type=int, default=2048, help="KV cache slots per row at decode")
    p.add_argument("--prefill-batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=4096, help="tokens per row of prefill and of the train step")
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--train-layers", type=int, default=32, help="layers of the LoRA train step (7B has 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions of each measurement (best is kept)")
    p.add_argument(
        "--only",
        nargs="+",
        choices=["hbm", "matmul", "decode", "prefill", "lora", "cudnn"],
        help="run only these checks",
    )
    p.add_argument("--json", metavar="OUT", help="also write the results as one JSON object")
    p.add_argument("--markdown", action="store_true", help="print docs/benchmarks.md rows at the end")
    return p.parse_args(argv)


def best_seconds(fn, repeats: int) -> float:
    """The fastest of `repeats` timed calls of fn() (which blocks until its result is ready), after one
    untimed call (compilation, warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def hbm_bandwidth(repeats: int) -> float:
    """Bytes/s of x * 2 over a 4 GiB bfloat16 array: one read and one write of every byte."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((2**31,), jnp.bfloat16)
    f = jax.jit(lambda a: a * 2)
    s = best_seconds(lambda: f(x).block_until_ready(), repeats)
    return 2 * x.nbytes / s


def matmul_rate(repeats: int, n: int = 8192) -> float:
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    f = jax.jit(lambda a, b: a @ b)
    return 2 * n**3 / best_seconds(lambda: f(a, b).block_until_ready(), repeats)


def forward_flops(config, seq: int, head_tokens: int) -> float:
    """One forward pass over `seq` tokens: every weight product (the output head at `head_tokens` positions)
    and 4 x head_dim FLOPs per head per key a query attends (causal, within the window)."""
    head = config.vocab_size * config.dim
    n_matmul = config.num_params - head - (0 if config.tie_embeddings else head)
    window = config.sliding_window or seq
    keys = sum(min(i + 1, window) for i in range(seq))
    return 2 * seq * n_matmul + 2 * head_tokens * head + 4 * config.n_layers * config.n_heads * config.head_dim * keys


def decode_check(config, mm, variants, batches, steps: int, slots: int, bandwidth: float, repeats: int) -> list[dict]:
    """tokens/s of programs.decode_program at each batch size with the first of `variants` (name -> params),
    against the HBM floor; the other variants' step times beside it."""
    import jax
    import jax.numpy as jnp

    from mistral_jax import decode, programs
    from mistral_jax.config import Numerics
    from mistral_jax.memory_plan import cache_bytes, param_bytes

    numerics = Numerics.of("bfloat16")
    weights = param_bytes(config, mm.mesh, 2, mm.rules)
    out = []
    for b in batches:

        def fresh(b=b):
            logits = jnp.zeros((b, config.vocab_size), jnp.float32)
            return decode.DecodeState.greedy(mm.cache(b, slots, "bfloat16"), logits, slots // 2, steps, steps)

        with mm.activate():
            fn = programs.decode_program(config, numerics, mm)

            def run(params, fn=fn, fresh=fresh):
                state = fresh()
                jax.block_until_ready(state)
                t0 = time.perf_counter()
                state = fn(params, state, jnp.int32(steps), sampled=False, final=False)
                jax.block_until_ready(state)
                return time.perf_counter() - t0

            times = {}
            for name, params in variants.items():
                run(params)
                times[name] = min(run(params) for _ in range(repeats))
            seconds = next(iter(times.values()))
        cache = cache_bytes(config, mm.mesh, b, slots, 2, mm.rules)
        step = seconds / steps
        floor = (weights + cache) / bandwidth
        out.append(
            {
                "batch": b,
                "slots": slots,
                "tokens_per_s": b / step,
                "step_ms": step * 1e3,
                "hbm_floor_ms": floor * 1e3,
                "floor_fraction": floor / step,
                "bytes_per_step": weights + cache,
                **{f"{name}_step_ms": t / steps * 1e3 for name, t in list(times.items())[1:]},
            }
        )
    return out


def prefill_check(config, mm, variants, batch: int, seq: int, peak: float, repeats: int) -> dict:
    """One forward pass with the first of `variants` (name -> params): model FLOPs / time / peak; the other
    variants' times beside it."""
    import jax
    import jax.numpy as jnp

    from mistral_jax import model
    from mistral_jax.config import Numerics

    numerics = Numerics.of("bfloat16").replace(attention_impl="auto")
    tokens = jax.random.randint(jax.random.key(2), (batch, seq), 3, config.vocab_size, jnp.int32)
    last = jnp.full((batch,), seq - 1, jnp.int32)
    with mm.activate():
        f = jax.jit(lambda p, t: model.forward(p, t, config=config, numerics=numerics, logits_at=last))
        times = {n: best_seconds(lambda p=p: f(p, tokens).block_until_ready(), repeats) for n, p in variants.items()}
    s = next(iter(times.values()))
    flops = batch * forward_flops(config, seq, 1)
    return {
        **{f"{name}_seconds": t for name, t in list(times.items())[1:]},
        "batch": batch,
        "seq": seq,
        "seconds": s,
        "tokens_per_s": batch * seq / s,
        "tflops": flops / s / 1e12,
        "mfu": flops / s / peak,
    }


def lora_check(config, mm, params, batch: int, seq: int, layers: int, peak: float, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mistral_jax import lora as lora_lib
    from mistral_jax import train_step as ts
    from mistral_jax.config import Numerics
    from mistral_jax.train_state import TrainState

    c = config.replace(n_layers=layers)
    frozen = (
        params
        if layers == config.n_layers
        else {**params, "layers": jax.tree.map(lambda x: x[:layers], params["layers"])}
    )
    numerics = Numerics(param_dtype="float32", dtype="bfloat16", remat="full", attention_impl="auto")
    spec = lora_lib.LoraConfig(rank=16)
    opt = ts.OptimizerConfig(total_steps=100)
    with mm.activate():
        adapters = jax.jit(lambda k: lora_lib.init_lora(c, spec, k))(jax.random.key(3))
        state = TrainState.create(adapters, ts.make_optimizer(opt), 0)
        step = ts.jit_train_step(c, opt, numerics=numerics, lora_spec=spec, mm=mm)
        rng = np.random.default_rng(0)
        tokens = rng.integers(3, c.vocab_size, (batch, seq + 1)).astype(np.int32)
        batch_arrays = mm.place(
            {
                "tokens": tokens[:, :-1],
                "targets": tokens[:, 1:],
                "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
                "segment_ids": np.ones((batch, seq), np.int32),
                "loss_mask": np.ones((batch, seq), np.float32),
            }
        )
        holder = {"state": state}

        def run():
            holder["state"], metrics = step(holder["state"], frozen, batch_arrays)
            jax.block_until_ready(metrics["loss"])
            return metrics

        loss = float(run()["loss"])
        s = best_seconds(run, repeats)
    # Forward + input gradients: twice the forward's FLOPs (the adapters' own FLOPs are left out).
    flops = batch * 2 * forward_flops(c, seq, seq)
    return {
        "batch": batch,
        "seq": seq,
        "layers": layers,
        "seconds": s,
        "tokens_per_s": batch * seq / s,
        "tflops": flops / s / 1e12,
        "mfu": flops / s / peak,
        "loss": loss,
        "finite": bool(jnp.isfinite(loss)),
    }


def cudnn_check() -> list[dict]:
    """cuDNN against the blockwise XLA path: max |difference| of outputs and of the gradient of q, bfloat16
    inputs, on real (non-padding) queries."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mistral_jax import attention

    out = []
    b, t, n, kh, h = 2, 2048, 32, 8, 128
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.bfloat16) for s in ((b, t, n, h), (b, t, kh, h), (b, t, kh, h)))
    seg = np.ones((b, t), np.int32)
    pos = np.tile(np.arange(t, dtype=np.int32), (b, 1))
    seg[0, t // 3 :], pos[0, t // 3 :] = 2, np.arange(t - t // 3)  # two packed examples
    seg[1, t - 100 :], pos[1, t - 100 :] = 0, 0  # a padding tail
    seg, pos = jnp.asarray(seg), jnp.asarray(pos)
    real = (seg != 0)[:, :, None, None]
    for window in (None, 1024):

        def loss(fn, q):
            return jnp.sum(jnp.where(real, fn(q).astype(jnp.float32), 0.0) ** 2)

        cudnn = lambda q, w=window: attention.fused_self_attention(q, k, v, pos, seg, w, "cudnn")  # noqa: E731
        xla = lambda q, w=window: attention.blockwise_attention(q, k, v, pos, seg, w, 256)  # noqa: E731
        try:
            oc, ox = jax.jit(cudnn)(q), jax.jit(xla)(q)
            gc = jax.jit(jax.grad(functools.partial(loss, cudnn)))(q)
            gx = jax.jit(jax.grad(functools.partial(loss, xla)))(q)
            diff = float(jnp.max(jnp.where(real, jnp.abs(oc.astype(jnp.float32) - ox.astype(jnp.float32)), 0)))
            gdiff = float(jnp.max(jnp.abs(gc.astype(jnp.float32) - gx.astype(jnp.float32))))
            gscale = float(jnp.max(jnp.abs(gx.astype(jnp.float32))))
            # bfloat16 keeps 8 bits of mantissa: outputs of magnitude ~1 agree to a few 1e-2.
            ok = diff < 5e-2 and gdiff <= 5e-2 * max(gscale, 1.0)
            out.append(
                {"window": window, "max_abs_diff": diff, "grad_max_abs_diff": gdiff, "grad_scale": gscale, "equal": ok}
            )
        except Exception as e:  # an unsupported configuration is a finding, not a crash
            out.append(
                {"window": window, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}", "equal": False}
            )
    return out


def _diffs(c: dict) -> str:
    return f"max diff {c['max_abs_diff']:.3g}, gradient {c['grad_max_abs_diff']:.3g}"


def _stacked(value, unit: str) -> str:
    return "" if value is None else f"; plain stacked params {value:.3g} {unit}"


def markdown(r: dict) -> str:
    lines = [
        f"Device: {r['device']} ({r['device_kind']}), jax {r['jax']}; HBM measured "
        f"{r.get('hbm_bytes_per_s', 0) / 1e12:.2f} TB/s, bf16 matmul measured "
        f"{r.get('matmul_flops', 0) / 1e12:.0f} TFLOP/s, MFU against {r['peak_flops'] / 1e12:.0f} TFLOP/s; "
        f"decode and prefill with the tunings {r.get('tunings')} (what api.load_model runs there).",
        "",
        "| check | shape | result | against |",
        "|---|---|---|---|",
    ]
    for d in r.get("decode", []):
        lines.append(
            f"| decode 7B bf16 | batch {d['batch']}, {d['slots']} slots | {d['tokens_per_s']:.0f} tok/s "
            f"({d['step_ms']:.2f} ms/step) | HBM floor {d['hbm_floor_ms']:.2f} ms "
            f"({d['floor_fraction']:.0%}){_stacked(d.get('stacked_step_ms'), 'ms/step')} |"
        )
    if "prefill" in r:
        p = r["prefill"]
        lines.append(
            f"| prefill 7B bf16 | {p['batch']} x {p['seq']} | {p['tokens_per_s']:.0f} tok/s | MFU {p['mfu']:.1%}"
            f"{_stacked(p.get('stacked_seconds'), 's')} |"
        )
    if "lora" in r:
        p = r["lora"]
        lines.append(
            f"| LoRA step r16 | {p['batch']} x {p['seq']}, {p['layers']} layers | "
            f"{p['tokens_per_s']:.0f} tok/s | MFU {p['mfu']:.1%} |"
        )
    for c in r.get("cudnn", []):
        lines.append(
            f"| cuDNN vs XLA attention | window {c['window']} | "
            f"{'equal' if c['equal'] else 'DIFFERENT'} | "
            f"{c.get('error') or _diffs(c)} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    # Only the GPU and the host: a TPU runtime installed beside them (libtpu) is not probed.
    os.environ.setdefault("JAX_PLATFORMS", "cuda,cpu")
    import jax

    try:
        gpus = [d for d in jax.devices() if d.platform == "gpu"]
    except RuntimeError:  # no CUDA backend at all
        gpus = []
    if not gpus:
        print("error: no GPU (JAX finds no CUDA device here); run this on a GPU machine", file=sys.stderr)
        return 2
    import jax.numpy as jnp

    from mistral_jax import mesh_choice, tuning
    from mistral_jax.config import get_preset

    t_start = time.perf_counter()
    only = set(args.only or ["hbm", "matmul", "decode", "prefill", "lora", "cudnn"])
    device = gpus[0]
    peak = next((v for k, v in PEAK_BF16.items() if k in device.device_kind), None)
    r = {
        "device": str(device),
        "device_kind": device.device_kind,
        "jax": jax.__version__,
        "peak_flops": peak,
        "notes": [],
    }

    def log(what):
        print(f"[{time.perf_counter() - t_start:6.1f} s] {what}", file=sys.stderr, flush=True)

    def section(name, fn):
        if name not in only:
            return
        log(f"{name} ...")
        try:
            r[name] = fn()
        except Exception as e:  # one check failing leaves the others' figures
            r[name + "_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:500] if str(e) else ''}"
        log(f"{name}: {json.dumps(r.get(name, r.get(name + '_error')))[:400]}")

    section("hbm", lambda: hbm_bandwidth(args.repeats))
    r["hbm_bytes_per_s"] = r.pop("hbm", None) or 3.35e12
    section("matmul", lambda: matmul_rate(args.repeats))
    r["matmul_flops"] = r.pop("matmul", None)
    if peak is None:
        peak = r["peak_flops"] = r["matmul_flops"] or 1.0
        r["notes"].append(f"no datasheet peak for {device.device_kind}: MFU is against the measured matmul rate")

    config = get_preset("mistral-7b-v0.1")
    mm = mesh_choice.default_mesh(config, "generate", devices=[device])
    params = None
    if only & {"decode", "prefill", "lora"}:
        log("random 7B bfloat16 weights ...")
        params = mm.init_params(jax.random.key(0), "bfloat16")
        jax.block_until_ready(params)
    # What api.load_model runs here (tuning.for_inference), and the plain stacked params beside it.
    r["tunings"] = list(tuning.default_tunings(mm))
    variants = {}
    if only & {"decode", "prefill"}:
        variants = {"tuned": tuning.for_inference(jax.tree.map(jnp.copy, params), mm), "stacked": params}
    section(
        "decode",
        lambda: decode_check(
            config, mm, variants, args.decode_batches, args.decode_steps, args.slots, r["hbm_bytes_per_s"], args.repeats
        ),
    )
    section("prefill", lambda: prefill_check(config, mm, variants, args.prefill_batch, args.seq, peak, args.repeats))
    variants = None  # noqa: F841 (the tuned copy's memory back before the train step)
    if args.train_layers < config.n_layers:
        r["notes"].append(f"LoRA step at {args.train_layers} of {config.n_layers} layers")
    section(
        "lora",
        lambda: lora_check(config, mm, params, args.train_batch, args.seq, args.train_layers, peak, args.repeats),
    )
    params = None  # noqa: F841 (the weights' memory back before the attention check)
    section("cudnn", cudnn_check)
    r["seconds"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(r, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    if args.markdown:
        print(markdown(r))
    failed = [k for k in r if k.endswith("_error")] + [
        f"cudnn window {c['window']}" for c in r.get("cudnn", []) if not c["equal"]
    ]
    if failed:
        print(f"error: failed checks: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
