"""Fine-tunes a small Mistral-architecture model from scratch on a generated instruction set, on a CPU, in a
few minutes, and shows it answering held-out questions.

  python -m train.demo [--output runs/demo] [--steps N]

1. Writes the data set of mistral_jax/demo_data.py to OUTPUT/data/{train,held_out}.jsonl (and the held-out
   questions alone, as infer.generate input, to OUTPUT/data/held_out_prompts.jsonl).
2. Saves the randomly initialised model to OUTPUT/init and measures its held-out exact-match accuracy
   (greedy decoding).
3. Trains with configs/demo.yaml (train.finetune's trainer; resumable like any run) and writes OUTPUT/final.
4. Loads OUTPUT/final as infer.generate does (api.Mistral) and measures the accuracy again, then prints a few
   held-out questions with the model's answers.
Everything is seeded: two runs print the same numbers. No download: the tokenizer is the v1 file that the
mistral-common package ships.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

T0 = time.perf_counter()

from mistral_jax import api, checkpoint, demo_data, launch  # noqa: E402
from mistral_jax.train_config import TrainConfig  # noqa: E402
from mistral_jax.trainer import Trainer, load_base  # noqa: E402

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.yaml")
GREEDY = dict(max_new_tokens=12, temperature=0.0)


def write_jsonl(path: str, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def answers_of(checkpoint_dir: str, prompts: list[str]) -> list[str]:
    """Greedy answers of the checkpoint to single-turn chat prompts, through api.Mistral as infer.generate."""
    model = api.Mistral(api.load_model(checkpoint_dir), batch_size=len(prompts))
    return [c.text.strip() for c in model.generate([[{"role": "user", "content": p}] for p in prompts], **GREEDY)]


def accuracy(answers: list[str], held_out) -> float:
    return sum(a == want for a, (_, want) in zip(answers, held_out)) / len(held_out)


def main(argv=None) -> int:
    launch.default_platforms()
    p = argparse.ArgumentParser(prog="python -m train.demo", description=__doc__.split("\n")[0])
    p.add_argument("--output", default="runs/demo", help="run directory (default: runs/demo)")
    p.add_argument("--config", default=CONFIG, help="run config (default: configs/demo.yaml)")
    p.add_argument("--steps", type=int, help="override the config's steps")
    p.add_argument("--show", type=int, default=8, help="held-out questions to print at the end")
    args = p.parse_args(argv)

    train, held_out = demo_data.make_dataset(seed=0)
    data_dir = os.path.join(args.output, "data")
    os.makedirs(data_dir, exist_ok=True)
    write_jsonl(os.path.join(data_dir, "train.jsonl"), demo_data.to_jsonl_rows(train))
    write_jsonl(os.path.join(data_dir, "held_out.jsonl"), demo_data.to_jsonl_rows(held_out))
    prompts_file = os.path.join(data_dir, "held_out_prompts.jsonl")  # infer.generate's input format
    write_jsonl(
        prompts_file, [{"id": i, "messages": [{"role": "user", "content": q}]} for i, (q, _) in enumerate(held_out)]
    )
    print(f"data: {len(train)} training conversations, {len(held_out)} held-out questions -> {data_dir}")

    cfg = TrainConfig.load(
        args.config,
        output=args.output,
        steps=args.steps,
        train=os.path.join(data_dir, "train.jsonl"),
        eval=os.path.join(data_dir, "held_out.jsonl"),
    )
    trainer = Trainer(cfg, log=lambda msg: print(msg, file=sys.stderr))
    c = trainer.config
    print(
        f"model: {c.num_params / 1e6:.1f}M params (dim {c.dim}, {c.n_layers} layers, vocab {c.vocab_size}), "
        f"random init; {cfg.steps} steps of {cfg.batch_size} x {cfg.seq_len} tokens, lr {cfg.optimizer.lr}"
    )

    # Before: the random initial model, saved and loaded the way infer.generate loads OUTPUT/final below, so
    # both go through the same code (and one compiled program).
    init_dir = os.path.join(args.output, "init")
    checkpoint.save(init_dir, load_base(cfg, c, cfg.numerics.param_dtype, trainer.mm), c)
    shutil.copy2(trainer.tokenizer_path, os.path.join(init_dir, "tokenizer.model"))
    prompts = [q for q, _ in held_out]
    before = accuracy(answers_of(init_dir, prompts), held_out)
    print(f"held-out exact match before training: {before:.1%}")

    t_train = time.perf_counter()
    status = trainer.run()
    if status != "done":
        print(f"training {status}; run the same command again to resume", file=sys.stderr)
        return 3
    train_s = time.perf_counter() - t_train

    # After: OUTPUT/final loaded exactly as `python -m infer.generate --checkpoint OUTPUT/final` loads it.
    answers = answers_of(os.path.join(args.output, "final"), prompts)
    after = accuracy(answers, held_out)
    print(f"held-out exact match after training:  {after:.1%}  (before: {before:.1%})")
    for (q, want), got in list(zip(held_out, answers))[: args.show]:
        mark = "ok " if got == want else "BAD"
        print(f"  [{mark}] {q!r} -> {got!r}" + ("" if got == want else f" (expected {want!r})"))
    print(f"training {train_s:.0f}s; total {time.perf_counter() - T0:.0f}s since start (imports included)")
    print(
        f"next: python -m infer.generate --checkpoint {os.path.join(args.output, 'final')} --input {prompts_file} "
        f"--output {os.path.join(args.output, 'held_out_answers.jsonl')}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
