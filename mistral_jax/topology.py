"""TPU topologies for ahead-of-time compiles: the chips (HBM, peak bf16 FLOP/s, HBM bandwidth) and the devices of
a slice such as 'v5e:2x4', described by libtpu on a machine without a TPU (aot.py compiles for them)."""

from __future__ import annotations

import dataclasses
import functools
import os

from .config import MistralConfig
from .sharding import ModelMesh

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One device of a TPU slice as libtpu describes it for compiling: a v5p chip is one megacore device, a v4
    chip two devices (one a TensorCore, each with half the chip's HBM and FLOP/s)."""

    hbm_bytes: int
    usable_bytes: int  # what the compiler lets a program hold on a device ("available HBM" in its refusal)
    bf16_flops: float  # peak bfloat16 FLOP/s
    hbm_bandwidth: float  # bytes/s
    devices_per_chip: int = 1


# usable_bytes: libtpu 0.0.42.1's "exceeds available HBM (15.75G)" for each (tests/test_aot.py asks it again).
CHIPS: dict[str, Chip] = {
    "v4": Chip(16 * GiB, int(15.25 * GiB), 137.5e12, 0.6e12, devices_per_chip=2),
    "v5e": Chip(16 * GiB, int(15.75 * GiB), 197e12, 819e9),
    "v5p": Chip(96 * GiB, int(95.74 * GiB), 459e12, 2.77e12),
    "v6e": Chip(32 * GiB, int(31.25 * GiB), 918e12, 1.64e12),
}


class AotError(RuntimeError):
    """A topology that cannot be described here (no libtpu, unknown name); the message says what to do."""


def chip_of(topology: str) -> Chip:
    """'v5e:2x4' -> CHIPS['v5e']."""
    name = topology.split(":")[0]
    if name not in CHIPS or ":" not in topology:
        raise AotError(
            f"topology {topology!r}: expected CHIP:SHAPE with CHIP one of {', '.join(CHIPS)}, e.g. v5e:2x4 or v5p:2x2x1"
        )
    return CHIPS[name]


@functools.cache
def topology_devices(topology: str) -> tuple:
    """The devices of a TPU slice, e.g. 'v5e:2x4' (8 devices), for compiling only."""
    chip_of(topology)
    # No TPU metadata server to ask, and other JAX processes on this machine may hold libtpu's lock.
    for key, value in (
        ("TPU_SKIP_MDS_QUERY", "1"),
        ("TPU_ACCELERATOR_TYPE", "v5litepod-8"),
        ("TPU_WORKER_HOSTNAMES", "localhost"),
        ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"),
    ):
        os.environ.setdefault(key, value)
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise AotError("compiling for a TPU topology needs libtpu: pip install 'mistral-jax[tpu-aot]'") from None
    from jax.experimental import topologies

    try:
        return tuple(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
    except Exception as e:  # the TPU plugin's errors are plain runtime errors
        raise AotError(f"topology {topology!r}: {str(e).splitlines()[0]}") from None


def model_mesh(config: MistralConfig, topology: str, spec: str | None) -> ModelMesh:
    """The ModelMesh of `spec` (sharding.parse_mesh) over the topology's devices."""
    return ModelMesh.build(config, spec, devices=topology_devices(topology))
