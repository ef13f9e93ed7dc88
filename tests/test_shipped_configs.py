"""Every shipped run config that names a TPU (configs/*-v5e-8.yaml, ...) compiles for its slice and fits.

Each config's train step is compiled the way `infer.plan --config YAML --topology T --compile --json` does at 32
layers, with the config's own mesh, batch, grad_accum, remat, attention kernel, LoRA dropout and optimizer, on
Mistral 7B's shape cut to a few layers, a small width and 128-token rows (the full compiles take minutes each):
it must fit, and the compiler's arguments must be the plan's params and optimizer state (the exact rows). At
full size the plan, held within 15% of the compiler by `python bench/tpu_table.py` (docs/benchmarks.md), must fit
the usable HBM with headroom. The compiles run in ONE subprocess (this file run as a script), which loads libtpu
apart from the CPU tests, one per config, side by side (the TPU compiler keeps one core busy)."""

import glob
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADROOM = 0.03  # of the usable HBM left free at full size
# The slice a config's file name names (mistral-7b-lora-v5e-8.yaml) and the topology compiled for it.
TOPOLOGIES = {"v5e-8": "v5e:2x4", "v5p-8": "v5p:2x2x1", "v6e-8": "v6e:2x4"}
TPU_NAME = re.compile(r"-(v\d+[a-z]*-\d+)\.yaml$")
# Mistral's head size and 4:1 GQA at a small width, 2 layers; the rows' length is cut too.
SMALL = dict(
    vocab_size=4000,
    dim=512,
    n_layers=2,
    n_heads=4,
    n_kv_heads=1,
    head_dim=128,
    hidden_dim=1792,
    sliding_window=4096,
    max_seq_len=32768,
)
SMALL_SEQ_LEN = 128
# Arguments: a config's params and optimizer state, laid out as the plan lays them out (no gradients).
ARGUMENT_ROWS = ("params", "LoRA adapters", "AdamW")


def shipped_tpu_configs() -> dict[str, str]:
    """{config path: topology} for every configs/*.yaml whose name ends in a TPU slice."""
    out = {}
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))):
        found = TPU_NAME.search(os.path.basename(path))
        if found:
            assert found.group(1) in TOPOLOGIES, f"{path}: add its slice to TOPOLOGIES"
            out[path] = TOPOLOGIES[found.group(1)]
    return out


def test_shipped_tpu_configs_fit_their_slice():
    configs = shipped_tpu_configs()
    assert len(configs) >= 2
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    pipes = dict(env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    procs = {path: subprocess.Popen([sys.executable, __file__, path, t], **pipes) for path, t in configs.items()}
    results = {}
    for path, proc in procs.items():
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, out.decode()[-3000:] + err.decode()[-3000:]
        results[path] = json.loads(out.decode().strip().splitlines()[-1])
    for path, r in results.items():
        small, full = r["small"], r["full"]
        assert small["topology"] == configs[path] and small["fits"] is True, (path, small)
        assert 0 < small["compiled_bytes"] <= small["usable_bytes"] < small["hbm_bytes"], (path, small)
        (program,) = small["programs"]
        assert program["kernels"] > 0, program  # splash, as the config's "auto" attention runs on a TPU
        rows = small["planned_rows"].items()
        state = sum(b for what, b in rows if what.startswith(ARGUMENT_ROWS) and "(est.)" not in what)
        assert abs(program["argument_bytes"] / state - 1) < 0.05, (path, program["argument_bytes"], state)
        assert full["fits"] is True, (path, full)
        assert full["planned_bytes"] <= (1 - HEADROOM) * full["usable_bytes"], (path, full)


def _worker(path: str, topology: str) -> dict:
    """infer.plan's JSON for the config: compiled at the small size, planned at full size."""
    import contextlib
    import io
    import tempfile

    import jax

    from infer import plan
    from mistral_jax.config import MistralConfig

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        small = os.path.join(tmp, "mistral_jax.json")
        with open(small, "w") as f:
            json.dump(MistralConfig(**SMALL).to_dict(), f)
        for name, flags in (
            ("small", ["--checkpoint", small, "--seq-len", str(SMALL_SEQ_LEN), "--compile"]),
            ("full", ["--preset", "mistral-7b-v0.1"]),
        ):
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                code = plan.main([*flags, "--topology", topology, "--config", path, "--json"])
            assert code == 0, (path, name, buf.getvalue())
            out[name] = json.loads(buf.getvalue().strip().splitlines()[-1])
    assert jax.default_backend() == "cpu"
    return out


if __name__ == "__main__":
    print(json.dumps(_worker(*sys.argv[1:3])))
