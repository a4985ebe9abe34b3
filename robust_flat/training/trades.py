"""TRADES (Zhang et al. 2019), one of the methods the paper compares (best: beta = 6, RErr 56.7% vs AT's 62.8%).

Per batch: augment -> clean logits of the **eval**-mode model -> PGD that maximizes KL(p(x) || p(x')) within the
eps-ball -> **train**-mode loss

    CE(f(x), y) + beta * mean_i KL(p(x_i) || p(x'_i))

with two separate train-mode forwards, clean then adversarial (batch-norm statistics are updated by both, in that
order), gradients through both, one optimizer step. This is the released code's (the paper gives no further
detail; docs/paper-vs-code.md#trades-mart): its attack is the AT attack
(PGD-7, step 0.007, the ``uniform_norm`` start) on the KL objective, and because that objective is one number per
batch its best iterate is chosen for the whole batch (``best_iterate="batch"``). The original TRADES attack starts
from 0.001 * N(0, I) and returns the last iterate: ``--config.attack.init=small_normal
--config.trades.best_iterate=last``. ``beta`` is the paper's lambda (grid 1, 3, 6, 9).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from robust_flat.attacks.common import cross_entropy, kl_from_clean
from robust_flat.attacks.pgd import PGDConfig, pgd
from robust_flat.training.pgd_at import attack_config
from robust_flat.training.update import (forward_clean_then_adversarial, gradient_update, prepare_images,
                                         step_options)


def trades_attack(state, x, key, *, apply_fn, attack: PGDConfig):
    """Adversarial inputs maximizing KL(p(x) || p(x')) for the eval-mode model (``attack.loss`` is set to KL)."""

    def logits_fn(inputs):
        return apply_fn(state.params, state.model_state, inputs, train=False)[0]

    clean_logits = jax.lax.stop_gradient(logits_fn(x))
    return pgd.raw(logits_fn, x, clean_logits, key, dataclasses.replace(attack, loss=kl_from_clean))


def trades_loss(params, model_state, x, x_adv, y, rng, *, apply_fn, beta: float):
    """``(loss, (adversarial logits, new model state, metrics))``: CE on the clean batch + beta x the batch-mean KL
    from the clean to the adversarial prediction, both train-mode forwards differentiated."""
    clean_logits, adv_logits, model_state = forward_clean_then_adversarial(params, model_state, x, x_adv, rng,
                                                                           apply_fn=apply_fn)
    natural = jnp.mean(cross_entropy(clean_logits, y))
    robust = jnp.mean(kl_from_clean(adv_logits, clean_logits))
    metrics = {"batch_clean_loss": natural, "batch_kl": robust,
               "batch_clean_error": jnp.mean(jnp.argmax(clean_logits, -1) != y)}
    return natural + beta * robust, (adv_logits, model_state, metrics)


def train_step(state, batch, rng, *, apply_fn, tx, attack: PGDConfig, beta: float, augment=True, ema_decay=None,
               clip_weights=None):
    k_aug, k_att, k_drop = jax.random.split(rng, 3)
    x = prepare_images(batch, k_aug, augment)
    y = batch["label"]
    x_adv = trades_attack(state, x, k_att, apply_fn=apply_fn, attack=attack)
    loss_fn = functools.partial(trades_loss, model_state=state.model_state, x=x, x_adv=x_adv, y=y, rng=k_drop,
                                apply_fn=apply_fn, beta=beta)
    return gradient_update(state, loss_fn, y, tx=tx, ema_decay=ema_decay, clip_weights=clip_weights)


def make_step(config, apply_fn, tx):
    attack = dataclasses.replace(attack_config(config), best_iterate=config.trades.best_iterate)
    return functools.partial(train_step, apply_fn=apply_fn, tx=tx, attack=attack, beta=float(config.trades.beta),
                             **step_options(config))
