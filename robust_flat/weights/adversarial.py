"""Adversarial weight perturbations: projected gradient ascent on nu in B_xi(w), alone or jointly with the inputs.

Weight-only (worst-case flatness of the clean loss) and joint weight+input (worst-case flatness of the robust
loss), as the paper defines them and the released code implements them. One iteration, from the current point
(nu, delta):

    g_nu, g_delta = grad of  sum_i mask_i * L(f(x_i + delta_i; w + nu), y_i)     (L = cross-entropy)
    nu    <- P_B( nu + lr * g_nu_l / ||g_nu_l|| * ||w_l|| )      per layer (paper eq. supp-normalization)
    delta <- P_box,eps( delta + step_size * sign(g_delta) )     (only with ``input_attack``)

Both are updated from gradients taken at the same point and both are projected every iteration (the paper and the
code). Differences to the released code, all documented choices (docs/paper-vs-code.md#joint-attack):

* the first gradient is taken at ``w + nu_0`` (the code's weight-only attack takes it at ``w``);
* ``delta_0`` is projected onto the box before the first forward (the code does not; our models clamp inputs to
  [0, 1] internally, so only the gradient through the clamp differs);
* ``best_iterate="last"`` (default; the code returns the last iterate, the paper does not say) or ``"best"`` (the
  iterate with the highest masked batch loss, the final one included);
* ``lr`` defaults to the paper's 0.001; the code uses 0.01 (``lr=0.01``; docs/paper-vs-code.md#worst-case-lr).
  With xi = 0.003 the paper's step is 1/3 of the radius, the code's step overshoots the radius every time (nu sits
  on the sphere).

``restarts`` here are per call (per batch): the restart with the highest masked mean loss is kept. The flatness
measure (:mod:`robust_flat.flatness`) instead runs restarts over the whole dataset and takes the max of the
dataset-mean losses (docs/paper-vs-code.md#worst-case-restarts), calling this with ``restarts=1``.

Pure functions on pytrees; ``logits_fn(params, model_state, x) -> logits`` (see
:func:`robust_flat.models.make_logits_fn`, eval-mode BN) is a static argument, ``params``/``model_state`` are traced.
Unselected leaves (BN, whitening, aux heads) are never perturbed.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp
from jax import lax

from robust_flat import xla
from robust_flat.attacks.common import check_inputs, get_loss, init_delta, normalize_gradient
from robust_flat.attacks.common import project as project_input
from robust_flat.attacks.pgd import PGDConfig
import robust_flat.weights.neighbourhood as nbh
import robust_flat.weights.random as wrandom
from robust_flat.weights.selection import check_selects_something

WEIGHT_INITS = ("uniform_norm", "ball", "sphere", "zero")


@dataclasses.dataclass(frozen=True)
class WeightAttackConfig:
    """Defaults: the paper's worst-case flatness attack (xi = 0.003 as in its tables, weight lr 0.001, 20 iterations,
    nu initialized uniform-in-norm in the ball as the code does). Set ``input_attack`` (a :class:`PGDConfig`) for the
    joint weight+input attack: its ``eps``, ``step_size``, ``norm``, ``init`` and ``normalized`` are used, while the
    iteration count is this config's ``steps`` (``input_attack.steps/restarts/best_iterate`` are ignored).
    """

    neighbourhood: nbh.Neighbourhood = nbh.Neighbourhood(xi=0.003)
    lr: float = 0.001
    steps: int = 20
    restarts: int = 1
    init: str = "uniform_norm"
    input_attack: Optional[PGDConfig] = None
    best_iterate: str = "last"
    loss: Union[str, Callable] = "ce"
    unroll: bool = True

    def __post_init__(self):
        if not self.lr > 0:
            raise ValueError(f"weight attack lr must be > 0, got {self.lr}")
        if self.steps < 0 or self.restarts < 1:
            raise ValueError(f"weight attack needs steps >= 0 and restarts >= 1, got {self.steps}, {self.restarts}")
        if self.init not in WEIGHT_INITS:
            raise ValueError(f"unknown weight init {self.init!r}; choose one of {', '.join(WEIGHT_INITS)}")
        if self.best_iterate not in ("last", "best"):
            raise ValueError(f"unknown best_iterate {self.best_iterate!r}; choose last or best")
        if self.input_attack is not None and not isinstance(self.input_attack, PGDConfig):
            raise ValueError("input_attack must be a PGDConfig or None")


def _tree_axpy(a, x, y):
    return jax.tree.map(lambda xi, yi: yi + (a * xi).astype(yi.dtype), x, y)


def init_nu(params, key, config: WeightAttackConfig):
    """nu_0 from ``config.init`` in the ball (zeros for ``"zero"``)."""
    if config.init == "zero":
        return nbh.zeros(params)
    return wrandom.sample(key, params, config.neighbourhood, config.init)


def init_input(x, key, config: WeightAttackConfig):
    """delta_0 from the input attack's init, projected onto the box and the eps-ball (None without input attack)."""
    ia = config.input_attack
    if ia is None:
        return None
    return project_input(init_delta(key, x, ia.eps, ia.norm, ia.init), x, ia.eps, ia.norm)


