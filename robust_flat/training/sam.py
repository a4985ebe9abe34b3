"""SAM and adaptive SAM (ASAM) on the robust loss: sharpness-aware minimization with PGD adversarial inputs.

Not a method of the paper (its flatness-seeking methods are AT-AWP and Entropy-SGD); users ask for it. SAM (Foret et
al. 2021) minimizes max_{||eps|| <= rho} L(w + eps), ASAM (Kwon et al. 2021) the same in the scale-adaptive ball
||T_w^-1 eps|| <= rho, with T_w = |w| + eta element-wise for weights and T_w = 1 for biases (the ASAM code's rule:
parameters named "bias" are not rescaled, every other one, batch-norm scales included, is). Here L is the robust
loss of the batch. Per batch:

1. PGD adversarial inputs x' against the **eval**-mode model at w, exactly as PGD-AT
   (:func:`robust_flat.training.pgd_at.adversarial_batch`, the first ``attack.fraction`` of the batch);
2. a **train**-mode forward/backward at w on x': the ascent gradient g, and the batch-norm statistics of this step;
3. the first-order worst case in the ball: eps = rho g / ||g|| (SAM), eps = rho T_w^2 g / ||T_w g|| (ASAM), over
   all parameters (one global norm, as both papers);
4. a train-mode forward/backward at w + eps on the same x'; its gradient is applied to w by the optimizer through
   :func:`robust_flat.training.update.gradient_update` (weight decay, clipping, EMA as for every method).

Batch-norm running statistics come from the pass at w (step 2) only; those of the pass at w + eps are discarded. The
statistics belong to the weights that are kept (w and its update), not to w + eps, which is thrown away after the
step; it is what the common PyTorch SAM implementations do (running statistics frozen during the second pass), and
it makes rho = 0 exactly the PGD-AT step (same inputs, same gradient, same statistics; tested). Both passes use the
same dropout key, so the perturbed loss is the same stochastic function of the weights. The adversarial inputs are
not recomputed at w + eps. A step costs the PGD-AT step plus one forward/backward.

Why not ``optax.contrib.sam``: it is an optimizer wrapping the run's optimizer, so it would replace the ``tx``
that every method shares (and its state in the checkpoints). In its default (transparent) mode it alternates ascent
and descent over two calls, i.e. two trainer steps per update, each with its own batch, batch-norm update and
learning-rate schedule tick. Its opaque mode runs the ascent inside ``tx.update`` through a ``grad_fn`` that returns
gradients only, so neither the pass's batch-norm statistics nor its loss come back and the shared update
(``gradient_update``) could not be used; and it has no adaptive (ASAM) ball. The perturbation itself is three lines
(:func:`sam_perturbation`).

Defaults: rho 0.05 (SAM; Foret et al.'s CIFAR value), rho 0.5 with ``adaptive`` (ASAM; Kwon et al.'s CIFAR value),
eta 0.01 (Kwon et al.).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from robust_flat.attacks.common import cross_entropy
from robust_flat.attacks.pgd import PGDConfig
from robust_flat.training.pgd_at import adversarial_batch, attack_config
from robust_flat.training.update import gradient_update, prepare_images, step_options
from robust_flat.weights.selection import path_string

RHO = {False: 0.05, True: 0.5}  # the papers' CIFAR radii: SAM (Foret et al.), ASAM (Kwon et al.)


def asam_scale(params, eta: float):
    """ASAM's T_w: ``|w| + eta`` for every leaf but biases (paths ending in ``bias``), which get 1."""
    return jax.tree_util.tree_map_with_path(
        lambda p, w: jnp.ones_like(w) if path_string(p).split("/")[-1] == "bias" else jnp.abs(w) + eta, params)


def sam_perturbation(params, grads, rho: float, adaptive: bool = False, eta: float = 0.01):
    """eps maximizing the first-order loss in the ball: ``rho g / ||g||`` (SAM; ``||eps|| = rho``), or with
    ``adaptive`` ``rho T^2 g / ||T g||`` with T = :func:`asam_scale` (ASAM; ``||eps / T|| = rho``). Norms are
    global over all leaves. A zero gradient gives eps = 0."""
    if adaptive:
        t = asam_scale(params, eta)
        tg = jax.tree.map(jnp.multiply, t, grads)
        norm = optax.tree.norm(tg)
        return jax.tree.map(lambda s, v: rho * s * v / (norm + 1e-12), t, tg)
    norm = optax.tree.norm(grads)
    return jax.tree.map(lambda g: rho * g / (norm + 1e-12), grads)


def train_step(state, batch, rng, *, apply_fn, tx, attack: PGDConfig, rho: float, adaptive: bool = False,
               eta: float = 0.01, fraction=1.0, augment=True, ema_decay=None, clip_weights=None):
    k_aug, k_att, k_drop = jax.random.split(rng, 3)  # as PGD-AT's step: rho = 0 is that step
    x = prepare_images(batch, k_aug, augment)
    y = batch["label"]
    x = adversarial_batch(state, x, y, k_att, apply_fn=apply_fn, attack=attack, fraction=fraction)

    def loss_at(params):
        logits, new_model_state = apply_fn(params, state.model_state, x, train=True, rng=k_drop)
        return jnp.mean(cross_entropy(logits, y)), new_model_state

    (loss_w, model_state), g = jax.value_and_grad(loss_at, has_aux=True)(state.params)
    eps = jax.lax.stop_gradient(sam_perturbation(state.params, g, rho, adaptive, eta))

    def loss_fn(params):
        perturbed = jax.tree.map(jnp.add, params, eps)
        logits, _ = apply_fn(perturbed, state.model_state, x, train=True, rng=k_drop)  # statistics discarded
        return jnp.mean(cross_entropy(logits, y)), (logits, model_state, {"batch_loss_at_w": loss_w})

    return gradient_update(state, loss_fn, y, tx=tx, ema_decay=ema_decay, clip_weights=clip_weights)


def make_step(config, apply_fn, tx):
    s = config.sam
    adaptive = bool(s.adaptive)
    rho = RHO[adaptive] if s.rho is None else float(s.rho)
    if rho < 0 or s.eta < 0:
        raise ValueError(f"SAM needs rho >= 0 and eta >= 0; got rho={rho}, eta={s.eta}")
    return functools.partial(train_step, apply_fn=apply_fn, tx=tx, attack=attack_config(config), rho=rho,
                             adaptive=adaptive, eta=float(s.eta), fraction=config.attack.fraction,
                             **step_options(config))
