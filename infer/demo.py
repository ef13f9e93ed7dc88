"""Inference quickstart on a small random model made on the fly (no downloads):

  python -m infer.demo [--workdir out/infer-demo]

--workdir is created with a marker file (.infer-demo); a rerun replaces the demo's own outputs there and leaves
anything else. A non-empty directory without the marker is refused.

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
from mistral_jax import checkpoint, launch
from mistral_jax import params as params_lib
from mistral_jax.config import get_preset
from mistral_jax.tokenizer import mistral_common_tokenizer

MARKER = ".infer-demo"  # in every workdir this demo created: only those are cleaned
OUTPUTS = (
    "hf",
    "ckpt",
    ".hf.partial",
    ".ckpt.partial",
    "texts.jsonl",
    "scores.jsonl",
    "prompts.jsonl",
    "completions.jsonl",
)


def _is_output(name: str) -> bool:
    """One of the demo's outputs, or a file the tools keep beside one (scores.jsonl.manifest.json)."""
    return name in OUTPUTS or name.startswith(tuple(f"{o}." for o in OUTPUTS if o.endswith(".jsonl")))


def prepare_workdir(w: str) -> None:
    """Creates `w` with the marker, or empties the demo's outputs from a `w` that has it; ValueError for an
    existing non-empty directory without it (the demo never deletes what it did not make)."""
    if os.path.exists(w) and not os.path.isdir(w):
        raise ValueError(f"--workdir {w} exists and is not a directory")
    if os.path.isdir(w) and os.listdir(w) and not os.path.isfile(os.path.join(w, MARKER)):
        raise ValueError(
            f"--workdir {w} is a non-empty directory that infer.demo did not create (no {MARKER} "
            "marker); pass a new or empty directory"
        )
    os.makedirs(w, exist_ok=True)
    for name in filter(_is_output, os.listdir(w)):
        out = os.path.join(w, name)
        if os.path.isdir(out) and not os.path.islink(out):
            shutil.rmtree(out)
        elif os.path.lexists(out):
            os.remove(out)
    with open(os.path.join(w, MARKER), "w") as f:
        f.write("made by python -m infer.demo; a rerun replaces its outputs here\n")


def main(argv=None) -> int:
    launch.default_platforms()
    p = argparse.ArgumentParser(prog="python -m infer.demo", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="out/infer-demo")
    args = p.parse_args(argv)
    w = args.workdir
    try:
        prepare_workdir(w)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    config = get_preset(
        "tiny",
        vocab_size=32000,
        n_layers=4,
        dim=128,
        hidden_dim=256,
        n_heads=4,
        n_kv_heads=2,
        head_dim=32,
        sliding_window=32,
    )
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

    prompts = [
        {"id": "a", "prompt": "Once upon a time"},
        {"id": "b", "messages": [{"role": "user", "content": "Name three colors."}]},
    ]
    with open(f"{w}/prompts.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in prompts)
    print("4. python -m infer.generate")
    generate.main(
        [
            "--checkpoint",
            f"{w}/ckpt",
            "--input",
            f"{w}/prompts.jsonl",
            "--output",
            f"{w}/completions.jsonl",
            "--max-new-tokens",
            "16",
            "--temperature",
            "0.8",
            "--seed",
            "1",
        ]
    )
    for line in open(f"{w}/completions.jsonl"):
        r = json.loads(line)
        print(f"   {r['id']}: {r['completion']!r} ({r['finish_reason']})")
    print(f"done: outputs in {w}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
