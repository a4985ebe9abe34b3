"""Optimizers and learning-rate schedules, stepped per iteration as in the paper's code."""
from __future__ import annotations

import optax


def make_schedule(cfg, steps_per_epoch: int, epochs: int):
    """``cfg``: the ``optimizer`` config block. Schedules: ``multistep`` (lr x ``gamma`` at ``milestones``, given as
    fractions of training: paper 2/5, 3/5, 4/5 = epochs 60/90/120 of 150), ``constant``, ``cyclic`` (triangular
    0 -> ``lr`` -> 0 per cycle of ``cycle_epochs``, as torch's CyclicLR in the paper's cyclic runs)."""
    total = steps_per_epoch * epochs
    if cfg.schedule == "multistep":
        boundaries = {int(round(f * total)): cfg.gamma for f in cfg.milestones}
        return optax.piecewise_constant_schedule(cfg.lr, boundaries)
    if cfg.schedule == "constant":
        return optax.constant_schedule(cfg.lr)
    if cfg.schedule == "cyclic":
        half = max(1, int(round(cfg.cycle_epochs * steps_per_epoch / 2)))

        def cyclic(step):
            import jax.numpy as jnp
            pos = jnp.mod(step, 2 * half) / half
            return cfg.lr * jnp.where(pos <= 1.0, pos, 2.0 - pos)

        return cyclic
    raise ValueError(f"unknown schedule {cfg.schedule!r}; choose multistep, constant or cyclic")


def make_optimizer(cfg, steps_per_epoch: int, epochs: int) -> optax.GradientTransformation:
    """SGD with coupled L2 weight decay on all parameters (as torch.optim.SGD(weight_decay=...)), Nesterov momentum
    0.9 by default (the released code; the paper says "SGD with momentum" -- set ``nesterov=False``), or Adam."""
    schedule = make_schedule(cfg, steps_per_epoch, epochs)
    decay = [optax.add_decayed_weights(cfg.weight_decay)] if cfg.weight_decay else []
    if cfg.name == "sgd":
        return optax.chain(*decay, optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov))
    if cfg.name == "adam":
        return optax.chain(*decay, optax.adam(schedule))
    raise ValueError(f"unknown optimizer {cfg.name!r}; choose sgd or adam")
