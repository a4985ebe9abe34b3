"""Auto-PGD (Croce & Hein, ICML 2020): APGD-CE, APGD-DLR and APGD-T, as in the released code.

Written from ``fra31/auto-attack:autoattack/autopgd_base.py`` (``APGDAttack``, ``APGDAttack_targeted``; installed
here as ``pyautoattack``) for the L-inf and L2 threat models. Per run (one restart, or one target class):

* start: L-inf ``x + eps * t / ||t||_inf`` with ``t ~ U[-1, 1]^D``; L2 ``x + eps * g / ||g||_2`` with ``g ~ N(0, I)``;
  then clipped to [0, 1]. The loss, its gradient and the prediction at the start point initialize the best loss
  and the "still robust" flag of the run;
* ``n_iter`` iterations of step ``z = P(x_k + eta * dir(grad))`` (``dir`` = sign for L-inf, unit-L2 gradient for
  L2) and momentum ``x_{k+1} = P(x_k + a (z - x_k) + (1 - a)(x_k - x_{k-1}))`` with ``a = 1`` in the first
  iteration and ``a = momentum = 0.75`` afterwards. ``P``: the ball, then the [0, 1] box. The initial step size is
  ``eta = 2 eps`` per example;
* per example, the point with the highest loss (and its gradient) is kept; every misclassified iterate is stored as
  the adversarial example (so the last misclassified one is returned);
* checkpoints: the first after ``int(0.22 n_iter)`` iterations, then windows shrinking by
  ``int(0.03 n_iter)`` down to ``int(0.06 n_iter)`` (each at least 1). For ``n_iter = 100``: after iterations
  22, 41, 57, 70, 80, 87, 93, 99. At a checkpoint the step size of an example is halved, and its iterate and gradient
  are reset to its best point, when (1) its loss increased in at most ``rho * h`` of the ``h`` steps of the window
  (``rho = 0.75``), or (2) its step size was not halved at the previous checkpoint and its best loss has not
  improved since then.

Restarts (``n_restarts``) and target classes run one after the other, each only on the points that are still
robust (fooled points keep their first adversarial example); points misclassified on the clean input are not
attacked. Points never fooled are returned unchanged (``x``), as in the original.

APGD-T (``targeted=True``): for the 2nd, 3rd, ... ``(n_target_classes + 1)``-th largest clean logit as target, the
targeted DLR loss ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)``, ``n_restarts`` runs per target.

Paper vs code (``checkpoint_rule``). ``"code"`` (default) reproduces the released code: condition (1) is
``count <= rho * h``, and the first window compares the first iterate's loss with 0 (a zero-initialized buffer
wraps around) instead of with the start point's loss. ``"paper"``: Algorithm 1 of the paper, ``count < rho * h``
with the start point as reference.

Loop structure (``loop``). XLA:CPU runs a convolution's forward/backward inside a ``while`` loop (any rolled
``lax.scan``/``fori_loop``, whatever its ``unroll`` factor, and ``lax.cond`` bodies inside one) 5-7x slower than the
same ops outside a loop (measured: small CNN, batch 64, APGD-CE 20 iterations: 42-46 s as a scan with unroll 1, 4 or
20, vs 6-8 s for the same iterations outside a loop, the time of an unrolled PGD-20).
Unrolling all 100 iterations into one program avoids that but compiles for minutes. So ``loop="host"`` (the default
on CPU through ``"auto"``) drives restarts/targets and chunks of ``unroll`` iterations from Python, each chunk one
compiled, Python-unrolled program (one compile per chunk length, ~5 forward/backward passes for the default 5; the
loop state stays on the device, and the host syncs once per run to skip runs with no point left). ``loop="scan"``
(default elsewhere) is one traceable function: a rolled ``lax.scan`` over the runs (``lax.cond`` skips a run with
no point left) around a ``lax.scan`` over the iterations with the given ``unroll``; ``apgd.raw`` is that version.
Both give the same result. Per-iteration constants (momentum weight, checkpoint flag, window length) are inputs of
the compiled step, and the increase counter of condition (1) is a running per-example count reset at each
checkpoint, so no loss history is kept.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from robust_flat import xla
from robust_flat.attacks.common import (bucket_size, check_inputs, check_threat_model, cross_entropy, dlr_loss,
                                       jit_attack, jit_logits_fn)


@dataclasses.dataclass(frozen=True)
class APGDConfig:
    """APGD settings; the defaults are AutoAttack's APGD-CE (L-inf, eps 8/255, 100 iterations, 1 restart).

    ``loss``: ``"ce"`` or ``"dlr"`` (untargeted). ``targeted=True`` runs APGD-T (targeted DLR, ``loss`` must be
    ``"dlr"``) over ``n_target_classes`` target classes. ``rho``: threshold of checkpoint condition (1);
    ``momentum``: weight ``a`` of the new step; ``step_size``: initial step as a multiple of eps (2 for L-inf and L2
    in the code). ``checkpoint_rule``: ``"code"`` (released code) or ``"paper"`` (see module docstring).
    ``loop``: ``"host"`` (Python loop over compiled chunks of ``unroll`` iterations; fast on CPU), ``"scan"`` (one
    traceable program, ``lax.scan`` with unroll factor ``unroll``) or ``"auto"`` (host on CPU, scan elsewhere).
    ``shape_buckets`` (host loop only): every run attacks only the points still robust, gathered into the smallest
    of ``shape_buckets`` sizes (B x 1, 3/4, 1/2, 3/8, ...: ``attacks.common.bucket_sizes``) that holds them, as
    the original subsets its batch to the points it still has to attack; at most ``shape_buckets`` compiles per
    input shape, 1 = always the full batch.
    ``unroll``, ``loop`` and ``shape_buckets`` affect speed and compile time only, not results (up to float
    rounding that can differ between batch shapes).
    """

    eps: float = 8 / 255
    norm: str = "linf"
    n_iter: int = 100
    n_restarts: int = 1
    loss: str = "ce"
    targeted: bool = False
    n_target_classes: int = 9
    rho: float = 0.75
    momentum: float = 0.75
    step_size: float = 2.0
    checkpoint_rule: str = "code"
    unroll: int = 5
    loop: str = "auto"
    shape_buckets: int = 6

    def __post_init__(self):
        check_threat_model("APGD", self.eps, self.norm)
        if self.n_iter < 1 or self.n_restarts < 1:
            raise ValueError(f"APGD needs n_iter >= 1 and n_restarts >= 1, got {self.n_iter}, {self.n_restarts}")
        if self.loss not in ("ce", "dlr"):
            raise ValueError(f"unknown APGD loss {self.loss!r}; choose ce or dlr")
        if self.targeted and self.loss != "dlr":
            raise ValueError("targeted APGD (APGD-T) uses the targeted DLR loss: set loss='dlr'")
        if self.targeted and self.n_target_classes < 1:
            raise ValueError(f"APGD-T needs n_target_classes >= 1, got {self.n_target_classes}")
        if not 0 < self.rho <= 1 or not 0 < self.momentum <= 1 or not self.step_size > 0:
            raise ValueError("APGD needs 0 < rho <= 1, 0 < momentum <= 1 and step_size > 0")
        if self.checkpoint_rule not in ("code", "paper"):
            raise ValueError(f"unknown checkpoint_rule {self.checkpoint_rule!r}; choose code or paper")
        if self.unroll < 1:
            raise ValueError(f"unroll must be >= 1, got {self.unroll}")
        if self.shape_buckets < 1:
            raise ValueError(f"shape_buckets must be >= 1, got {self.shape_buckets}")
        if self.loop not in ("auto", "host", "scan"):
            raise ValueError(f"unknown loop {self.loop!r}; choose auto, host or scan")

    @property
    def n_runs(self) -> int:
        return self.n_restarts * (self.n_target_classes if self.targeted else 1)


def checkpoint_schedule(n_iter: int) -> list[tuple[int, int]]:
    """``[(iteration index i, window length h), ...]``: after iteration ``i`` (0-based) the step sizes are checked."""
    first = max(int(0.22 * n_iter), 1)
    smallest = max(int(0.06 * n_iter), 1)
    decrease = max(int(0.03 * n_iter), 1)
    checks, h, count = [], first, 0
    for i in range(n_iter):
        count += 1
        if count == h:
            checks.append((i, h))
            h, count = max(h - decrease, smallest), 0
    return checks


def targeted_dlr_loss(logits, y, y_target):
    """Targeted DLR loss of APGD-T; larger is more adversarial (closer to predicting ``y_target``)."""
    logits = logits.astype(jnp.float32)
    srt = jnp.sort(logits, axis=1)
    z_y = jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
    z_t = jnp.take_along_axis(logits, y_target[:, None], axis=1)[:, 0]
    return -(z_y - z_t) / (srt[:, -1] - 0.5 * (srt[:, -3] + srt[:, -4]) + 1e-12)


def _bcast(v, like):
    return v.reshape((-1,) + (1,) * (like.ndim - 1))


def _l2(v):
    return jnp.sqrt(jnp.sum(v.reshape(v.shape[0], -1) ** 2, axis=1))


def _linf(v):
    return jnp.max(jnp.abs(v.reshape(v.shape[0], -1)), axis=1)


def _project(x_new, x, eps, norm):
    """The code's projection: onto the eps-ball around ``x``, then into the [0, 1] box."""
    if norm == "linf":
        return jnp.clip(jnp.clip(x_new, x - eps, x + eps), 0.0, 1.0)
    d = x_new - x
    n = _l2(d)
    return jnp.clip(x + d / _bcast(n + 1e-12, d) * _bcast(jnp.minimum(eps, n), d), 0.0, 1.0)


