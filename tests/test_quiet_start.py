"""The tools start quietly on a CPU-only machine with libtpu installed (the tpu-aot extra, which .[test] brings):
launch.default_platforms keeps JAX off the TPU plugin when no accelerator is attached and JAX_PLATFORMS is
unset, and leaves the choice to JAX where a GPU or TPU is attached."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "orbax-v0.1.0")
# libtpu's start-up lines: "Failed to find host bounds ... TPU accelerator type", "TPU_WORKER_HOSTNAMES", ...
TPU_LINE = re.compile(r"libtpu|\bTPU|InitGoogle", re.IGNORECASE)


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS" and not k.startswith("TPU_")}
    return dict(env, PYTHONPATH=ROOT)


def test_tool_starts_quietly_without_jax_platforms(tmp_path):
    """infer.convert reads a checkpoint through JAX (its backend starts): no libtpu line on stderr."""
    dst = str(tmp_path / "hf")
    cmd = [sys.executable, "-m", "infer.convert", "--src", FIXTURE, "--dst", dst, "--to", "hf"]
    proc = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("converted "), proc.stdout
    assert os.path.exists(os.path.join(dst, "config.json"))
    assert not [line for line in proc.stderr.splitlines() if TPU_LINE.search(line)], proc.stderr[-3000:]


def test_default_platforms_leaves_accelerators_and_users_alone():
    """CPU where nothing is attached (JAX's probe of the machine, stubbed); JAX's own choice where a GPU is
    seen or the user set JAX_PLATFORMS."""
    script = """
import sys
import jax
from jax._src import hardware_utils
from mistral_jax import launch
hardware_utils.num_available_tpu_chips_and_device_id = lambda: (0, None)
hardware_utils.num_available_amd_gpus = lambda stop_at=None: 0
hardware_utils.has_visible_nvidia_gpu = lambda: sys.argv[1] == "gpu"
launch.default_platforms()
print(jax.config.jax_platforms)
"""
    got = {}
    for case, extra in (("none", {}), ("gpu", {}), ("user", {"JAX_PLATFORMS": "cpu,tpu"})):
        env = dict(_env(), **extra)
        proc = subprocess.run(
            [sys.executable, "-c", script, case], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        got[case] = proc.stdout.strip()
    assert got == {"none": "cpu", "gpu": "None", "user": "cpu,tpu"}
