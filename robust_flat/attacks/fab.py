"""FAB, the fast adaptive boundary attack (Croce & Hein, ICML 2020), and its targeted variant FAB-T from AutoAttack.

FAB is a minimal-norm attack. It does not maximize a loss inside the eps-ball; it walks to the decision boundary and
then shrinks the perturbation. The semantics follow AutoAttack's PyTorch code
(`fra31/auto-attack:autoattack/fab_base.py`, `fab_pt.py`, `fab_projections.py`). One run of ``n_iter`` iterations
starts at ``x1 = x0``, or for restarts > 0 at a random point at distance eps / 2. Each iteration:

1. Linearize the decision function at ``x1``. Targeted: ``f = z_t - z_y``. Untargeted: ``f_k = z_k - z_y`` for every
   class ``k != y``, keeping the class with the smallest ``|f_k| / ||grad f_k||_*`` (dual norm). This gives the
   hyperplane ``w . z = b``.
2. Project ``x1`` and ``x0`` onto {hyperplane} n [0, 1]^D in the attack norm (minimal-norm projection onto the
   box-constrained hyperplane): ``d1``, ``d2``.
3. Take a convex combination of the two overshot steps,
   ``x1 <- clip((x1 + eta d1)(1 - a) + (x0 + eta d2) a, 0, 1)``, with ``a = min(max(|d1| / (|d1| + |d2|), 0),
   alpha_max)``.
4. If ``x1`` is misclassified, keep it when it is the smallest perturbation found so far (the "minimal norm among
   successful iterates" selection), then step back towards the original point: ``x1 <- x0 + beta (x1 - x0)``.

"Misclassified" means predicted label != y for both variants, as in the original. A targeted run can therefore also
end in a class other than its target. FAB-T (AutoAttack "standard") runs the targets one after the other: the 2nd,
3rd, ..., (n_target_classes + 1)-th largest clean logit. Each runs on the points that are still robust. A point
counts as broken when the run found a misclassified point with ``||x_adv - x|| <= eps``. Points that are never
broken, and points misclassified from the start, come back unchanged, as in the original. So the returned ``x_adv``
always lies in the eps-ball and in [0, 1]. Randomness enters only through the random starts of restarts > 0, so
FAB-T with one restart is deterministic.

Fixed shapes instead of the original's shrinking index sets: every run works on the whole batch, and only the points
still robust take its result. Examples are independent (eval-mode BN), so the results agree. The (target, restart)
runs stop once no point is left robust. That stop is a ``lax.while_loop`` in the traceable version (``fab.raw``),
and a host check in the CPU-friendly host loop (``FABConfig.loop``).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from robust_flat import xla
from robust_flat.attacks.common import NORMS, check_inputs, check_threat_model, jit_attack, jit_logits_fn

_NOT_FOUND = 1e10  # the original's "no adversarial example yet" distance


@dataclasses.dataclass(frozen=True)
class FABConfig:
    """Defaults are FAB-T as AutoAttack "standard" runs it: 9 targets, 100 iterations, 1 restart, eps 8/255 (L-inf).

    ``eps`` bounds the final success check and sets the random-start radius (eps / 2) of restarts > 0.
    ``alpha_max``, ``eta`` (overshoot) and ``beta`` (backward step) are the original's hyper-parameters.
    ``targeted=False`` gives plain FAB (AutoAttack "plus" uses 5 restarts). ``n_target_classes`` is capped at
    ``num_classes - 1``.

    ``loop``: ``"host"`` (Python drives the runs and chunks of ``unroll`` iterations, each chunk one compiled,
    loop-free program), ``"device"`` (one program: ``while_loop`` over runs, ``fori_loop`` over iterations with
    unroll factor ``unroll``), or ``"auto"`` (host on CPU, device elsewhere). On XLA:CPU the ops inside a loop body
    run ~2x slower than the same ops outside one, so the host loop is ~2x faster there. ``loop`` and ``unroll`` change
    speed and compile time only, not results.
    """

    eps: float = 8 / 255
    norm: str = "linf"
    n_iter: int = 100
    n_restarts: int = 1
    targeted: bool = True
    n_target_classes: int = 9
    alpha_max: float = 0.1
    eta: float = 1.05
    beta: float = 0.9
    loop: str = "auto"
    unroll: int = 5

    def __post_init__(self):
        check_threat_model("FAB", self.eps, self.norm)
        if self.n_iter < 1 or self.n_restarts < 1 or self.n_target_classes < 1 or self.unroll < 1:
            raise ValueError("FAB needs n_iter, n_restarts, n_target_classes and unroll >= 1, got "
                             f"{self.n_iter}, {self.n_restarts}, {self.n_target_classes}, {self.unroll}")
        if not 0.0 <= self.alpha_max <= 1.0:
            raise ValueError(f"FAB alpha_max must lie in [0, 1], got {self.alpha_max}")
        if not self.eta > 0 or not 0.0 < self.beta <= 1.0:
            raise ValueError(f"FAB needs eta > 0 and 0 < beta <= 1, got {self.eta}, {self.beta}")
        if self.loop not in ("auto", "host", "device"):
            raise ValueError(f"unknown loop {self.loop!r}; choose auto, host or device")


# ------------------------------------------------------------------------------------------ projections
def _norm_rows(v, norm: str):
    if norm == "linf":
        return jnp.max(jnp.abs(v), axis=-1)
    return jnp.sqrt(jnp.sum(v * v, axis=-1))


def _dual_norm_rows(v, norm: str):
    if norm == "linf":
        return jnp.sum(jnp.abs(v), axis=-1)
    return jnp.sqrt(jnp.sum(v * v, axis=-1))


def _water_level(cap, weight, c, bisect_steps: int = 24, newton_steps: int = 4):
    """Per row, the smallest ``lam >= 0`` with ``G(lam) = sum_i weight_i * min(lam, cap_i) = c``; ``inf`` if none.

    ``G`` is piecewise linear, concave and non-decreasing, with breakpoints at the caps. The original sorts the caps and
    binary-searches the breakpoints. Sorting is slow on XLA:CPU (~20x the rest of the projection), so this
    brackets ``lam`` by bisection instead. It then takes Newton steps from the lower end. By concavity, a Newton step
    from below never overshoots, and it lands exactly on the solution once no breakpoint lies between the iterate
    and ``lam``. After 24 halvings that holds almost surely, and each extra step passes at least one more breakpoint.
    ``weight`` must be 0 where a coordinate cannot move.
    """
    c = c[:, None]
    feasible = jnp.sum(weight * cap, axis=1, keepdims=True) > c
    lo = jnp.zeros_like(c)
    hi = jnp.max(jnp.where(weight > 0, cap, 0.0), axis=1, keepdims=True)

    def bisect(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        below = jnp.sum(weight * jnp.minimum(mid, cap), axis=1, keepdims=True) < c
        return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

    def newton(_, lam):
        g = jnp.sum(weight * jnp.minimum(lam, cap), axis=1, keepdims=True)
        slope = jnp.sum(jnp.where(cap > lam, weight, 0.0), axis=1, keepdims=True)
        step = jnp.where(slope > 0, (c - g) / jnp.where(slope > 0, slope, 1.0), 0.0)
        return jnp.clip(lam + jnp.maximum(step, 0.0), lam, hi)

    lo, hi = lax.fori_loop(0, bisect_steps, bisect, (lo, hi), unroll=True)
    lam = lax.fori_loop(0, newton_steps, newton, lo, unroll=True)
    return jnp.where(feasible, lam, jnp.inf)[:, 0]


def project_hyperplane_box(t, w, b, norm: str):
    """Minimal-norm ``d`` with ``w . (t + d) = b`` and ``0 <= t + d <= 1``, one problem per row of ``t``, ``w``, ``b``.

    ``t, w``: [B, D] with ``t`` in [0, 1]; ``b``: [B]; ``norm``: ``"linf"`` or ``"l2"``. When the hyperplane does
    not meet the box, the result is the box corner that gets closest to it (the original does the same).
    Coordinates with ``w = 0`` (L-inf) or ``|w| <= 1e-8`` (L2) do not move, as in the original.

    With ``c = |w . t - b|``, after flipping signs so that ``w . t >= b``, both norms come down to moving each
    coordinate against ``w`` by ``min(lam, cap_i)``, where ``cap_i`` is its distance to the box face.
    L-inf: ``d_i = -sign(w_i) min(lam, cap_i)``, with ``sum |w_i| min(lam, cap_i) = c``.
    L2: ``d_i = -w_i min(lam, cap_i / |w_i|)``, with ``sum w_i^2 min(lam, cap_i / |w_i|) = c``.
    """
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose linf or l2")
    t = t.astype(jnp.float32)
    w = w.astype(jnp.float32)
    b = b.astype(jnp.float32)
    c = jnp.sum(w * t, axis=1) - b
    flip = jnp.where(c >= 0, 1.0, -1.0)
    w = w * flip[:, None]
    c = c * flip
    cap = jnp.where(w > 0, t, 1.0 - t)  # distance to the box face the coordinate moves towards
    if norm == "linf":
        active = w != 0
        weight = jnp.where(active, jnp.abs(w), 0.0)
        lam = _water_level(jnp.where(active, cap, 0.0), weight, c)
        d = -jnp.sign(w) * jnp.minimum(lam[:, None], cap)
    else:
        active = jnp.abs(w) > 1e-8
        w = jnp.where(active, w, 0.0)
        abs_w = jnp.where(active, jnp.abs(w), 1.0)
        cap_l = jnp.where(active, cap / abs_w, 0.0)  # the lam at which the coordinate reaches the box
        lam = _water_level(cap_l, w * w, c)
        d = -w * jnp.minimum(lam[:, None], cap_l)
    return jnp.where(active, d, 0.0)


# ------------------------------------------------------------------------------------------ the attack
def _bcast(v, like):
    return v.reshape((-1,) + (1,) * (like.ndim - 1))


def _linearize_targeted(logits_fn, x1, y, target):
    """``(f, grad f)`` for ``f = z_target - z_y``: one backward pass (grad of the summed difference)."""

    def summed(x):
        z = logits_fn(x).astype(jnp.float32)
        diff = (jnp.take_along_axis(z, target[:, None], axis=1)
                - jnp.take_along_axis(z, y[:, None], axis=1))[:, 0]
        return jnp.sum(diff), diff

    g, df = jax.grad(summed, has_aux=True)(x1)
    return df, g.reshape(x1.shape[0], -1)


def _linearize_untargeted(logits_fn, x1, y, norm: str):
    """``(f_k, grad f_k)`` for the class ``k != y`` whose linearized boundary is closest (one backward per class)."""
    z, vjp = jax.vjp(lambda v: logits_fn(v).astype(jnp.float32), x1)
    n, k = z.shape
    onehot_y = jax.nn.one_hot(y, k, dtype=z.dtype)
    cotangents = jnp.eye(k, dtype=z.dtype)[:, None, :] - onehot_y[None]  # [K, N, K]: e_k - e_y per example
    (g,) = jax.vmap(vjp)(cotangents)
    g = jnp.swapaxes(g.reshape(k, n, -1), 0, 1)  # [N, K, D]
    df = z - jnp.take_along_axis(z, y[:, None], axis=1)
    df = jnp.where(onehot_y > 0, _NOT_FOUND, df)
    dist = jnp.abs(df) / (1e-12 + _dual_norm_rows(g, norm))
    ind = jnp.argmin(dist, axis=1)
    return (jnp.take_along_axis(df, ind[:, None], axis=1)[:, 0],
            jnp.take_along_axis(g, ind[:, None, None], axis=1)[:, 0])


def _random_start(key, x, eps: float, norm: str):
    """The original's restart point: ``x + (eps / 2) t / ||t||``, ``t`` ~ U[-1, 1]^D (L-inf) or N(0, I) (L2)."""
    # flat draws: XLA:CPU compiles multi-dimensional threefry draws several times slower
    if norm == "linf":
        t = jax.random.uniform(key, (x.size,), x.dtype, -1.0, 1.0).reshape(x.shape)
    else:
        t = jax.random.normal(key, (x.size,), x.dtype).reshape(x.shape)
    t_norm = _norm_rows(t.reshape(x.shape[0], -1), norm)
    return jnp.clip(x + 0.5 * eps * t / _bcast(jnp.maximum(t_norm, 1e-12), x), 0.0, 1.0)