def _start(key, x, eps, norm):
    """The original's random start (see module docstring), clipped to [0, 1]."""
    if norm == "linf":
        t = jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0)
        d = t / _bcast(_linf(t) + 1e-12, t)
    else:
        t = jax.random.normal(key, x.shape, x.dtype)
        d = t / _bcast(_l2(t) + 1e-12, t)
    return jnp.clip(x + eps * d, 0.0, 1.0)


def _iteration_constants(config: APGDConfig):
    """Per-iteration momentum weight, checkpoint flag and window length (static numpy arrays)."""
    n = config.n_iter
    a = np.full((n,), config.momentum, np.float32)
    a[0] = 1.0
    is_check = np.zeros((n,), bool)
    window = np.ones((n,), np.float32)
    for i, h in checkpoint_schedule(n):
        is_check[i], window[i] = True, h
    return a, is_check, window


def _select(mask, a, b):
    return jnp.where(_bcast(mask, a), a, b)


def _losses(logits, y, y_target, config: APGDConfig):
    if config.targeted:
        return targeted_dlr_loss(logits, y, y_target)
    if config.loss == "dlr":
        return dlr_loss(logits, y)
    return cross_entropy(logits, y)


def _loss_and_grad(logits_fn, x_adv, y, y_target, config: APGDConfig):
    """Per-example losses, logits, and the gradient of the summed loss with respect to ``x_adv``."""

    def total(x_adv):
        logits = logits_fn(x_adv)
        losses = _losses(logits, y, y_target, config)
        return jnp.sum(losses), (losses, logits)

    (_, (losses, logits)), grad = jax.value_and_grad(total, has_aux=True)(x_adv)
    return losses, logits, grad


