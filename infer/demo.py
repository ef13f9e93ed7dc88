"""Inference quickstart on a small random model made on the fly (no downloads):

  python -m infer.demo [--workdir out/infer-demo]

1. creates a random Mistral-architecture model and exports it in the transformers format, with the real
   v1 tokenizer that mistral-common ships;
2. converts it to our orbax checkpoint (`infer.convert`);
3. scores a few sentences (`infer.score`) and generates from a few prompts (`infer.generate`).
The numbers are those of random weights: the point is the pipeline, end to end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import jax

from infer import convert, generate, score
from mistral_jax import checkpoint
from mistral_jax import params as params_lib
from mistral_jax.config import get_preset
from mistral_jax.tokenizer import mistral_common_tokenizer


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m infer.demo", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="out/infer-demo")
    args = p.parse_args(argv)
    w = args.workdir
    shutil.rmtree(w, ignore_errors=True)
    os.makedirs(w)

    config = get_preset("tiny", vocab_size=32000, n_layers=4, dim=128, hidden_dim=256, n_heads=4, n_kv_heads=2,
                        head_dim=32, sliding_window=32)
    print(f"1. random model: {config.num_params / 1e6:.1f}M params, window {config.sliding_window}")
    params = jax.jit(params_lib.init_params, static_argnums=0)(config, jax.random.key(0))
    checkpoint.export_hf(f"{w}/hf", params, config, dtype="float32", tokenizer=mistral_common_tokenizer("v1"))

    print("2. python -m infer.convert --src hf --dst ckpt")
    convert.main(["--src", f"{w}/hf", "--dst", f"{w}/ckpt"])

    texts = ["The quick brown fox jumps over the lazy dog.", "Mistral 7B uses sliding-window attention."]
    with open(f"{w}/texts.jsonl", "w") as f:
        f.writelines(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts))
    print("3. python -m infer.score (a random model's perplexity is near its vocabulary size)")
    score.main(["--checkpoint", f"{w}/ckpt", "--input", f"{w}/texts.jsonl", "--output", f"{w}/scores.jsonl"])

    prompts = [{"id": "a", "prompt": "Once upon a time"},
               {"id": "b", "messages": [{"role": "user", "content": "Name three colors."}]}]
    with open(f"{w}/prompts.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in prompts)
    print("4. python -m infer.generate")
    generate.main(["--checkpoint", f"{w}/ckpt", "--input", f"{w}/prompts.jsonl", "--output",
                   f"{w}/completions.jsonl", "--max-new-tokens", "16", "--temperature", "0.8", "--seed", "1"])
    for line in open(f"{w}/completions.jsonl"):
        r = json.loads(line)
        print(f"   {r['id']}: {r['completion']!r} ({r['finish_reason']})")
    print(f"done: outputs in {w}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
