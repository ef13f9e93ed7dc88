"""The TPU memory tables of README.md and docs/benchmarks.md, from the TPU compiler: runs each row's
`python -m infer.plan --preset mistral-7b-v0.1 --dtype bfloat16 --topology T --mesh fsdp=-1 ... --compile --json`
(32 layers, a few minutes each; needs libtpu, the tpu-aot extra) in a process of its own, keeps its JSON in
--out, and prints the tables in markdown.

  python bench/tpu_table.py [--out out/tpu-table] [--topology v5e:2x4 ...] [--job generate lora full] [--reuse]

--reuse prints the tables from the JSON already in --out, compiling only the rows that have none; the plan of a
kept row is made again (infer.plan without --compile, no libtpu needed), so it follows memory_plan.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPOLOGIES = ("v5e:2x4", "v5p:2x2x1", "v6e:2x4")
LORA, FULL = "configs/mistral-7b-lora-v5e-8.yaml", "configs/mistral-7b-full-v5e-8.yaml"
# (name, label, infer.plan flags): the shipped v5e-8 configs on every slice, their batch and rows as they are.
JOBS = (
    ("generate", "generate, batch 32 x 4096", ["--job", "generate", "--batch-size", "32"]),
    ("lora", f"LoRA, `{LORA}`", ["--job", "lora", "--config", LORA]),
    ("full", f"full, `{FULL}`", ["--job", "full", "--config", FULL]),
)
GiB = 2**30


def command(topology: str, flags: list[str]) -> list[str]:
    return [
        *("python -m infer.plan --preset mistral-7b-v0.1 --dtype bfloat16 --topology".split()),
        topology,
        *("--mesh", "fsdp=-1"),
        *flags,
        *("--compile", "--json"),
    ]


def run(cmd: list[str]) -> dict:
    print(" ".join(cmd), file=sys.stderr, flush=True)
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    proc = subprocess.run([sys.executable, *cmd[1:]], env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def row(topology: str, flags: list[str], path: str, reuse: bool) -> dict:
    """The row's compiled figures, from --out when kept there (with its plan made again), else compiled."""
    if reuse and os.path.exists(path):
        with open(path) as f:
            r = json.loads(f.read().strip().splitlines()[-1])
        r["planned_bytes"] = run([c for c in command(topology, flags) if c != "--compile"])["planned_bytes"]
        r["plan_error"] = round(r["planned_bytes"] / r["compiled_bytes"] - 1, 3)
        return r
    r = run(command(topology, flags))
    with open(path, "w") as f:
        f.write(json.dumps(r) + "\n")
    return r


def docs_table(results: dict) -> list[str]:
    g = lambda n: f"{n / GiB:.2f}"  # noqa: E731
    lines = [
        "| job | slice, mesh | planned GiB | compiled GiB (args + temp) | usable of HBM | fits | plan vs compiled |",
        "|---|---|---|---|---|---|---|",
    ]
    for (topology, name), r in results.items():
        label = next(label for n, label, _ in JOBS if n == name)
        big = max(r["programs"], key=lambda p: p["compiled_bytes"])
        lines.append(
            f"| {label} | {topology}, {r['mesh'].replace('data=1,', '').replace(',tensor=1', '')} | "
            f"{g(r['planned_bytes'])} | {g(r['compiled_bytes'])} ({g(big['argument_bytes'])} + "
            f"{g(big['temp_bytes'])}) | {g(r['usable_bytes'])} of {g(r['hbm_bytes'])} | "
            f"{'yes' if r['fits'] else 'no'}, {g(r['headroom_bytes'])} free | {r['plan_error']:+.1%} |"
        )
    return lines


def readme_table(results: dict) -> list[str]:
    topologies = list(dict.fromkeys(t for t, _ in results))
    lines = ["| slice (usable GiB per device) | " + " | ".join(label for _, label, _ in JOBS) + " |"]
    lines.append("|---" * (len(JOBS) + 1) + "|")
    for t in topologies:
        r0 = next(r for (tt, _), r in results.items() if tt == t)
        cells = []
        for name, _, _ in JOBS:
            r = results.get((t, name))
            cells.append(
                "-" if r is None else f"{r['compiled_bytes'] / GiB:.1f}{'' if r['fits'] else ': does not fit'}"
            )
        lines.append(f"| {t} ({r0['usable_bytes'] / GiB:.2f}) | " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "out", "tpu-table"), help="where each row's JSON goes")
    p.add_argument("--topology", nargs="+", default=list(TOPOLOGIES))
    p.add_argument("--job", nargs="+", default=[name for name, _, _ in JOBS], choices=[name for name, _, _ in JOBS])
    p.add_argument("--reuse", action="store_true", help="keep the rows already in --out")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    results = {}
    for topology in args.topology:
        for name, _, flags in JOBS:
            if name in args.job:
                path = os.path.join(args.out, f"{topology.split(':')[0]}-{name}.json")
                results[topology, name] = row(topology, flags, path, args.reuse)
    print("\n".join(["docs/benchmarks.md:", "", *docs_table(results), "", "README.md:", "", *readme_table(results)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
