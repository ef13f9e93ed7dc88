"""Start-up shared by the tools (infer.score, infer.generate, train.finetune): the common flags, joining the
other hosts, building the mesh, checking that the model divides over it and fits in memory, all before any
weight is read.

  p = argparse.ArgumentParser(); launch.add_model_args(p)   # --checkpoint ... --mesh and the multi-host flags
  mm = launch.start(args, args.checkpoint, lambda c, mesh: memory_plan.inference(c, mesh, ...))
  model = api.load_model(args.checkpoint, args.dtype, args.tokenizer, mesh=mm, **launch.load_model_kwargs(args))
  batch_size = launch.batch_size(args.batch_size, mm)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import sys
from collections.abc import Callable

import jax

from . import checkpoint, distributed, memory_plan, mesh_choice, sharding
from .config import DTYPES, MistralConfig
from .job_output import JobError


class UserError(SystemExit):
    """A mistake in a command line or in the files it names. A tool's main raises it; its process entry point
    (run_tool) prints one line `error: ...` and exits 2. Uncaught, it prints the same line and exits 1, as
    the SystemExit it is."""

    def __init__(self, message: str):
        super().__init__(f"error: {message}")
        self.message = message


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line `error: ...` and exit 2 (no usage block)."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def run_tool(main: Callable[..., int], *args) -> int:
    """main(*args) as a process runs it: a UserError becomes one line `error: ...` on stderr and exit code 2;
    any other exception is a bug and keeps its traceback."""
    try:
        return main(*args)
    except UserError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2


@contextlib.contextmanager
def user_errors(files: bool = False):
    """Turns a job_output.JobError into a UserError, and with `files` the OSError / ValueError of reading the
    files a user named (checkpoint, tokenizer) too: wrap start-up with files=True, never the job itself."""
    try:
        yield
    except JobError as e:
        raise UserError(str(e)) from None
    except (OSError, ValueError) as e:
        if not files:
            raise
        raise UserError(str(e).splitlines()[0] if str(e) else type(e).__name__) from e


def default_platforms() -> None:
    """Keeps JAX on the CPU where libtpu is installed but no TPU or GPU is attached and the user chose no platform
    (JAX_PLATFORMS): JAX would otherwise try the TPU first, and libtpu logs its failed look-ups (metadata
    server, accelerator type, worker hostnames) to stderr. Every tool calls it first, before any JAX call;
    ahead-of-time TPU compiles (mistral_jax/topology.py) need no TPU backend."""
    if os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or importlib.util.find_spec("libtpu") is None:
        return
    try:
        from jax._src import hardware_utils as hw  # JAX's own probe (PCI ids, /dev/nvidia*, KFD nodes)

        attached = (
            hw.num_available_tpu_chips_and_device_id()[0] > 0
            or hw.has_visible_nvidia_gpu()
            or hw.num_available_amd_gpus(stop_at=1) != 0
        )
    except (ImportError, AttributeError, OSError):  # another JAX version: leave the choice to JAX
        return
    if not attached:
        jax.config.update("jax_platforms", "cpu")


def check_batch_size(requested: int) -> None:
    if requested < 1:
        raise UserError(f"--batch-size must be at least 1, got {requested}")


def add_args(parser) -> None:
    """--mesh (default: mesh_choice.default_mesh_spec of the tool's job) and the multi-host flags."""
    add_mesh_arg(parser)
    distributed.add_args(parser)


def add_model_args(parser, batch_size: int = 8) -> None:
    """The flags of a tool that runs a checkpoint: --checkpoint --adapter --tokenizer --dtype --batch-size
    --no-check, then add_args'. Load with load_model_kwargs(args)."""
    parser.add_argument("--checkpoint", required=True, help="our checkpoint, or a transformers / Mistral directory")
    parser.add_argument(
        "--adapter",
        metavar="DIR",
        help="a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors), folded into "
        "the checkpoint's weights",
    )
    parser.add_argument("--tokenizer", help="sentencepiece model (default: tokenizer.model in the checkpoint)")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument(
        "--no-check",
        action="store_true",
        help="load weights holding NaN/inf (or not matching their checksums) instead of refusing",
    )
    add_args(parser)


def load_model_kwargs(args) -> dict:
    """api.load_model's keyword arguments from add_model_args' flags (adapter, check_finite)."""
    return {"adapter": args.adapter, "check_finite": not args.no_check}


def model_settings(args) -> dict:
    """What of add_model_args' flags makes two batch jobs the same (their output manifest): the checkpoint,
    dtype, tokenizer, and the adapter when there is one."""
    out = {
        "checkpoint": os.path.abspath(args.checkpoint),
        "dtype": args.dtype,
        "tokenizer": os.path.abspath(args.tokenizer) if args.tokenizer else None,
    }
    if getattr(args, "adapter", None):
        out["adapter"] = os.path.abspath(args.adapter)
    return out


def start(
    args,
    checkpoint_path: str,
    plan: Callable[[MistralConfig, object], memory_plan.Plan] | None = None,
    job: str = "generate",
    **config_overrides,
) -> sharding.ModelMesh:
    """Joins the other processes, builds the mesh of `args.mesh` (without one, the default of `job`:
    mesh_choice.default_mesh_spec), prints its notes and the memory plan.

    Raises UserError (a SystemExit) when the mesh does not fit the devices or the model, or when the
    params, optimizer state and KV cache cannot fit the memory JAX reports for a device; the checkpoint's
    config and an --adapter's config are read here (their errors: wrap the call in user_errors(files=True))."""
    distributed.initialize(args)
    try:
        spec = getattr(args, "mesh", None)
        mesh = sharding.make_mesh(spec) if spec else None  # a bad --mesh is named before any file is read
        config = checkpoint.load_config(checkpoint_path, **config_overrides)
        if getattr(args, "adapter", None):
            checkpoint.read_adapter_config(args.adapter)  # a wrong directory is named before any work
        if mesh is None:
            mm = mesh_choice.default_mesh(config, job, plan)
            mesh = mm.mesh
        else:
            mm = sharding.ModelMesh(mesh, config)
        n = mesh.devices.size
        if n < jax.device_count():
            distributed.log(f"note: mesh {sharding.describe(mesh)} uses {n} of {jax.device_count()} devices")
        for note in mm.notes if n > 1 else []:
            distributed.log(f"note: {note}")
        if plan is not None:
            memory_plan.report(plan(config, mesh), print_fn=distributed.log)
    except (sharding.ShardingError, memory_plan.MemoryPlanError) as e:
        raise UserError(str(e)) from None
    return mm


def batch_size(requested: int, mm: sharding.ModelMesh) -> int:
    """`requested` rounded up to a multiple of the data-parallel size, with a note when it changes (the tools
    pad every batch to this size and drop the padding rows from the output)."""
    size = mm.round_batch(requested)
    if size != requested:
        distributed.log(
            f"note: --batch-size {requested} rounded up to {size}, a multiple of the data-parallel "
            f"size data x fsdp = {mm.data_parallel_size}; padding rows are dropped from the output"
        )
    return size


def exit_process(code: int) -> None:
    """Ends a batch tool's process once its output is written and closed: flushes stdout and stderr and, in a
    single-process run, leaves with os._exit, skipping the interpreter's slow teardown of the XLA runtime, which
    has nothing left to write. A multi-process run exits normally, so that jax.distributed shuts down in step
    with the other processes. Not for training tools, whose checkpoint writes may still be finishing."""
    sys.stdout.flush()
    sys.stderr.flush()
    if jax.process_count() == 1:
        os._exit(code)
    sys.exit(code)


def add_mesh_arg(parser) -> None:
    parser.add_argument(
        "--mesh",
        default=None,
        metavar="SPEC",
        help="device mesh, e.g. data=2,fsdp=2,tensor=2 (-1 = the rest of the devices); "
        "default: inference puts heads and the MLP on tensor and the batch on data "
        "(fsdp when the model does not fit so), training every device on fsdp. "
        "See docs/scaling.md",
    )
