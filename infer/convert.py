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

import numpy as np

from mistral_jax import checkpoint


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")  # one line, not argparse's usage block


def main(argv=None) -> int:
    p = _Parser(prog="python -m infer.convert", description=__doc__.split("\n")[0])
    p.add_argument("--src", required=True)
    p.add_argument("--dst", required=True)
    p.add_argument("--to", default="orbax", choices=["orbax", "hf", "native"])
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: keep the source's")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="shard size of an hf export")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
    p.add_argument("--no-check", action="store_true",
                   help="skip the check of every weight for NaN/inf (and of an orbax source's checksums)")
    p.add_argument("--adapter", metavar="DIR", help="a PEFT LoRA adapter directory, merged into the weights")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    kw = dict(to=args.to, dtype=args.dtype, max_shard_bytes=args.max_shard_gb * 1e9, overwrite=args.overwrite,
              check_finite=not args.no_check)
    try:
        if args.adapter:
            done = convert_merged(args.src, args.dst, args.adapter, **kw)
        else:
            done = checkpoint.convert(args.src, args.dst, **kw)
    except (OSError, ValueError) as e:  # a missing or malformed source, an existing --dst
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    config = done.config
    merged = f" with {args.adapter} merged" if args.adapter else ""
    print(f"converted {args.src} ({done.source_format}){merged} -> {args.dst} ({args.to}, {done.dtype}): "
          f"{config.num_params / 1e6:.1f}M params, {config.n_layers} layers, window {config.sliding_window}, "
          f"in {time.perf_counter() - t0:.1f}s")
    return 0


def convert_merged(src: str, dst: str, adapter: str, *, to: str, dtype: str | None, max_shard_bytes: float,
                   overwrite: bool, check_finite: bool) -> checkpoint.Conversion:
    """checkpoint.convert with the PEFT adapter in `adapter` folded into the weights (W + scale A B, computed in
    float32, stored in the weights' dtype) before they are written."""
    checkpoint.peft.read_adapter_config(adapter)  # a wrong adapter directory is named before the base is read
    fmt = checkpoint.detect_format(src)
    config = checkpoint.load_config(src)
    if fmt == "orbax":
        params = checkpoint.load_params(src, config, dtype=dtype or checkpoint.orbax.stored_dtype(src),
                                        check_finite=check_finite)
    else:
        params = checkpoint.load_host_params(src, config, dtype, check_finite=check_finite)
    params = checkpoint.merge_adapter(params, adapter, config, check_finite=check_finite)
    name = np.dtype(params["norm"]["scale"].dtype).name
    if to == "orbax":
        checkpoint.save(dst, params, config, tokenizer=src, overwrite=overwrite)
    elif to == "hf":
        checkpoint.export_hf(dst, params, config, name, max_shard_bytes, tokenizer=src, overwrite=overwrite)
    else:
        checkpoint.export_native(dst, params, config, name, tokenizer=src, overwrite=overwrite)
    return checkpoint.Conversion(config, name, fmt)


if __name__ == "__main__":
    sys.exit(main())
