"""Training methods. Each is one module with ``train_step(state, batch, rng, **static) -> (state, metrics)`` and
``make_step(config, apply_fn, tx)`` that binds the static part with ``functools.partial``; the trainer
(:mod:`robust_flat.training.trainer`) is the same for all of them."""
from __future__ import annotations

from robust_flat.training import awp, clean, entropy_sgd, mart, pgd_at, sam, ssl_rotation, trades

METHODS = {"pgd_at": pgd_at.make_step, "clean": clean.make_step, "trades": trades.make_step, "mart": mart.make_step,
           "awp": awp.make_step, "entropy_sgd": entropy_sgd.make_step, "sam": sam.make_step,
           "ssl": ssl_rotation.make_step}


def make_step(config, apply_fn, tx):
    try:
        factory = METHODS[config.method]
    except KeyError:
        raise ValueError(f"unknown method {config.method!r}; choose one of {', '.join(METHODS)}") from None
    return factory(config, apply_fn, tx)
