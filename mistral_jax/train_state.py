"""The training state: one pytree dataclass, created, laid out on a mesh and checkpointed as one layout.

Orbax saves `state.as_dict()` (a dict of the fields below, the layout of v0.1's state dict) and
`TrainState.from_dict` rebuilds the state from what it restores, so old run directories resume.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from .sharding import like_params

Params = Any


@struct.dataclass
class TrainState:
    """Everything a step reads and writes; a resumed run restores it and continues bit for bit."""

    step: jax.Array  # int32 []: batches consumed so far (skipped ones included)
    params: Params  # the trainable tree: the full params, or only the LoRA adapters (the base is frozen)
    opt_state: Any  # optax state of `params` only: frozen base weights get no optimizer state
    rng: jax.Array  # uint32 [2] key data; step i draws from fold_in(rng, i), so a resumed run draws the same
    bad_streak: jax.Array  # int32 []: non-finite losses in a row (the trainer aborts past a limit)
    skipped: jax.Array  # int32 []: updates skipped in total; the optimizer has applied `step - skipped`

    @classmethod
    def create(cls, params: Params, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
        """The state at step 0 for the trainable `params` (pure: jit it with out_shardings to create it sharded)."""
        return cls(
            step=jnp.int32(0),
            params=params,
            opt_state=optimizer.init(params),
            rng=jax.random.key_data(jax.random.key(seed)),
            bad_streak=jnp.int32(0),
            skipped=jnp.int32(0),
        )

    def as_dict(self) -> dict[str, Any]:
        """The checkpoint layout: {field name: value}."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        state = cls(**d)
        state.check()
        return state

    def check(self) -> None:
        chex.assert_shape([self.step, self.bad_streak, self.skipped], ())
        chex.assert_shape(self.rng, (2,))


def state_shardings(mm, abstract: TrainState, trainable_sh) -> TrainState:
    """Shardings of a train state on the sharding.ModelMesh `mm`: params as `trainable_sh`, optimizer state
    laid out like the params it tracks, the counters and the RNG replicated."""
    repl = NamedSharding(mm.mesh, P())
    opt_sh = like_params(abstract.opt_state, trainable_sh, mm.mesh)
    return TrainState(step=repl, params=trainable_sh, opt_state=opt_sh, rng=repl, bad_streak=repl, skipped=repl)
