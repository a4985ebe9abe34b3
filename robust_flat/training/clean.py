"""Plain (non-adversarial) training: the clean-loss baseline."""
from __future__ import annotations

import functools

import jax

from robust_flat.training.update import prepare_images, step_options, supervised_update


def train_step(state, batch, rng, *, apply_fn, tx, augment=True, ema_decay=None, clip_weights=None,
               label_smoothing=0.0):
    k_aug, k_drop = jax.random.split(rng)
    x = prepare_images(batch, k_aug, augment)
    return supervised_update(state, x, batch["label"], k_drop, apply_fn=apply_fn, tx=tx, ema_decay=ema_decay,
                             clip_weights=clip_weights, label_smoothing=label_smoothing)


def make_step(config, apply_fn, tx):
    return functools.partial(train_step, apply_fn=apply_fn, tx=tx,
                             label_smoothing=float(config.train.label_smoothing), **step_options(config))
