"""PGD adversarial training (Madry et al.) with the paper's recipe.

Per batch: augment -> the first ``fraction`` of the batch is attacked with PGD in **eval** mode (BN running
statistics) -> **train**-mode forward/backward on adversarial + remaining clean examples -> SGD step. The paper's
baseline trains on 100% adversarial batches (``fraction=1``); ``fraction=0.5`` is the code's 50/50 variant.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from robust_flat.attacks.pgd import PGDConfig, pgd
from robust_flat.training.update import prepare_images, step_options, supervised_update


def attack_config(config) -> PGDConfig:
    a = config.attack
    return PGDConfig(eps=a.eps, step_size=a.step_size, steps=a.steps, norm=a.norm, init=a.init,
                     restarts=a.restarts, unroll=a.unroll)


def adversarial_batch(state, x, y, key, *, apply_fn, attack: PGDConfig, fraction: float):
    """Replace the first ``round(fraction * B)`` examples of ``x`` by PGD examples against the eval-mode model."""
    n_adv = int(round(fraction * x.shape[0]))
    if n_adv == 0:
        return x

    def logits_fn(inputs):
        return apply_fn(state.params, state.model_state, inputs, train=False)[0]

    x_adv = pgd.raw(logits_fn, x[:n_adv], y[:n_adv], key, attack)
    return jnp.concatenate([x_adv, x[n_adv:]], axis=0) if n_adv < x.shape[0] else x_adv


def train_step(state, batch, rng, *, apply_fn, tx, attack: PGDConfig, fraction=1.0, augment=True, ema_decay=None,
               clip_weights=None):
    k_aug, k_att, k_drop = jax.random.split(rng, 3)
    x = prepare_images(batch, k_aug, augment)
    y = batch["label"]
    x = adversarial_batch(state, x, y, k_att, apply_fn=apply_fn, attack=attack, fraction=fraction)
    return supervised_update(state, x, y, k_drop, apply_fn=apply_fn, tx=tx, ema_decay=ema_decay,
                             clip_weights=clip_weights)


def make_step(config, apply_fn, tx):
    return functools.partial(train_step, apply_fn=apply_fn, tx=tx, attack=attack_config(config),
                             fraction=config.attack.fraction, **step_options(config))
