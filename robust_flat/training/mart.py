"""MART (Wang et al. 2020), one of the methods the paper compares (lambda = 6: RErr 61.0%, "poor" flatness).

Per batch: augment -> PGD-7 on the cross-entropy against the **eval**-mode model (the AT attack) -> **train**-mode
forwards on the clean and then the adversarial batch (batch-norm statistics updated by both, in that order) -> loss

    mean_i [ CE(f(x'_i), y_i) - log(1.0001 - p(x'_i)_{y'_i}) ]
      + beta * mean_i [ KL(p(x_i) || p(x'_i)) * (1.0000001 - p(x_i)_{y_i}) ]

where y'_i is the most likely wrong class under the adversarial prediction: the boosted cross-entropy on the
adversarial example plus a KL term weighted towards misclassified clean examples. Constants and term order are the
released code's (itself the MART authors' code); the paper gives no further detail
(docs/paper-vs-code.md#trades-mart). ``beta`` is the paper's lambda (grid 1, 3, 6, 9).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from robust_flat.attacks.common import cross_entropy
from robust_flat.attacks.pgd import PGDConfig
from robust_flat.training.pgd_at import adversarial_batch, attack_config
from robust_flat.training.update import (forward_clean_then_adversarial, gradient_update, prepare_images,
                                         step_options)


def mart_objective(clean_logits, adv_logits, y, beta: float):
    """``(loss, boosted CE term, weighted KL term)`` from the two logit batches (pure; differentiable in both)."""
    clean_logits = clean_logits.astype(jnp.float32)
    adv_logits = adv_logits.astype(jnp.float32)
    adv_probs = jax.nn.softmax(adv_logits)
    # most likely class other than y (the code: argsort, take the top unless it is y, then the runner-up)
    top2 = jax.lax.top_k(adv_probs, 2)[1]
    wrong = jnp.where(top2[:, 0] == y, top2[:, 1], top2[:, 0])
    p_wrong = jnp.take_along_axis(adv_probs, wrong[:, None], axis=1)[:, 0]
    boosted = jnp.mean(cross_entropy(adv_logits, y) - jnp.log(1.0001 - p_wrong))
    clean_probs = jax.nn.softmax(clean_logits)
    # torch.nn.KLDivLoss(log(adv_probs + 1e-12), clean_probs): clean_p * (log clean_p - log(adv_p + 1e-12))
    kl = jnp.sum(clean_probs * (jax.nn.log_softmax(clean_logits) - jnp.log(adv_probs + 1e-12)), axis=1)
    p_true = jnp.take_along_axis(clean_probs, y[:, None].astype(jnp.int32), axis=1)[:, 0]
    weighted = jnp.mean(kl * (1.0000001 - p_true))
    return boosted + beta * weighted, boosted, weighted


def mart_loss(params, model_state, x, x_adv, y, rng, *, apply_fn, beta: float):
    clean_logits, adv_logits, model_state = forward_clean_then_adversarial(params, model_state, x, x_adv, rng,
                                                                           apply_fn=apply_fn)
    loss, boosted, weighted = mart_objective(clean_logits, adv_logits, y, beta)
    metrics = {"batch_boosted_ce": boosted, "batch_weighted_kl": weighted,
               "batch_clean_error": jnp.mean(jnp.argmax(clean_logits, -1) != y)}
    return loss, (adv_logits, model_state, metrics)


def train_step(state, batch, rng, *, apply_fn, tx, attack: PGDConfig, beta: float, augment=True, ema_decay=None,
               clip_weights=None):
    k_aug, k_att, k_drop = jax.random.split(rng, 3)
    x = prepare_images(batch, k_aug, augment)
    y = batch["label"]
    x_adv = adversarial_batch(state, x, y, k_att, apply_fn=apply_fn, attack=attack, fraction=1.0)
    loss_fn = functools.partial(mart_loss, model_state=state.model_state, x=x, x_adv=x_adv, y=y, rng=k_drop,
                                apply_fn=apply_fn, beta=beta)
    return gradient_update(state, loss_fn, y, tx=tx, ema_decay=ema_decay, clip_weights=clip_weights)


def make_step(config, apply_fn, tx):
    return functools.partial(train_step, apply_fn=apply_fn, tx=tx, attack=attack_config(config),
                             beta=float(config.mart.beta), **step_options(config))