def _init_carry(logits_fn, x, y, x_start, y_target, attack_mask, config: APGDConfig) -> dict:
    """The state of a run after evaluating its start point."""
    loss, logits, grad = _loss_and_grad(logits_fn, x_start, y, y_target, config)
    robust = (jnp.argmax(logits, axis=1) == y) & attack_mask
    zeros = jnp.zeros((x.shape[0],), jnp.float32)
    return dict(x_adv=x_start, x_old=x_start, grad=grad, step=jnp.full_like(zeros, config.step_size * config.eps),
                x_best=x_start, grad_best=grad, loss_best=loss, x_best_adv=x_start, robust=robust,
                prev_loss=loss if config.checkpoint_rule == "paper" else zeros, n_increase=zeros,
                best_at_check=loss, reduced_at_check=jnp.ones((x.shape[0],), bool), start_loss=loss)


def _direction(g, norm):
    if norm == "linf":
        return jnp.sign(g)
    return g / _bcast(_l2(g) + 1e-12, g)


def _iterate(logits_fn, x, y, y_target, c: dict, consts, config: APGDConfig):
    """One APGD iteration (step, momentum, evaluation, bookkeeping, checkpoint where ``is_check``)."""
    a, is_check, window = consts
    eps, norm = config.eps, config.norm
    x_cur = c["x_adv"]
    velocity = x_cur - c["x_old"]
    stepped = _project(x_cur + _bcast(c["step"], x_cur) * _direction(c["grad"], norm), x, eps, norm)
    x_new = _project(x_cur + (stepped - x_cur) * a + velocity * (1.0 - a), x, eps, norm)
    loss, logits, grad = _loss_and_grad(logits_fn, x_new, y, y_target, config)
    wrong = jnp.argmax(logits, axis=1) != y
    better = loss > c["loss_best"]
    x_best = _select(better, x_new, c["x_best"])
    grad_best = _select(better, grad, c["grad_best"])
    loss_best = jnp.where(better, loss, c["loss_best"])
    n_increase = c["n_increase"] + (loss > c["prev_loss"]).astype(jnp.float32)
    # checkpoint (acts only where is_check; elementwise, cheap next to the forward/backward pass)
    if config.checkpoint_rule == "code":
        oscillating = n_increase <= window * config.rho
    else:
        oscillating = n_increase < window * config.rho
    stalled = ~c["reduced_at_check"] & (c["best_at_check"] >= loss_best)
    reduce = is_check & (oscillating | stalled)
    new = dict(
        x_adv=_select(reduce, x_best, x_new), x_old=x_cur, grad=_select(reduce, grad_best, grad),
        step=jnp.where(reduce, c["step"] / 2.0, c["step"]), x_best=x_best, grad_best=grad_best,
        loss_best=loss_best, x_best_adv=_select(wrong, x_new, c["x_best_adv"]), robust=c["robust"] & ~wrong,
        prev_loss=loss, n_increase=jnp.where(is_check, 0.0, n_increase),
        best_at_check=jnp.where(is_check, loss_best, c["best_at_check"]),
        reduced_at_check=jnp.where(is_check, oscillating | stalled, c["reduced_at_check"]),
        start_loss=c["start_loss"])
    return new, (loss_best, loss)


