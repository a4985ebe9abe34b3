"""The train state: one pytree holding everything a resumed run needs.

``epoch`` and the position in the epoch are derived from ``step`` (batches are a pure function of seed and step,
see :func:`robust_flat.data.train_batch`), so the data loader's state is the step itself.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax
from flax import struct


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    model_state: Any
    opt_state: Any
    ema_params: Optional[Any]
    rng: jax.Array  # raw uint32[2] key: the run's base key; per-step keys are fold_in(rng, step)


def create_train_state(params, model_state, tx: optax.GradientTransformation, rng: jax.Array,
                       ema: bool = False) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                      opt_state=tx.init(params), ema_params=jax.tree.map(jnp.copy, params) if ema else None,
                      rng=jnp.asarray(rng))
