"""Several hosts, one program: `jax.distributed.initialize` and the few rules multi-host code must follow.

Every process runs the same command. After `initialize`, `jax.devices()` lists every device of every host
and a mesh (sharding.py) spans them all; each process only touches the shards on its own devices. The
tools follow three rules: every process runs the same jitted calls in the same order; each process puts
only its own rows on its devices (sharding.place_batch, or place_local_batch for data read per process);
only process 0 writes output files (`output_path`).

Launch (see docs/scaling.md):
  TPU pod slice, SLURM, Open MPI: detected from the environment, no flags;
  anything else:  --coordinator HOST:PORT --num-processes N --process-id I  on each host.

  parser = argparse.ArgumentParser(); distributed.add_args(parser)
  args = parser.parse_args(); distributed.initialize(args)   # before any other JAX call
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import TypeVar

import jax

T = TypeVar("T")


def add_args(parser) -> None:
    g = parser.add_argument_group("multi-host (see docs/scaling.md)")
    g.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="address of process 0; with --num-processes and --process-id when the cluster is not "
        "detected from the environment (TPU pods, SLURM and Open MPI are)",
    )
    g.add_argument("--num-processes", type=int, metavar="N")
    g.add_argument("--process-id", type=int, metavar="I")
    g.add_argument(
        "--multi-host",
        action="store_true",
        help="call jax.distributed.initialize() and let JAX detect the cluster (e.g. a GCE TPU VM "
        "slice whose workers set no environment variable we look for)",
    )


def detect_cluster(environ=os.environ) -> str | None:
    """The multi-process launcher this process runs under, or None for a single process. Read from the
    environment only: looking at devices would start the backend, after which initialize is too late."""

    def count(var):
        try:
            return int(environ.get(var, "1").split("(")[0])
        except ValueError:
            return 1

    # SLURM_STEP_NUM_TASKS, not SLURM_NTASKS: the latter is also set in an allocation's shell, where a
    # single process started by hand would wait forever for the others.
    if "SLURM_PROCID" in environ and count("SLURM_STEP_NUM_TASKS") > 1:
        return "slurm"
    if count("OMPI_COMM_WORLD_SIZE") > 1:
        return "openmpi"
    hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES") or ""
    if len([h for h in hosts.split(",") if h]) > 1 or count("MEGASCALE_NUM_SLICES") > 1:
        return "tpu"
    return None


_initialized = False


def initialize(
    args=None,
    *,
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    multi_host: bool = False,
    environ=os.environ,
) -> bool:
    """Joins the other processes when there are any; returns True when running multi-process.

    Explicit values (args from add_args, or keywords) win; otherwise a detected cluster (detect_cluster) or
    `multi_host` lets jax.distributed.initialize find its own parameters; otherwise nothing is done."""
    global _initialized
    if args is not None:
        coordinator = coordinator or getattr(args, "coordinator", None)
        num_processes = num_processes if num_processes is not None else getattr(args, "num_processes", None)
        process_id = process_id if process_id is not None else getattr(args, "process_id", None)
        multi_host = multi_host or bool(getattr(args, "multi_host", False))
    explicit = {"--coordinator": coordinator, "--num-processes": num_processes, "--process-id": process_id}
    given = [k for k, v in explicit.items() if v is not None]
    if _initialized:
        return jax.process_count() > 1
    if given:
        missing = [k for k in explicit if k not in given]
        if missing:
            raise ValueError(
                f"multi-host: {', '.join(given)} given without {', '.join(missing)}; pass all three "
                "(or none, on a TPU pod, SLURM or Open MPI)"
            )
        if not 0 <= process_id < num_processes:
            raise ValueError(f"multi-host: --process-id {process_id} must be in [0, --num-processes {num_processes})")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    elif multi_host or detect_cluster(environ):
        jax.distributed.initialize()
    else:
        return False
    _initialized = True
    log(
        f"multi-host: process {jax.process_index()} of {jax.process_count()}, "
        f"{jax.local_device_count()} local / {jax.device_count()} devices",
        all_processes=True,
    )
    return jax.process_count() > 1


def is_main() -> bool:
    """True on the process that writes files and prints the summary (process 0)."""
    return jax.process_index() == 0


def output_path(path: str) -> str:
    """`path` on process 0, os.devnull elsewhere: every process runs the same loop, only one writes."""
    return path if is_main() else os.devnull


def log(msg: str, all_processes: bool = False, file=None) -> None:
    """Prints to stderr on process 0 (prefixed with the process id on the others when all_processes)."""
    if jax.process_count() == 1 or is_main():
        print(msg, file=file or sys.stderr, flush=True)
    elif all_processes:
        print(f"[process {jax.process_index()}] {msg}", file=file or sys.stderr, flush=True)


def process_shard(items: Sequence[T]) -> list[T]:
    """This process's share of a dataset: items p, p + P, p + 2P, ... (training data: each process reads
    only its share, then sharding.place_local_batch assembles the global batch)."""
    return list(items[jax.process_index() :: jax.process_count()])


def barrier(name: str) -> None:
    """All processes wait here (no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