def _chunk(logits_fn, x, y, y_target, carry, consts, config: APGDConfig):
    """``len(consts[0])`` iterations, unrolled in Python (no XLA loop); returns the carry and their traces."""
    best, losses = [], []
    for j in range(consts[0].shape[0]):
        carry, (b, l) = _iterate(logits_fn, x, y, y_target, carry, tuple(c[j] for c in consts), config)
        best.append(b)
        losses.append(l)
    return carry, jnp.stack(best), jnp.stack(losses)


def single_run(logits_fn, x, y, x_start, y_target, attack_mask, config: APGDConfig) -> dict:
    """One APGD run from ``x_start``: the original's ``attack_single_run(x, y, x_init)``.

    ``y_target`` is used only when ``config.targeted``; ``attack_mask`` marks the points this run may fool.
    Returns a dict: ``fooled`` [B] (attacked and misclassified at some iterate), ``x_best_adv`` (the last
    misclassified iterate, else the start), ``x_best`` and ``loss_best`` (highest-loss point), ``trace_best`` and
    ``trace_loss`` [n_iter + 1, B] (index 0: the start point). Follows ``config.loop``: with the host loop it is
    not traceable; :func:`single_run_scan` always is.
    """
    if _use_host_loop(config):
        return _single_run_host(logits_fn, x, y, x_start, y_target, attack_mask, config)
    return single_run_scan(logits_fn, x, y, x_start, y_target, attack_mask, config)


def single_run_scan(logits_fn, x, y, x_start, y_target, attack_mask, config: APGDConfig) -> dict:
    """:func:`single_run` as one ``lax.scan`` over the iterations (traceable)."""
    carry = _init_carry(logits_fn, x, y, x_start, y_target, attack_mask, config)
    consts = tuple(jnp.asarray(v) for v in _iteration_constants(config))
    carry, (trace_best, trace_loss) = lax.scan(
        lambda c, k: _iterate(logits_fn, x, y, y_target, c, k, config), carry, consts,
        unroll=min(config.unroll, config.n_iter))
    return _result(carry, attack_mask, trace_best, trace_loss)


def _result(carry, attack_mask, trace_best, trace_loss, xp=jnp) -> dict:
    """``xp=np`` on the host path: the traces are joined in numpy, so no eager op compiles per ``n_iter``."""
    start = xp.asarray(carry["start_loss"])[None]
    return dict(fooled=attack_mask & ~xp.asarray(carry["robust"]), x_best_adv=carry["x_best_adv"], x_best=carry["x_best"],
                loss_best=carry["loss_best"], trace_best=xp.concatenate([start, trace_best]),
                trace_loss=xp.concatenate([start, trace_loss]))


