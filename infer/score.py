"""Per-token log-probabilities and perplexity of a JSONL file.

  python -m infer.score --checkpoint DIR --input F.jsonl --output F.jsonl [--tokenizer PATH] [--adapter DIR]
                        [--dtype float32|bfloat16|float16] [--batch-size N] [--no-check] [--mesh SPEC]
                        [--coordinator HOST:PORT --num-processes N --process-id I]   (docs/scaling.md)

Input rows: {"id", "text"} (tokenized with BOS) or {"id", "ids": [...]} (used as given). Output rows, one
per non-blank input line, in input order: {"id", "token_logprobs": [log p(x_t | x_<t), t = 1..n-1], "nll" (sum
over those tokens), "num_tokens" (n), "perplexity" (exp(nll / (n-1)))}; a bad row becomes {"id", "error"} and
the job goes on. The output is resumable like infer.generate's (mistral_jax/job_output.py): appended and
fsynced chunk by chunk, with a manifest and a lock; re-running the same command scores only the rows left.
--adapter folds a PEFT LoRA adapter into the weights; --no-check loads weights that hold NaN/inf instead of
refusing them. Errors in the command line or its files: one line `error: ...`, exit 2.
"""

from __future__ import annotations

import itertools
import math
import sys
import time

from tqdm import tqdm

from mistral_jax import api, jsonl, launch, memory_plan, scoring
from mistral_jax.job_output import JobOutput, skip_done

CHUNK = 1024  # rows scored (and written) at a time, so a huge file streams


def parse_args(argv=None):
    p = launch.ArgumentParser(prog="python -m infer.score", description=__doc__.split("\n")[0])
    launch.add_model_args(p, batch_size=8)
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    return p.parse_args(argv)


def row_ids(row: jsonl.Row, tok, vocab_size: int, max_len: int, path: str):
    """(ids, None) or (None, error message) for one input row; never raises."""
    if row.error:
        return None, row.error
    d = row.data
    if "ids" in d:
        ids, where = d["ids"], row.where(path, "ids")
    elif "text" in d:
        where = row.where(path, "text")
        if not isinstance(d["text"], str):
            return None, f"{where}: must be a string"
        problem = jsonl.text_problem(d["text"])
        if problem:
            return None, f"{where}: {problem}"
        if tok is None:
            return None, f"{where}: a 'text' row needs a tokenizer (--tokenizer, or tokenizer.model in the checkpoint)"
        try:
            ids = tok.encode(d["text"], bos=True)
        except Exception as e:  # whatever the tokenizer raises stays this row's problem
            return None, f"{where}: {type(e).__name__}: {e}"
    else:
        return None, f"{row.where(path)}: row has neither 'text' nor 'ids'"
    err = jsonl.check_ids(ids, vocab_size, max_len, where, min_len=2)
    return (None, err) if err else ([int(i) for i in ids], None)


class Totals:
    def __init__(self):
        self.nll, self.tokens, self.ok, self.errors = 0.0, 0, 0, 0

    def add(self, row: dict) -> None:
        if "error" in row:
            self.errors += 1
        elif isinstance(row.get("nll"), (int, float)) and isinstance(row.get("token_logprobs"), list):
            self.nll += row["nll"]
            self.tokens += len(row["token_logprobs"])
            self.ok += 1


def main(argv=None) -> int:
    """The exit code: 0, or 1 when every row was an error. A user error raises launch.UserError (a SystemExit
    saying `error: ...`), which the process entry point prints as one line, exit 2."""
    launch.default_platforms()
    args = parse_args(argv)
    with launch.user_errors():
        return _main(args)


def _main(args) -> int:
    # Every flag and input is checked, and the mesh, model-divides check and memory plan (rows up to
    # max_seq_len) done, before anything is written or any weight read.
    launch.check_batch_size(args.batch_size)
    with launch.user_errors(files=True):
        mm = launch.start(
            args,
            args.checkpoint,
            lambda c, mesh: memory_plan.inference(c, mesh, args.dtype, args.batch_size, c.max_seq_len, kind="score"),
        )
    out = JobOutput(args.output, args.input, {"job": "score", **launch.model_settings(args)})
    out.check()
    with out:
        batch_size = launch.batch_size(args.batch_size, mm)
        t0 = time.perf_counter()
        with launch.user_errors(files=True):
            m = api.load_model(args.checkpoint, args.dtype, args.tokenizer, mesh=mm, **launch.load_model_kwargs(args))
        c = m.config
        print(
            f"loaded {args.checkpoint}: {c.num_params / 1e6:.1f}M params, {args.dtype}, "
            f"window {c.sliding_window}, in {time.perf_counter() - t0:.1f}s",
            file=sys.stderr,
        )
        before, now = Totals(), Totals()
        done = out.begin(on_row=before.add)
        if done.rows:
            print(f"resuming: {done.rows} rows already in {args.output}", file=sys.stderr)
        rows = skip_done(jsonl.read_jsonl(args.input, job_ids=True), done, args.output)
        with tqdm(desc="score", unit="row", total=out.input["rows"] - done.rows) as bar:
            while chunk := list(itertools.islice(rows, CHUNK)):
                results = _score_chunk(m, chunk, args.input, batch_size, mm)
                for r in results:
                    if "error" in r:
                        print(f"error: {jsonl.safe_text(r['error'])}", file=sys.stderr)
                    now.add(r)
                out.write(results)
                bar.update(len(results))
    total_nll, total_tokens = before.nll + now.nll, before.tokens + now.tokens
    ppl = _exp(total_nll / total_tokens) if total_tokens else float("nan")
    print(
        f"rows scored: {now.ok}, errors: {now.errors}"
        + (f" ({done.rows} rows resumed)" if done.rows else "")
        + f", predicted tokens: {total_tokens}, corpus perplexity: {ppl:.4f}"
    )
    return 0 if now.ok or not now.errors else 1


def _score_chunk(m, chunk, path, batch_size, mm) -> list[dict]:
    """The output rows of `chunk`, in order. A batch that fails makes its rows (and the rest of the chunk) be
    scored one at a time; a row that fails alone becomes an error row."""
    c = m.config
    parsed = [row_ids(r, m.tokenizer, c.vocab_size, c.max_seq_len, path) for r in chunk]
    good = [i for i, (ids, _) in enumerate(parsed) if ids is not None]
    lps, failed = {}, None
    try:
        for j, lp in scoring.score(m.params, c, m.numerics, [parsed[i][0] for i in good], batch_size, mm):
            lps[good[j]] = lp
    except Exception as e:
        print(f"note: a batch failed ({type(e).__name__}); scoring its rows one at a time", file=sys.stderr)
        for i in [i for i in good if i not in lps]:
            try:
                lps[i] = next(scoring.score(m.params, c, m.numerics, [parsed[i][0]], batch_size, mm))[1]
            except Exception as e:
                failed = failed or {}
                failed[i] = f"{chunk[i].where(path)}: scoring failed ({type(e).__name__}: {e})"
    results = []
    for i, (row, (ids, err)) in enumerate(zip(chunk, parsed)):
        err = err or (failed or {}).get(i)
        if err:
            results.append({"id": row.id, "error": err})
            continue
        lp = lps[i]
        nll = -float(lp.sum())
        results.append(
            {
                "id": row.id,
                "token_logprobs": [float(x) for x in lp],
                "nll": nll,
                "num_tokens": len(ids),
                "perplexity": _exp(nll / len(lp)),
            }
        )
    return results


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")


if __name__ == "__main__":
    launch.exit_process(launch.run_tool(main))