def init_state(params, x, key, config: WeightAttackConfig):
    """``(nu_0, delta_0)`` from one key (split into a weight key and an input key)."""
    k_nu, k_delta = jax.random.split(key)
    return init_nu(params, k_nu, config), init_input(x, k_delta, config)


def _ones_mask(x):
    return jnp.ones((x.shape[0],), jnp.float32)


def losses_at(logits_fn, params, model_state, nu, x, delta, y, config: WeightAttackConfig):
    """Per-example loss of ``f(x + delta; w + nu)`` (delta may be None)."""
    xin = x if delta is None else x + delta
    logits = logits_fn(nbh.perturb(params, nu, config.neighbourhood), model_state, xin)
    return get_loss(config.loss)(logits, y)


def step(logits_fn, params, model_state, nu, x, delta, y, mask, config: WeightAttackConfig):
    """One joint ascent step from ``(nu, delta)``. Returns ``(nu', delta', losses at (nu, delta))``."""
    nb = config.neighbourhood

    def objective(nu, delta):
        losses = losses_at(logits_fn, params, model_state, nu, x, delta, y, config)
        return jnp.sum(mask * losses), losses

    if delta is None:
        (_, losses), g_nu = jax.value_and_grad(objective, has_aux=True)(nu, None)
        g_delta = None
    else:
        (_, losses), (g_nu, g_delta) = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(nu, delta)
    nu = nbh.project(_tree_axpy(config.lr, nbh.normalize(g_nu, params, nb), nu), params, nb)
    if delta is not None:
        ia = config.input_attack
        direction = normalize_gradient(g_delta, ia.norm) if ia.normalized else g_delta
        delta = project_input(delta + ia.step_size * direction, x, ia.eps, ia.norm)
    return nu, delta, losses


def _select(better, a, b):
    return jax.tree.map(lambda u, v: jnp.where(better, u, v), a, b)


def _one_run(logits_fn, params, model_state, x, y, key, mask, config: WeightAttackConfig):
    nu, delta = init_state(params, x, key, config)
    track = config.best_iterate == "best"
    best = (nu, delta, jnp.asarray(-jnp.inf, jnp.float32))

    def body(carry):
        nu, delta, best = carry
        new_nu, new_delta, losses = step(logits_fn, params, model_state, nu, x, delta, y, mask, config)
        if track:
            score = jnp.sum(mask * losses)
            better = score > best[2]
            best = (_select(better, nu, best[0]), _select(better, delta, best[1]), jnp.maximum(score, best[2]))
        return new_nu, new_delta, best

    carry = (nu, delta, best)
    if config.unroll:
        for _ in range(config.steps):
            carry = body(carry)
    else:
        carry = lax.fori_loop(0, config.steps, lambda i, c: body(c), carry)
    nu, delta, best = carry
    need_score = track or config.restarts > 1
    if not need_score:
        return nu, delta, None
    score = jnp.sum(mask * losses_at(logits_fn, params, model_state, nu, x, delta, y, config))
    if track:
        better = score > best[2]
        nu, delta = _select(better, nu, best[0]), _select(better, delta, best[1])
        score = jnp.maximum(score, best[2])
    return nu, delta, score


def _weight_attack(logits_fn, params, model_state, x, y, key, config: WeightAttackConfig, mask=None):
    x = jnp.asarray(x)
    mask = _ones_mask(x) if mask is None else jnp.asarray(mask, jnp.float32)
    keys = jax.random.split(key, config.restarts)
    best = None
    for r in range(config.restarts):
        nu, delta, score = _one_run(logits_fn, params, model_state, x, y, keys[r], mask, config)
        if best is None:
            best = (nu, delta, score)
        else:
            better = score > best[2]
            best = (_select(better, nu, best[0]), _select(better, delta, best[1]), jnp.maximum(score, best[2]))
    nu, delta, _ = best
    nu = jax.tree.map(lax.stop_gradient, nu)
    x_adv = x if delta is None else lax.stop_gradient(x + delta)
    return nu, x_adv


_weight_attack_jit = xla.jit(_weight_attack, static_argnames=("logits_fn", "config"))


@functools.wraps(_weight_attack)
def weight_attack(logits_fn, params, model_state, x, y, key, config: WeightAttackConfig = WeightAttackConfig(),
                  mask=None):
    """``(nu, x_adv)``: the adversarial weight perturbation (in B_xi(params)) and, for the joint attack, the
    adversarial inputs (``x_adv = x`` without ``config.input_attack``). Jitted; ``mask`` (float [B], default ones)
    weights each example's loss (0 = padding). Use ``weight_attack.raw`` inside traced code."""
    ia = config.input_attack
    check_inputs(x, None if ia is None else ia.eps, "weight_attack")
    check_selects_something(params, config.neighbourhood.selection)
    return _weight_attack_jit(logits_fn, params, model_state, x, y, key, config=config, mask=mask)


weight_attack.raw = _weight_attack
