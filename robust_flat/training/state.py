"""The train state: one pytree holding everything a resumed run needs.

``epoch`` and the position in the epoch are derived from ``step`` (batches are a pure function of seed and step,
see :func:`robust_flat.data.train_batch`), so the data loader's state is the step itself.

Weight averaging (``config.ema.enabled``): ``ema_params`` are the averaged weights and ``ema_model_state`` their own
batch-norm statistics, re-estimated on training data at every epoch end
(:func:`robust_flat.training.averaging.recalibrate`); both are ``None`` without weight averaging (no leaves: the
checkpoint of such a run is the same as before these fields existed).
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
    ema_model_state: Optional[Any] = None  # batch-norm statistics of ema_params (recalibrated at epoch ends)


def create_train_state(params, model_state, tx: optax.GradientTransformation, rng: jax.Array,
                       ema: bool = False) -> TrainState:
    """The state at step 0; with ``ema`` the average starts as a copy of the weights and their statistics."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                      opt_state=tx.init(params), ema_params=jax.tree.map(jnp.copy, params) if ema else None,
                      rng=jnp.asarray(rng), ema_model_state=jax.tree.map(jnp.copy, model_state) if ema else None)


@struct.dataclass
class LegacyTrainState:
    """The checkpoint layout before ``ema_model_state`` existed (read by :func:`robust_flat.runs.load_run` only, to
    load runs written by earlier versions; those have no weight averaging)."""
    step: jax.Array
    params: Any
    model_state: Any
    opt_state: Any
    ema_params: Optional[Any]
    rng: jax.Array