def _prepare(logits_fn, x, y, config: APGDConfig):
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.int32)
    if x.ndim < 2 or y.shape != (x.shape[0],):
        raise ValueError(f"APGD needs x [B, ...] and y [B], got {x.shape} and {y.shape}")
    return x, y


def _check_classes(n_classes: int, config: APGDConfig):
    if config.targeted and config.n_target_classes + 1 > n_classes:
        raise ValueError(f"APGD-T with {config.n_target_classes} target classes needs more than "
                         f"{config.n_target_classes} classes, the model has {n_classes}")
    if (config.targeted and n_classes < 4) or (config.loss == "dlr" and n_classes < 3):
        raise ValueError(f"the {'targeted ' if config.targeted else ''}DLR loss needs at least "
                         f"{4 if config.targeted else 3} classes, the model has {n_classes}")


def _clean(logits_fn, x, y):
    """Clean correctness and the classes sorted by clean logit (ascending): APGD-T's targets."""
    logits = logits_fn(x)
    return jnp.argmax(logits, axis=1) == y, jnp.argsort(logits, axis=1)


def _run_targets(config: APGDConfig) -> np.ndarray:
    """Target index (0 = runner-up class) of every run; restarts of one target are consecutive."""
    return np.repeat(np.arange(config.n_target_classes if config.targeted else 1), config.n_restarts)


def _apgd_scan(logits_fn, x, y, key, config: APGDConfig):
    """The whole attack in one traceable function: restarts/targets in a rolled ``lax.scan``, each run a scan."""
    x, y = _prepare(logits_fn, x, y, config)
    robust, order = _clean(logits_fn, x, y)
    n_classes = order.shape[-1]
    _check_classes(n_classes, config)
    keys = jax.random.split(key, config.n_runs)
    empty_trace = jnp.zeros((config.n_iter + 1, x.shape[0]), jnp.float32)

    def one_run(c, inputs):
        robust, x_adv = c
        run_key, target_index = inputs
        y_target = lax.dynamic_index_in_dim(order, n_classes - 2 - target_index, axis=1, keepdims=False)

        def attack(_):
            r = single_run_scan(logits_fn, x, y, _start(run_key, x, config.eps, config.norm), y_target, robust,
                                config)
            return r["fooled"], r["x_best_adv"], r["trace_best"], r["trace_loss"]

        def skip(_):
            return jnp.zeros_like(robust), x, empty_trace, empty_trace

        fooled, x_run, trace_best, trace_loss = lax.cond(jnp.any(robust), attack, skip, None)
        return (robust & ~fooled, _select(fooled, x_run, x_adv)), (trace_best, trace_loss)

    (_, x_adv), (trace_best, trace_loss) = lax.scan(one_run, (robust, x), (keys, jnp.asarray(_run_targets(config))))
    return lax.stop_gradient(x_adv), trace_best, trace_loss


# --------------------------------------------------------------------------- host loop over compiled chunks


def _core(config: APGDConfig) -> APGDConfig:
    """The fields a single iteration depends on (fewer distinct configs, fewer compiles)."""
    return dataclasses.replace(config, n_iter=1, n_restarts=1, n_target_classes=1, unroll=1, shape_buckets=1)


def _iterate_chunks(logits_fn, x, y, y_target, carry, config: APGDConfig):
    """All ``n_iter`` iterations from ``carry``, as compiled chunks of ``unroll``; returns carry and traces (numpy:
    joining them with ``jnp`` would compile an eager concatenate for every ``n_iter``)."""
    consts = _iteration_constants(config)
    bounds = list(range(0, config.n_iter, config.unroll)) + [config.n_iter]
    best, losses = [], []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        chunk_consts = tuple(jnp.asarray(c[lo:hi]) for c in consts)
        carry, b, l = _chunk_jit(logits_fn, x, y, y_target, carry, chunk_consts, config=_core(config))
        best.append(b)
        losses.append(l)
    return carry, np.concatenate(best), np.concatenate(losses)


def _single_run_host(logits_fn, x, y, x_start, y_target, attack_mask, config: APGDConfig) -> dict:
    carry = _init_from_jit(logits_fn, x, y, x_start, y_target, attack_mask, config=_core(config))
    carry, best, losses = _iterate_chunks(logits_fn, x, y, y_target, carry, config)
    return _result(carry, attack_mask, best, losses, xp=np)