def _step(logits_fn, x0, y, target, carry, config: FABConfig):
    """One FAB iteration on the carry ``(x1, adv, dist)``: ``adv`` is the smallest misclassified iterate so far and
    ``dist`` its distance to ``x0`` (``_NOT_FOUND`` and ``x0`` where none was found yet)."""
    x1, adv, dist = carry
    n = x0.shape[0]
    x0f = x0.reshape(n, -1)
    if config.targeted:
        df, w = _linearize_targeted(logits_fn, x1, y, target)
    else:
        df, w = _linearize_untargeted(logits_fn, x1, y, config.norm)
    x1f = x1.reshape(n, -1)
    b = -df + jnp.sum(w * x1f, axis=1)
    d = project_hyperplane_box(jnp.concatenate([x1f, x0f]), jnp.concatenate([w, w]),
                               jnp.concatenate([b, b]), config.norm)
    a = jnp.maximum(_norm_rows(d, config.norm), 1e-8)
    d1, d2, a1, a2 = d[:n], d[n:], a[:n], a[n:]
    alpha = jnp.clip(a1 / (a1 + a2), 0.0, config.alpha_max)[:, None]
    x1f = jnp.clip((x1f + config.eta * d1) * (1.0 - alpha) + (x0f + config.eta * d2) * alpha, 0.0, 1.0)
    x1 = x1f.reshape(x0.shape)
    is_adv = jnp.argmax(logits_fn(x1), axis=1) != y
    t = _norm_rows(x1f - x0f, config.norm)
    better = is_adv & (t < dist)
    adv = jnp.where(_bcast(better, x0), x1, adv)
    dist = jnp.where(better, t, dist)
    x1 = jnp.where(_bcast(is_adv, x0), x0 + (x1 - x0) * config.beta, x1)
    return x1, adv, dist


