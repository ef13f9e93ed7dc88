"""Peak host memory of a checkpoint conversion (HF safetensors -> our orbax format, or -> hf / native).

Builds a random mid-size model straight as safetensors, shard by shard (no torch), then converts it
in a child process and reports the child's peak RSS (VmHWM; see peak_rss) above a baseline child that imports the same
modules and converts a tiny model (so interpreter, jax, orbax and tensorstore start-up are not counted).

    python bench/convert_memory.py                        # ~1.3 GB bf16: dim 2048, 12 layers, ffn 5632
    python bench/convert_memory.py --layers 2 --json      # small, machine-readable (used by the tests)

Target: peak extra host memory <= ~1.3x one copy of the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from mistral_jax import params as params_lib  # noqa: E402
from mistral_jax.config import MistralConfig  # noqa: E402


def make_random_hf(path: str, config: MistralConfig, dtype: str = "bfloat16", seed: int = 0) -> int:
    """Writes config.json + random weights as transformers safetensors, one shard per layer (and one for the
    embedding and head), so that one layer's tensors are in memory at a time. Returns the weight bytes written."""
    import safetensors.numpy

    np_dtype = _np(dtype)
    rng = np.random.default_rng(seed)

    def rand(w):
        shape = w.stored_shape(config)
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np_dtype)

    ws = params_lib.weights(config)
    groups = [{w.hf: rand(w) for w in ws if not w.layered}]
    groups += [{w.hf.format(l=i): rand(w) for w in ws if w.layered} for i in range(config.n_layers)]
    total, weight_map = 0, {}
    os.makedirs(path, exist_ok=True)
    for i in range(len(groups)):
        tensors, groups[i] = groups[i], {}  # written and dropped one shard at a time
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        safetensors.numpy.save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update({t: name for t in tensors})
        total += sum(x.nbytes for x in tensors.values())
        del tensors
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**config.to_hf(), "torch_dtype": dtype}, f)
    return total


def _child(src: str, dst: str, to: str, dtype: str | None) -> None:
    import jax  # noqa: F401  (initialize the backend the same way in both children)

    from mistral_jax import checkpoint

    jax.devices()
    t0 = time.perf_counter()
    checkpoint.convert(src, dst, to=to, dtype=dtype)
    seconds = time.perf_counter() - t0
    print(json.dumps({"maxrss": peak_rss(), "seconds": seconds}))


def peak_rss() -> int:
    """This process' peak resident set in bytes.

    On Linux, VmHWM of /proc/self/status: ru_maxrss (RUSAGE_SELF) carries over the high-water mark of the
    parent's memory image that was forked before exec, so a child of a large parent would report the parent's
    size. Elsewhere ru_maxrss (bytes on macOS, KiB on Linux).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _run_child(src, dst, to, dtype) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", src, dst, "--to", to]
    if dtype:
        cmd += ["--dtype", dtype]
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"child failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(
    config: MistralConfig, workdir: str, dtype: str = "bfloat16", to: str = "orbax", convert_dtype: str | None = None
) -> dict:
    src, dst = os.path.join(workdir, "src"), os.path.join(workdir, "dst")
    tiny_src, tiny_dst = os.path.join(workdir, "tiny_src"), os.path.join(workdir, "tiny_dst")
    t0 = time.perf_counter()
    weight_bytes = make_random_hf(src, config, dtype)
    build_s = time.perf_counter() - t0
    tiny = config.replace(vocab_size=128, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128)
    make_random_hf(tiny_src, tiny, dtype)
    base = _run_child(tiny_src, tiny_dst, to, convert_dtype)
    run = _run_child(src, dst, to, convert_dtype)
    out_bytes = weight_bytes // _np(dtype).itemsize * _np(convert_dtype or dtype).itemsize
    extra = run["maxrss"] - base["maxrss"]
    return {
        "weights_bytes": weight_bytes,
        "converted_bytes": int(out_bytes),
        "baseline_rss": base["maxrss"],
        "peak_rss": run["maxrss"],
        "extra_rss": extra,
        "ratio": extra / weight_bytes,
        "ratio_to_converted": extra / out_bytes,
        "convert_seconds": run["seconds"],
        "build_seconds": build_s,
        "to": to,
        "src_dtype": dtype,
    }


def _np(dtype: str) -> np.dtype:
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=2, metavar=("SRC", "DST"), help=argparse.SUPPRESS)
    ap.add_argument("--to", default="orbax", choices=["orbax", "hf", "native"])
    ap.add_argument("--dtype", default=None, help="conversion dtype (default: keep the source's)")
    ap.add_argument("--src-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--workdir", default=None, help="where to build (default: a temp dir, removed afterwards)")
    ap.add_argument("--json", action="store_true", help="print one JSON line only")
    args = ap.parse_args(argv)
    if args.child:
        return _child(*args.child, args.to, args.dtype)
    config = MistralConfig(
        vocab_size=args.vocab,
        dim=args.dim,
        n_layers=args.layers,
        n_heads=args.heads,
        n_kv_heads=args.kv_heads,
        head_dim=args.dim // args.heads,
        hidden_dim=args.ffn,
    )
    workdir = args.workdir or tempfile.mkdtemp(prefix="convert_memory_")
    try:
        r = measure(config, workdir, args.src_dtype, args.to, args.dtype)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(r))
        return
    gb = 1e9
    print(
        f"model: dim {args.dim}, {args.layers} layers, ffn {args.ffn}, vocab {args.vocab}, "
        f"{config.num_params / 1e6:.0f}M params, source {args.src_dtype}; convert hf -> {args.to}"
        f"{' as ' + args.dtype if args.dtype else ''}"
    )
    print(f"weights bytes       {r['weights_bytes'] / gb:8.3f} GB")
    print(f"baseline peak RSS   {r['baseline_rss'] / gb:8.3f} GB (interpreter + jax + orbax, tiny convert)")
    print(f"convert peak RSS    {r['peak_rss'] / gb:8.3f} GB")
    print(
        f"extra peak RSS      {r['extra_rss'] / gb:8.3f} GB = {r['ratio']:.2f}x the source weights"
        f" ({r['ratio_to_converted']:.2f}x the converted weights)"
    )
    print(f"convert time        {r['convert_seconds']:8.1f} s (build {r['build_seconds']:.1f} s)")


if __name__ == "__main__":
    main()
