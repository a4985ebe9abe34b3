"""Projected gradient descent (Madry et al.) as the paper uses it (and as the released code implements it).

Per restart: random start (``uniform_norm`` by default, as in the code), then for i = 0..T: project onto the
[0, 1] box and the eps-ball, forward, keep the per-example best iterate (highest loss, the initial point included),
and, for i < T, a signed (L-inf) or L2-normalized ascent step. T + 1 forwards, T backwards. Across restarts the
per-example worst case (highest loss) is kept. Loops are unrolled by default: on XLA:CPU a rolled ``fori_loop`` is
2-5x slower (measured); set ``unroll=False`` for long attacks where compile time matters.

PGD-tau (``tau``, the paper's early-stopped training attack, tau in 0, 1, 2, 3; off by default): an example stops
tau iterations after its label flipped. Its iterates are counted while it is misclassified; at its (tau + 1)-th
misclassified iterate it stops and that iterate is returned (tau = 0: the first misclassified iterate). An example
that never gets there (never misclassified, or too few steps) returns what plain PGD returns, so tau > ``steps``
is plain PGD. The released code differs for those examples (docs/paper-vs-code.md#pgd-tau).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp
from jax import lax

from robust_flat.attacks.common import (check_threat_model, get_loss, init_delta, jit_attack, normalize_gradient,
                                        project)


PAPER_EPS = 8 / 255  # the paper's radius; its PGD step 0.007 belongs to it
PAPER_STEP = 0.007
STEP_RULES = ("scaled", "fixed")


def step_size_for(eps: float, rule: str = "scaled", step_size: float = PAPER_STEP) -> float:
    """The PGD step at radius ``eps``: the one rule of training (``attack.step_rule``) and every measurement
    (``--pgd-step-rule`` of the entry points). ``scaled`` reads ``step_size`` as the step at eps = 8/255 and returns
    ``step_size x eps / (8/255)``, so PGD-k covers the same share of the ball at every radius (0.0035 at 4/255);
    ``fixed`` returns ``step_size`` whatever eps, as the released code does (docs/paper-vs-code.md#larger-eps). At
    8/255 both give the paper's 0.007."""
    if rule not in STEP_RULES:
        raise ValueError(f"unknown PGD step rule {rule!r}; choose one of {', '.join(STEP_RULES)}")
    return step_size * eps / PAPER_EPS if rule == "scaled" else step_size


@dataclasses.dataclass(frozen=True)
class PGDConfig:
    """Defaults are the paper's training attack: L-inf eps 8/255, 7 signed steps of 0.007, random start.

    ``best_iterate``: ``"example"`` (paper), ``"batch"`` (one iteration for the whole batch by summed loss, as the
    code's TRADES KL objective does) or ``"last"``. ``restart_selection``: ``"loss"`` (paper: max loss per example)
    or ``"confidence"`` (code/notebook: max wrong-class probability per example;
    docs/paper-vs-code.md#reference-restarts).
    """

    eps: float = 8 / 255
    step_size: float = 0.007
    steps: int = 7
    norm: str = "linf"
    init: str = "uniform_norm"
    normalized: bool = True
    restarts: int = 1
    best_iterate: str = "example"
    restart_selection: str = "loss"
    loss: Union[str, Callable] = "ce"
    unroll: bool = True
    tau: Optional[int] = None

    def __post_init__(self):
        check_threat_model("PGD", self.eps, self.norm)
        if self.steps < 0 or self.restarts < 1:
            raise ValueError(f"PGD needs steps >= 0 and restarts >= 1, got {self.steps}, {self.restarts}")
        if self.best_iterate not in ("example", "batch", "last"):
            raise ValueError(f"unknown best_iterate {self.best_iterate!r}")
        if self.restart_selection not in ("loss", "confidence"):
            raise ValueError(f"unknown restart_selection {self.restart_selection!r}")
        if self.tau is not None and (self.tau < 0 or self.loss != "ce" or self.best_iterate != "example"):
            raise ValueError(f"PGD-tau needs tau >= 0 with the cross-entropy loss and per-example best iterates, "
                             f"got tau={self.tau}, loss={self.loss!r}, best_iterate={self.best_iterate!r}")


def _select(mask, a, b):
    return jnp.where(mask.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)


def _one_run(logits_fn, x, y, key, config: PGDConfig):
    loss_fn = get_loss(config.loss)

    def objective(delta):
        logits = logits_fn(x + delta)
        losses = loss_fn(logits, y)
        return jnp.sum(losses), (losses, logits)

    grad_fn = jax.value_and_grad(objective, has_aux=True)
    delta = project(init_delta(key, x, config.eps, config.norm, config.init), x, config.eps, config.norm)
    best_delta = delta
    best_loss = jnp.full((x.shape[0],), -jnp.inf, jnp.float32)
    # PGD-tau: misclassified iterates still to count, whether stopped, and the iterate (and loss) it stopped at
    stop = (jnp.full((x.shape[0],), config.tau or 0, jnp.int32), jnp.zeros((x.shape[0],), bool), delta, best_loss)

    def early_stop(stop, delta, losses, logits):
        if config.tau is None:
            return stop
        remaining, stopped, stop_delta, stop_loss = stop
        wrong = (jnp.argmax(logits, -1) != y) & ~stopped
        now = wrong & (remaining == 0)
        return (jnp.where(wrong & ~now, remaining - 1, remaining), stopped | now, _select(now, delta, stop_delta),
                jnp.where(now, losses, stop_loss))

    def track(best_delta, best_loss, delta, losses):
        if config.best_iterate == "last":
            return delta, losses
        if config.best_iterate == "batch":
            better = jnp.broadcast_to(jnp.sum(losses) > jnp.sum(best_loss), losses.shape)
        else:
            better = losses > best_loss
        return _select(better, delta, best_delta), jnp.where(better, losses, best_loss)

    def step(carry, _=None):
        delta, best_delta, best_loss, stop = carry
        (_, (losses, logits)), g = grad_fn(delta)
        best_delta, best_loss = track(best_delta, best_loss, delta, losses)
        stop = early_stop(stop, delta, losses, logits)
        direction = normalize_gradient(g, config.norm) if config.normalized else g
        delta = project(delta + config.step_size * direction, x, config.eps, config.norm)
        return delta, best_delta, best_loss, stop

    carry = (delta, best_delta, best_loss, stop)
    if config.unroll:
        for _ in range(config.steps):
            carry = step(carry)
    else:
        carry = lax.fori_loop(0, config.steps, lambda i, c: step(c), carry)
    delta, best_delta, best_loss, stop = carry
    _, (losses, logits) = objective(delta)  # the last iterate: forward only
    best_delta, best_loss = track(best_delta, best_loss, delta, losses)
    if config.tau is not None:
        _, stopped, stop_delta, stop_loss = early_stop(stop, delta, losses, logits)
        best_delta, best_loss = _select(stopped, stop_delta, best_delta), jnp.where(stopped, stop_loss, best_loss)
    return best_delta, best_loss


def _pgd(logits_fn, x, y, key, config: PGDConfig):
    x = jnp.asarray(x)
    keys = jax.random.split(key, config.restarts)
    best_delta, best_score = None, None
    for r in range(config.restarts):
        delta, loss = _one_run(logits_fn, x, y, keys[r], config)
        if config.restarts == 1:
            best_delta = delta
            break
        if config.restart_selection == "confidence":
            probs = jax.nn.softmax(logits_fn(x + delta).astype(jnp.float32))
            probs = probs.at[jnp.arange(x.shape[0]), y].set(-1.0)
            score = jnp.max(probs, axis=1)
        else:
            score = loss
        if best_delta is None:
            best_delta, best_score = delta, score
        else:
            better = score > best_score
            best_delta = _select(better, delta, best_delta)
            best_score = jnp.where(better, score, best_score)
    return lax.stop_gradient(x + best_delta)


pgd = jit_attack(_pgd)
pgd.__doc__ = """``pgd(logits_fn, x, y, key, config) -> x_adv`` (jitted; see :class:`PGDConfig`).

Inside other traced code (a train step) call ``pgd.raw`` to skip the concrete-input check."""