def _init_carry(x0, x_start):
    return x_start, x0, jnp.full((x0.shape[0],), _NOT_FOUND, jnp.float32)


def _prepare(logits_fn, x, y, config: FABConfig):
    """Checked inputs, the clean robust flags and the classes by decreasing clean logit (column 0 is y on robust
    points), and the number of (target, restart) runs."""
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y)
    if x.ndim < 2 or y.shape != (x.shape[0],):
        raise ValueError(f"fab: need x [N, ...] and integer labels y [N], got shapes {x.shape} and {y.shape}")
    if not jnp.issubdtype(y.dtype, jnp.integer):
        raise ValueError(f"fab: labels must be integers, got dtype {y.dtype}")
    y = y.astype(jnp.int32)
    out = jax.eval_shape(logits_fn, x)
    if len(out.shape) != 2 or out.shape[0] != x.shape[0] or out.shape[1] < 2:
        raise ValueError(f"fab: logits_fn must return [N, K >= 2] logits, got shape {out.shape}")
    n_targets = min(config.n_target_classes, out.shape[1] - 1) if config.targeted else 1
    return x, y, n_targets * config.n_restarts


def _clean(logits_fn, x, y):
    logits = logits_fn(x).astype(jnp.float32)
    return jnp.argmax(logits, axis=1) == y, jnp.argsort(-logits, axis=1)


