"""Converts a checkpoint between formats; the source format is detected.

  python -m infer.convert --src DIR --dst DIR [--to orbax|hf|native] [--dtype float32|bfloat16|float16] [--no-check]
                          [--adapter DIR]

Sources: a transformers directory (config.json + model.safetensors or shards with an index), a Mistral
native directory (params.json + consolidated.safetensors) or one of ours (orbax). `--to orbax` (default)
writes ours; `--to hf` exports what MistralForCausalLM.from_pretrained loads (sharded at 5 GB).
Conversion streams tensor by tensor: host memory stays near one copy of the weights. Every weight is checked
for NaN/inf (and an orbax source against its checksums) unless --no-check. `--adapter DIR` folds a PEFT LoRA
adapter (adapter_config.json + adapter_model.safetensors) into the weights before they are written: the output
is the merged model. A user error is one line `error: ...` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import time

from mistral_jax import checkpoint, launch


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")  # one line, not argparse's usage block


def main(argv=None) -> int:
    launch.default_platforms()
    p = _Parser(prog="python -m infer.convert", description=__doc__.split("\n")[0])
    p.add_argument("--src", required=True)
    p.add_argument("--dst", required=True)
    p.add_argument("--to", default="orbax", choices=["orbax", "hf", "native"])
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: keep the source's")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="shard size of an hf export")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
    p.add_argument(
        "--no-check",
        action="store_true",
        help="skip the check of every weight for NaN/inf (and of an orbax source's checksums)",
    )
    p.add_argument("--adapter", metavar="DIR", help="a PEFT LoRA adapter directory, merged into the weights")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        done = checkpoint.convert(
            args.src,
            args.dst,
            to=args.to,
            dtype=args.dtype,
            max_shard_bytes=args.max_shard_gb * 1e9,
            overwrite=args.overwrite,
            check_finite=not args.no_check,
            adapter=args.adapter,
        )
    except (OSError, ValueError) as e:  # a missing or malformed source, an existing --dst
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    config = done.config
    merged = f" with {args.adapter} merged" if args.adapter else ""
    print(
        f"converted {args.src} ({done.source_format}){merged} -> {args.dst} ({args.to}, {done.dtype}): "
        f"{config.num_params / 1e6:.1f}M params, {config.n_layers} layers, window {config.sliding_window}, "
        f"in {time.perf_counter() - t0:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