_clean_jit = jit_logits_fn(lambda logits_fn, x, y, config: _clean(logits_fn, x, y))
_init_from_jit = jit_logits_fn(_init_carry)
_chunk_jit = jit_logits_fn(_chunk)
_start_jit = xla.jit(lambda key, x, config: _start(key, x, config.eps, config.norm), static_argnames=("config",))


def _apgd_host(logits_fn, x, y, key, config: APGDConfig):
    """Same result as :func:`_apgd_scan`; runs and chunks of ``unroll`` iterations are driven from Python, each run
    on the points still robust only (gathered into a bucket size, see ``APGDConfig.shape_buckets``)."""
    x, y = _prepare(logits_fn, x, y, config)
    core = _core(config)
    robust, order = _clean_jit(logits_fn, x, y, config=core)
    n_classes = order.shape[-1]
    _check_classes(n_classes, config)
    keys = jax.random.split(key, config.n_runs)
    n = x.shape[0]
    x_np, y_np = np.asarray(x), np.asarray(y)
    robust, order = np.asarray(robust), np.asarray(order)
    x_adv, traces_best, traces_loss = x_np.copy(), [], []
    for run, target_index in enumerate(_run_targets(config)):
        idx = np.flatnonzero(robust)
        best_full = np.zeros((config.n_iter + 1, n), np.float32)
        loss_full = np.zeros((config.n_iter + 1, n), np.float32)
        if len(idx):
            y_target = order[:, n_classes - 2 - int(target_index)]
            # the start points of the whole batch (as the scan version draws them), then the robust rows only
            x_start = np.asarray(_start_jit(keys[run], x, config=core))
            size = bucket_size(len(idx), n, config.shape_buckets)
            if size < n:  # padded with copies of the first robust point, masked out
                rows, mask = np.concatenate([idx, np.full(size - len(idx), idx[0])]), np.arange(size) < len(idx)
            else:
                rows, mask = np.arange(n), robust
            res = _single_run_host(logits_fn, x_np[rows], y_np[rows], x_start[rows], y_target[rows], mask, config)
            real = slice(0, len(idx)) if size < n else idx
            fooled = res["fooled"][real]
            x_adv[idx[fooled]] = np.asarray(res["x_best_adv"])[real][fooled]
            robust = robust.copy()
            robust[idx[fooled]] = False
            best_full[:, idx] = res["trace_best"][:, real]
            loss_full[:, idx] = res["trace_loss"][:, real]
        traces_best.append(best_full)
        traces_loss.append(loss_full)
    x_adv = jnp.asarray(x_adv)
    return x_adv, jax.device_put(np.stack(traces_best)), jax.device_put(np.stack(traces_loss))  # no per-shape compile


def _use_host_loop(config: APGDConfig) -> bool:
    if config.loop == "auto":
        return jax.default_backend() == "cpu"
    return config.loop == "host"


def _public(with_trace: bool):
    scan = jit_attack(_apgd_scan)

    def run(logits_fn, x, y, key, config: APGDConfig):
        if _use_host_loop(config):
            check_inputs(x, config.eps, "apgd")
            out = _apgd_host(logits_fn, x, y, key, config)
        else:
            out = scan(logits_fn, x, y, key, config)
        return out if with_trace else out[0]

    run.raw = (lambda *a: _apgd_scan(*a)) if with_trace else (lambda *a: _apgd_scan(*a)[0])
    return run


apgd = _public(with_trace=False)
apgd.__doc__ = """``apgd(logits_fn, x, y, key, config) -> x_adv`` (see :class:`APGDConfig`).

Points fooled in some run get their adversarial example, all others are returned unchanged. ``apgd.raw`` is the
traceable single-function version (``lax.scan`` loops), for use inside other jitted code."""

apgd_with_trace = _public(with_trace=True)
apgd_with_trace.__doc__ = """``apgd_with_trace(logits_fn, x, y, key, config) -> (x_adv, best_loss, loss)``.

``best_loss`` and ``loss`` have shape ``[n_runs, n_iter + 1, B]`` (runs = restarts x targets in order; index 0 of
the iteration axis is the start point): the per-example best loss so far and the loss of each iterate. Runs skipped
because no point was left to attack are all zeros. Points not attacked in a run (already fooled, or misclassified
clean) are still iterated on (fixed shapes) but their results are ignored."""
