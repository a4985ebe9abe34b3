"""Entropy-SGD (Chaudhari et al. 2017) with PGD adversarial examples, as the paper trains it (L = 1: RErr 58.6%
vs AT's 62.8%; "avg" flatness).

Entropy-SGD descends the local entropy, a smoothed loss: an inner loop of L stochastic-gradient Langevin steps
explores the neighbourhood of w, and the outer step moves w towards the running average mu of those iterates.
One outer step consumes L + 1 mini-batches, each attacked with a fresh PGD-7 (eval-mode BN at the current iterate),
as in the released code (its Entropy-SGD optimizer is ported from ucla-vision/entropy-sgd):

* mini-batch 0: adversarial loss at w (train-mode forward: batch-norm statistics, reported as ``batch_loss``);
  its gradient is not used (the code computes and discards it);
* for i = 1..L, from w' = w and mu = w: the gradient of the train-mode adversarial loss at w' on mini-batch i,
  plus weight decay, then
  ``w' <- w' - eta' * (g + wd w' - gamma_t (w - w') + noise / sqrt(eta' / 2) * N(0, I))``,
  ``mu <- beta1 mu + (1 - beta1) w'``;
* outer step: the optimizer (SGD, momentum 0 as in the code, weight decay) is applied to w with the gradient
  ``w - mu``; gamma_t = gamma0 (1 + gamma1)^t with t the outer step.

Batch-norm statistics are updated by every train-mode forward, L + 1 per outer step, in order. Defaults (the code's;
the paper does not state them, docs/paper-vs-code.md#entropy-sgd): eta' = 0.1, beta1 = 0.75, noise 1e-4,
gamma0 = 1e-4, gamma1 = 1e-3, outer lr 0.05, weight decay 5e-4, momentum 0; 150 / L epochs with the usual milestones
at 2/5, 3/5, 4/5.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from robust_flat.attacks.common import cross_entropy
from robust_flat.attacks.pgd import PGDConfig
from robust_flat.training.pgd_at import adversarial_batch, attack_config
from robust_flat.training.update import apply_gradients, prepare_images, step_options


def _tree_normal(key, tree):
    # one draw for all leaves (as landscape's random directions): each random call compiles for seconds on XLA:CPU
    flat, unravel = ravel_pytree(tree)
    return unravel(jax.random.normal(key, flat.shape, flat.dtype))


def train_step(state, batch, rng, *, apply_fn, tx, attack: PGDConfig, L: int, gamma0: float, gamma1: float,
               langevin_lr: float, beta1: float, noise: float, weight_decay: float, augment=True, ema_decay=None,
               clip_weights=None):
    n = batch["label"].shape[0]
    if n % (L + 1):
        raise ValueError(f"Entropy-SGD with L = {L} needs a batch of L + 1 equal mini-batches, got {n} examples")
    m = n // (L + 1)
    k_aug, k_first, rng = jax.random.split(rng, 3)
    x_all = prepare_images(batch, k_aug, augment)
    y_all = batch["label"]

    def minibatch(i):
        return x_all[i * m:(i + 1) * m], y_all[i * m:(i + 1) * m]

    # mini-batch 0 at w: reported loss and a batch-norm update (its gradient is discarded, as in the code)
    k_att, k_drop = jax.random.split(k_first)
    x0, y0 = minibatch(0)
    x0 = adversarial_batch(state, x0, y0, k_att, apply_fn=apply_fn, attack=attack, fraction=1.0)
    logits0, model_state = apply_fn(state.params, state.model_state, x0, train=True, rng=k_drop)

    gamma = gamma0 * (1.0 + gamma1) ** state.step.astype(jnp.float32)
    w = state.params
    w_inner, mu, inner_losses = w, w, []
    noise_scale = noise / jnp.sqrt(0.5 * langevin_lr)
    for i in range(1, L + 1):
        k_att, k_drop, k_noise, rng = jax.random.split(rng, 4)
        xi, yi = minibatch(i)
        xi = adversarial_batch(state.replace(params=w_inner, model_state=model_state), xi, yi, k_att,
                               apply_fn=apply_fn, attack=attack, fraction=1.0)

        def loss_fn(params, model_state=model_state, xi=xi, yi=yi, k_drop=k_drop):
            logits, new_model_state = apply_fn(params, model_state, xi, train=True, rng=k_drop)
            return jnp.mean(cross_entropy(logits, yi)), new_model_state

        (loss_i, model_state), g = jax.value_and_grad(loss_fn, has_aux=True)(w_inner)
        eta = _tree_normal(k_noise, w_inner)
        w_inner = jax.tree.map(
            lambda wi, gi, wc, e: wi - langevin_lr * (gi + weight_decay * wi - gamma * (wc - wi) + noise_scale * e),
            w_inner, g, w, eta)
        mu = jax.tree.map(lambda a, b: beta1 * a + (1.0 - beta1) * b, mu, w_inner)
        inner_losses.append(loss_i)

    grads = jax.tree.map(jnp.subtract, w, mu)
    new_state = apply_gradients(state, grads, model_state, tx, ema_decay, clip_weights)
    metrics = {"batch_loss": jnp.mean(cross_entropy(logits0, y0)),
               "batch_error": jnp.mean(jnp.argmax(logits0, -1) != y0),
               "grad_norm": optax.tree.norm(grads),
               "batch_langevin_loss": jnp.mean(jnp.stack(inner_losses)), "gamma": gamma}
    return new_state, metrics


def make_step(config, apply_fn, tx):
    e = config.esgd
    if int(e.L) < 1:
        raise ValueError(f"Entropy-SGD needs L >= 1 Langevin steps, got {e.L}")
    if int(config.train.get("batches_per_step", 1)) != int(e.L) + 1:
        raise ValueError(f"Entropy-SGD with L = {e.L} consumes L + 1 mini-batches per step: set "
                         f"train.batches_per_step = {int(e.L) + 1} (experiments/configs/entropy_sgd.py does)")
    return functools.partial(train_step, apply_fn=apply_fn, tx=tx, attack=attack_config(config), L=int(e.L),
                             gamma0=float(e.gamma0), gamma1=float(e.gamma1), langevin_lr=float(e.langevin_lr),
                             beta1=float(e.beta1), noise=float(e.noise),
                             weight_decay=float(config.optimizer.weight_decay), **step_options(config))
