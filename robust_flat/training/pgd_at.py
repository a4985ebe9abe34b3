"""PGD adversarial training (Madry et al.) with the paper's recipe.

Per batch: augment -> the first ``fraction`` of the batch is attacked with PGD in **eval** mode (BN running
statistics) -> **train**-mode forward/backward on adversarial + remaining clean examples -> SGD step. The paper's
baseline trains on 100% adversarial batches (``fraction=1``); ``fraction=0.5`` is the code's 50/50 variant.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from robust_flat.attacks.pgd import PGDConfig, pgd, step_size_for
from robust_flat.training.update import prepare_images, step_options, supervised_update


def attack_config(config, steps: Optional[int] = None, restarts: Optional[int] = None) -> PGDConfig:
    """The training attack of every adversarial method, from the ``attack`` block: the one translation from config
    to attack. The step size follows eps by ``attack.step_rule``: ``fixed`` (the default) takes ``step_size`` as
    given whatever eps, as the released code's registry does for its eps variants (0.0235 ... 0.0352 all use
    ``lr0007``); ``scaled`` reads ``step_size`` as the step at eps = 8/255 and scales it with eps, ``step_size x eps /
    (8/255)``, so PGD-k covers the same share of the ball at every radius (the larger-eps models,
    experiments/configs/larger_eps.py: 9/255 -> 0.007875; docs/paper-vs-code.md#larger-eps). The evaluation attacks
    (experiments/evaluate.py, robust_loss.py, flatness.py) take their own ``--eps`` (8/255).
    ``attack.tau`` >= 0 selects PGD-tau (-1: plain PGD).

    With ``steps`` and/or ``restarts`` it is the trainer's evaluation attack of the same block (per-epoch curves:
    ``attack.steps`` x 1 restart; early stopping: ``eval.es_steps`` x ``eval.es_restarts``): plain PGD (no
    PGD-tau), eps, step size, norm and init as in training."""
    a = config.attack
    evaluation = steps is not None or restarts is not None
    step = step_size_for(a.eps, a.get("step_rule", "fixed"), a.step_size)
    return PGDConfig(eps=a.eps, step_size=step, steps=a.steps if steps is None else int(steps), norm=a.norm,
                     init=a.init, restarts=a.restarts if restarts is None else int(restarts), unroll=a.unroll,
                     tau=None if evaluation or a.tau < 0 else int(a.tau))


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
               clip_weights=None, label_smoothing=0.0):
    """``label_smoothing`` smooths the targets of the weight update only; the attack maximizes the cross-entropy of
    the true label (as the released code does)."""
    k_aug, k_att, k_drop = jax.random.split(rng, 3)
    x = prepare_images(batch, k_aug, augment)
    y = batch["label"]
    x = adversarial_batch(state, x, y, k_att, apply_fn=apply_fn, attack=attack, fraction=fraction)
    return supervised_update(state, x, y, k_drop, apply_fn=apply_fn, tx=tx, ema_decay=ema_decay,
                             clip_weights=clip_weights, label_smoothing=label_smoothing)


def make_step(config, apply_fn, tx):
    return functools.partial(train_step, apply_fn=apply_fn, tx=tx, attack=attack_config(config),
                             fraction=config.attack.fraction, label_smoothing=float(config.train.label_smoothing),
                             **step_options(config))
