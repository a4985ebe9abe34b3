"""Weight averaging (EMA) with its own batch-norm statistics.

The averaged weights ``w_avg <- tau w_avg + (1 - tau) w`` are updated after every optimizer step
(:func:`robust_flat.training.update.apply_gradients`; the paper's tau in {0.98, 0.985, 0.99, 0.9975}, default
``ema.decay=0.9975``). Batch-norm statistics are not weights: the running statistics of the raw model do not fit
the averaged weights, so the average gets its own, re-estimated on training data by :func:`recalibrate` (as the
released code's calibration: statistics reset to mean 0 / variance 1, then train-mode forwards without gradients
on clean training images, with the model's own batch-norm momentum; docs/paper-vs-code.md#ema-bn). The trainer
recalibrates at every epoch end and stores the result in ``TrainState.ema_model_state``.
"""
from __future__ import annotations

import functools
from typing import Callable, Iterable

import jax
import jax.numpy as jnp

from robust_flat import xla
from robust_flat.training.update import prepare_images


def reset_batch_stats(model_state):
    """``model_state`` with every batch-norm running mean set to 0 and running variance to 1 (a fresh layer's)."""

    def reset(path, leaf):
        name = getattr(path[-1], "key", None)
        if name == "mean":
            return jnp.zeros_like(leaf)
        if name == "var":
            return jnp.ones_like(leaf)
        return leaf

    return jax.tree_util.tree_map_with_path(reset, model_state)


@functools.partial(xla.jit, static_argnames=("apply_fn", "augment"))
def bn_forward(params, model_state, batch, key, *, apply_fn, augment: bool):
    """One train-mode forward (no gradient) of the uint8 ``batch`` (augmented when ``augment``); returns the
    updated batch-norm statistics."""
    k_aug, k_drop = jax.random.split(key)
    x = prepare_images(batch, k_aug, augment)
    return apply_fn(params, model_state, x, train=True, rng=k_drop)[1]


def recalibrate(apply_fn: Callable, params, model_state, batches: Iterable, key, augment: bool = True):
    """Batch-norm statistics of ``params`` re-estimated from scratch: reset (:func:`reset_batch_stats`), then one
    train-mode forward per batch of ``batches`` (dicts with a uint8 ``"image"``), in order, batch ``i`` augmented
    with ``fold_in(key, i)``. A model without batch-norm statistics (``model_state == {}``) is returned as is."""
    if not jax.tree.leaves(model_state):
        return model_state
    stats = reset_batch_stats(model_state)
    for i, batch in enumerate(batches):
        stats = bn_forward(params, stats, {"image": batch["image"]}, jax.random.fold_in(key, i), apply_fn=apply_fn,
                           augment=augment)
    return stats
