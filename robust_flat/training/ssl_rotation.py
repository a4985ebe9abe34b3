"""Self-supervised adversarial training (the paper's AT-SSL, after Hendrycks et al. 2019): PGD-AT plus an auxiliary
rotation-prediction loss weighted by lambda.

Per batch:

1. the augmented images x and their 4 rotations (0, 90, 180, 270 degrees; :func:`rotations`), labelled 0..3;
2. PGD adversarial inputs against the **eval**-mode model: the classification examples exactly as PGD-AT
   (:func:`robust_flat.training.pgd_at.adversarial_batch` on the classifier's cross-entropy), the rotated examples
   with the same attack on the rotation head's cross-entropy (as the released code attacks its rotated examples
   "through the auxiliary model"); the first ``attack.fraction`` of each set is attacked;
3. train-mode forwards of the classifier on the classification examples and of the rotation head on the rotated
   ones; loss = CE_cls + lambda * CE_rot (means over each set); one optimizer step on both
   (:func:`robust_flat.training.update.gradient_update`).

The head (:class:`robust_flat.models.layers.RotationHead`, dense 256 -> norm -> ReLU -> dense 4 on the pooled
features, as the code's MLP 512 -> 256 -> 4) is part of the model (``model.rotation_head``, its hidden width) and
its parameters live under ``aux_rotation_head`` in the params, next to the classifier's: ``apply_fn(params,
model_state, x)`` still returns the classifier's logits and never reads them, so attacks, evaluation and the
per-epoch curves ignore the head, and the default layer selection of the weight neighbourhood (flatness, AT-AWP,
landscapes: ``aux`` excluded) and the Hessian's parameter set (:mod:`robust_flat.hessian`) leave it out, as the
code removes its auxiliary model before measuring.

Batch-norm running statistics: the backbone's come from the classification pass only, the head's from the rotation
pass (the only one it sees). The rotated images are another distribution, four times as many as the classified
ones; the statistics the evaluated classifier uses should be those of the images it classifies, as in PGD-AT. With
it, lambda = 0 is exactly the PGD-AT step (tested). The released code instead trains on one shuffled batch of 64
classification and 64 rotated images (one random rotation each) in a single forward, so its batch statistics mix both
(docs/paper-vs-code.md#self-supervision).

Hyper-parameters: the paper's grid is lambda in 0.5, 1, 2, 4, 8; lambda = 4 is the model of its main table (RErr 57.1%
with AutoAttack vs AT's 62.8%). A step costs about five PGD-AT steps (4 rotated copies of every image are attacked
and trained on).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from robust_flat.attacks.common import cross_entropy
from robust_flat.attacks.pgd import PGDConfig
from robust_flat.models.layers import AUX_HEAD_NAME, ROTATIONS
from robust_flat.training.pgd_at import adversarial_batch, attack_config
from robust_flat.training.update import gradient_update, prepare_images, step_options


def rotations(x):
    """The 4 rotations of every image of ``x`` (B, H, W, C), H = W: ``(x_rot, y_rot)`` of 4B images, image-major
    (rows 4i..4i+3 are image i rotated by 0, 90, 180, 270 degrees counter-clockwise) with labels 0, 1, 2, 3."""
    if x.shape[1] != x.shape[2]:
        raise ValueError(f"rotation self-supervision needs square images, got {x.shape[1]}x{x.shape[2]}")
    x_rot = jnp.stack([jnp.rot90(x, k, axes=(1, 2)) for k in range(ROTATIONS)], axis=1)
    y_rot = jnp.tile(jnp.arange(ROTATIONS, dtype=jnp.int32), x.shape[0])
    return x_rot.reshape((-1,) + x.shape[1:]), y_rot


def with_head_statistics(model_state, rotation_state):
    """``model_state`` with the rotation head's entries of every collection taken from ``rotation_state``."""
    return {name: ({**coll, AUX_HEAD_NAME: rotation_state[name][AUX_HEAD_NAME]} if AUX_HEAD_NAME in coll else coll)
            for name, coll in model_state.items()}


def train_step(state, batch, rng, *, apply_fn, tx, attack: PGDConfig, lam: float, fraction=1.0, augment=True,
               ema_decay=None, clip_weights=None):
    k_aug, k_att, k_drop = jax.random.split(rng, 3)  # as PGD-AT's step: lambda = 0 is that step
    k_rot_att, k_rot_drop = jax.random.split(jax.random.fold_in(rng, 1))
    x = prepare_images(batch, k_aug, augment)
    y = batch["label"]
    x_rot, y_rot = rotations(x)
    rotation_fn = dataclasses.replace(apply_fn, output="rotation")
    x = adversarial_batch(state, x, y, k_att, apply_fn=apply_fn, attack=attack, fraction=fraction)
    x_rot = adversarial_batch(state, x_rot, y_rot, k_rot_att, apply_fn=rotation_fn, attack=attack, fraction=fraction)

    def loss_fn(params):
        logits, model_state = apply_fn(params, state.model_state, x, train=True, rng=k_drop)
        rot_logits, rot_state = rotation_fn(params, state.model_state, x_rot, train=True, rng=k_rot_drop)
        ce, ce_rot = jnp.mean(cross_entropy(logits, y)), jnp.mean(cross_entropy(rot_logits, y_rot))
        extra = {"batch_classification_loss": ce, "batch_rotation_loss": ce_rot,
                 "batch_rotation_error": jnp.mean(jnp.argmax(rot_logits, -1) != y_rot)}
        return ce + lam * ce_rot, (logits, with_head_statistics(model_state, rot_state), extra)

    return gradient_update(state, loss_fn, y, tx=tx, ema_decay=ema_decay, clip_weights=clip_weights)


def make_step(config, apply_fn, tx):
    lam = float(config.ssl.lam)
    if lam < 0:
        raise ValueError(f"self-supervision needs ssl.lam >= 0, got {lam}")
    if not config.model.get("rotation_head"):
        raise ValueError("self-supervision needs a model with a rotation head: set model.rotation_head (its hidden "
                         "width, e.g. 256; experiments/configs/ssl.py does)")
    return functools.partial(train_step, apply_fn=apply_fn, tx=tx, attack=attack_config(config), lam=lam,
                             fraction=config.attack.fraction, **step_options(config))
