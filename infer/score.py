"""Per-token log-probabilities and perplexity of a JSONL file.

  python -m infer.score --checkpoint DIR --input F.jsonl --output F.jsonl [--tokenizer PATH]
                        [--dtype float32|bfloat16|float16] [--batch-size N] [--mesh SPEC]
                        [--coordinator HOST:PORT --num-processes N --process-id I]   (docs/scaling.md)

Input rows: {"id", "text"} (tokenized with BOS) or {"id", "ids": [...]} (used as given). Output rows, in
input order: {"id", "token_logprobs": [log p(x_t | x_<t), t = 1..n-1], "nll" (sum over those tokens),
"num_tokens" (n), "perplexity" (exp(nll / (n-1)))}; a bad row becomes {"id", "error"} and the job goes on.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

from tqdm import tqdm

from mistral_jax import api, distributed, jsonl, launch, memory_plan, scoring

CHUNK = 1024  # rows scored (and written) at a time, so a huge file streams


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m infer.score", description=__doc__.split("\n")[0])
    launch.add_model_args(p, batch_size=8)
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    return p.parse_args(argv)


def row_ids(row: jsonl.Row, tok, vocab_size: int, max_len: int, path: str):
    """(ids, None) or (None, error message) for one input row."""
    where = f"{path}:{row.line}"
    if row.error:
        return None, row.error
    d = row.data
    if "ids" in d:
        ids = d["ids"]
    elif "text" in d:
        if not isinstance(d["text"], str):
            return None, f"{where}: 'text' must be a string"
        if tok is None:
            return None, f"{where}: a 'text' row needs a tokenizer (--tokenizer, or tokenizer.model in the checkpoint)"
        ids = tok.encode(d["text"], bos=True)
    else:
        return None, f"{where}: row has neither 'text' nor 'ids'"
    err = jsonl.check_ids(ids, vocab_size, max_len, where, min_len=2)
    return (None, err) if err else (ids, None)


def main(argv=None) -> int:
    args = parse_args(argv)
    # Mesh, model-divides check and memory plan (rows up to max_seq_len), before any weight is read.
    mm = launch.start(args, args.checkpoint, lambda c, mesh: memory_plan.inference(
        c, mesh, args.dtype, args.batch_size, c.max_seq_len, kind="score"))
    batch_size = launch.batch_size(args.batch_size, mm)
    t0 = time.perf_counter()
    m = api.load_model(args.checkpoint, args.dtype, args.tokenizer, mesh=mm)
    c = m.config
    print(f"loaded {args.checkpoint}: {c.num_params / 1e6:.1f}M params, {args.dtype}, "
          f"window {c.sliding_window}, in {time.perf_counter() - t0:.1f}s", file=sys.stderr)

    total_nll, total_tokens, n_ok, n_err = 0.0, 0, 0, 0
    rows = jsonl.read_jsonl(args.input)
    with open(distributed.output_path(args.output), "w", encoding="utf-8") as out, \
            tqdm(desc="score", unit="row") as bar:
        while True:
            chunk = [r for _, r in zip(range(CHUNK), rows)]
            if not chunk:
                break
            parsed = [row_ids(r, m.tokenizer, c.vocab_size, c.max_seq_len, args.input) for r in chunk]
            good = [i for i, (ids, _) in enumerate(parsed) if ids is not None]
            results = {}
            for j, lp in scoring.score(m.params, c, m.numerics, [parsed[i][0] for i in good], batch_size, mm):
                results[good[j]] = lp
                bar.update(1)
            for i, (row, (ids, err)) in enumerate(zip(chunk, parsed)):
                if err:
                    print(f"error: {err}", file=sys.stderr)
                    jsonl.write_row(out, {"id": row.id, "error": err})
                    n_err += 1
                    bar.update(1)
                    continue
                lp = results[i]
                nll = -float(lp.sum())
                jsonl.write_row(out, {"id": row.id, "token_logprobs": [float(x) for x in lp], "nll": nll,
                                      "num_tokens": len(ids), "perplexity": math.exp(nll / len(lp))})
                total_nll += nll
                total_tokens += len(lp)
                n_ok += 1
            out.flush()
    ppl = math.exp(total_nll / total_tokens) if total_tokens else float("nan")
    print(f"rows scored: {n_ok}, errors: {n_err}, predicted tokens: {total_tokens}, "
          f"corpus perplexity: {ppl:.4f}")
    return 0 if n_ok or not n_err else 1


if __name__ == "__main__":
    launch.exit_process(main())