def _run_start(key, run, x, config: FABConfig):
    """Restart 0 starts at ``x``; later restarts at a random point (the original's ``use_rand_start``)."""
    restart = run % config.n_restarts
    return jnp.where(restart > 0, _random_start(jax.random.fold_in(key, run), x, config.eps, config.norm), x)


def _merge(logits_fn, x, y, robust, x_adv, adv, dist, config: FABConfig):
    """The original's final check: a point is broken when a misclassified point within eps was found."""
    fooled = jnp.argmax(logits_fn(adv), axis=1) != y
    within = _norm_rows((adv - x).reshape(x.shape[0], -1), config.norm) <= config.eps
    success = robust & (dist < _NOT_FOUND) & fooled & within
    return robust & ~success, jnp.where(_bcast(success, x), adv, x_adv)


# ------------------------------------------------------------------------- device loop: one traceable function
def _fab(logits_fn, x, y, key, config: FABConfig):
    x, y, n_runs = _prepare(logits_fn, x, y, config)
    robust, by_logit = _clean(logits_fn, x, y)

    def cond(state):
        run, robust, _ = state
        return (run < n_runs) & jnp.any(robust)

    def body(state):
        run, robust, x_adv = state
        target = lax.dynamic_index_in_dim(by_logit, run // config.n_restarts + 1, axis=1, keepdims=False)
        carry = _init_carry(x, _run_start(key, run, x, config))
        carry = lax.fori_loop(0, config.n_iter, lambda _, c: _step(logits_fn, x, y, target, c, config), carry,
                              unroll=config.unroll)
        robust, x_adv = _merge(logits_fn, x, y, robust, x_adv, carry[1], carry[2], config)
        return run + 1, robust, x_adv

    _, _, x_adv = lax.while_loop(cond, body, (jnp.asarray(0, jnp.int32), robust, x))
    return lax.stop_gradient(x_adv)


# ------------------------------------------------------------------------- host loop over compiled chunks


def _chunk(logits_fn, x, y, target, carry, config: FABConfig):
    for _ in range(config.n_iter):  # unrolled in Python: no XLA loop
        carry = _step(logits_fn, x, y, target, carry, config)
    return carry


_clean_jit = jit_logits_fn(lambda logits_fn, x, y, config: _clean(logits_fn, x, y))
_chunk_jit = jit_logits_fn(_chunk)
_merge_jit = jit_logits_fn(_merge)
_start_jit = xla.jit(lambda key, run, x, config: _init_carry(x, _run_start(key, run, x, config)),
                     static_argnames=("config",))


def _core(config: FABConfig, n_iter: int) -> FABConfig:
    """The fields one chunk depends on (fewer distinct configs, fewer compilations)."""
    return dataclasses.replace(config, n_iter=n_iter, n_target_classes=1, unroll=1, loop="device")


def _fab_host(logits_fn, x, y, key, config: FABConfig):
    """Same result as :func:`_fab`. The runs, and chunks of ``unroll`` iterations within a run, are driven from
    Python. Each chunk is one compiled, loop-free program. The host syncs once per run, to stop when no point is
    left robust."""
    x, y, n_runs = _prepare(logits_fn, x, y, config)
    core = _core(config, config.unroll)
    robust, by_logit = _clean_jit(logits_fn, x, y, config=core)
    bounds = list(range(0, config.n_iter, config.unroll)) + [config.n_iter]
    x_adv = x
    for run in range(n_runs):
        if not bool(jnp.any(robust)):
            break
        target = by_logit[:, run // config.n_restarts + 1]
        carry = _start_jit(key, jnp.asarray(run, jnp.int32), x, config=core)
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            carry = _chunk_jit(logits_fn, x, y, target, carry, config=_core(config, hi - lo))
        robust, x_adv = _merge_jit(logits_fn, x, y, robust, x_adv, carry[1], carry[2], config=core)
    return lax.stop_gradient(x_adv)


def _use_host_loop(config: FABConfig) -> bool:
    if config.loop == "auto":
        return jax.default_backend() == "cpu"
    return config.loop == "host"


_fab_device = jit_attack(_fab)


def fab(logits_fn, x, y, key, config: FABConfig):
    """``fab(logits_fn, x, y, key, config) -> x_adv`` (compiled; see :class:`FABConfig` and the module docstring).

    FAB-T by default (AutoAttack "standard"). Points FAB does not break within eps come back unchanged.
    ``fab.raw`` is the traceable single-function version (``lax.while_loop`` over runs, ``fori_loop`` over
    iterations), for use inside other jitted code.
    """
    if _use_host_loop(config):
        check_inputs(x, config.eps, "fab")
        return _fab_host(logits_fn, x, y, key, config)
    return _fab_device(logits_fn, x, y, key, config)


fab.raw = _fab

__all__ = ["FABConfig", "fab", "project_hyperplane_box"]
