"""1D curves and 2D surfaces of the robust (and clean) loss along weight-space directions (paper Fig. 1;
supplement "Visualization Details"; docs/paper-vs-code.md#landscape).

At every point ``w + s * d`` (1D) or ``w + a * d1 + b * d2`` (2D) the adversarial examples are **recomputed** by PGD
against the perturbed model (eval-mode BN), and the robust loss RLoss = mean CE at those examples is recorded
together with the clean loss and both errors. All points of a landscape use the **same PGD key** (common random
numbers), so only the weights change along a curve and every curve passes through the unperturbed RLoss at s = 0.

Directions (pytrees with the structure of ``params``; unselected leaves -- BN, whitening -- are zero):

* ``random``: a Gaussian direction, normalized per selected layer (or filter);
* ``adversarial``: the weight perturbation found by a weight-only attack on the CE at adversarial examples computed
  once by PGD at ``w`` (the code's recipe: ``weight_l2_gd_nonorm2_lwrl2normalized_i7_lr001_mom0_e0005_at10``, i.e.
  xi = 0.005, 7 steps, lr 0.01, one random start per direction, PGD-10 inputs). The paper only says "adversarial
  directions"; we return the attack's last iterate (the code returns its best-so-far state,
  docs/paper-vs-code.md#joint-attack);
* ``hessian``: the top eigenvector of the Hessian (:mod:`robust_flat.hessian`; default: clean CE, tensors with
  >= 2 dims, on the same examples).

Normalization (``LandscapeConfig.normalization``), then rescaling by ``scale``:

* ``"layer"`` (paper eq. main-normalization): ``d_l <- scale * d_l / ||d_l|| * ||w_l||`` per layer (kernels and
  biases separately). The paper "re-scales the weight directions to have length 0.5 for random and 0.025 for
  adversarial directions"; we read the length as relative per layer (s = 1 is on the sphere of the relative ball
  B_0.5(w)), which matches its reported ``||d||_2 ~ 33`` for the AT ResNet-18 (about half the weight norm), while a
  global length 0.5 would not differ between layer- and filter-wise normalization as the paper's numbers do.
  Hessian directions: layer-wise, times 0.5.
* ``"filter"`` (Li et al. 2018; paper Fig. supp-visualization-li): the same per output filter of conv kernels (HWIO:
  last axis); dense kernels and biases per tensor, as the code's filter-wise variants.
* ``"layer_max"`` (released code, its ``layer_l2_05`` / ``layer_l2_001`` options):
  ``d_l <- d_l * scale * max|w_l| / max|d_l|``; the code uses scale 0.5 (random) and 0.01 (adversarial).
* ``"none"``: ``d <- scale * d``.

Paper defaults (:class:`LandscapeConfig`): 51 points in [-1, 1], mean RLoss over 10 random directions, max RLoss
(pointwise over s) over 10 adversarial directions, one batch of 128 test examples. The code uses the last 100 test
images; ``x`` is always used as one batch, the caller picks it. The PGD at each point defaults to PGD-20
(eps 8/255, step 0.007, one restart: the paper's RLoss attack); the code's visualization uses PGD-10.

The command line, ``python -m experiments.flatness --measure landscape``, is :mod:`experiments.landscape`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from robust_flat import hessian as H
from robust_flat import xla
from robust_flat.attacks.common import check_data, cross_entropy
from robust_flat.attacks.pgd import PGDConfig, pgd
from robust_flat.io import atomic_save_figure
from robust_flat.linalg import extreme_eigenvalues
from robust_flat.models import bind
from robust_flat.weights import (LayerSelection, Neighbourhood, WeightAttackConfig, normalize, selection_mask,
                                 weight_attack)

NORMALIZATIONS = ("layer", "filter", "layer_max", "none")
KINDS = ("random", "adversarial", "hessian")


@dataclasses.dataclass(frozen=True)
class LandscapeConfig:
    """Defaults: the paper's visualization (see the module docstring for each choice and the code's variants).

    ``selection``: a :class:`robust_flat.weights.LayerSelection` (None: the paper's layers). ``adversarial_xi``,
    ``adversarial_lr``, ``adversarial_steps``, ``direction_pgd``: the attack that finds adversarial directions
    (the code's values). ``hessian_iters``: Lanczos steps for the Hessian direction.
    """

    steps: int = 51
    span: float = 1.0
    surface_steps: int = 21
    num_directions: int = 10
    normalization: str = "layer"
    random_scale: float = 0.5
    adversarial_scale: float = 0.025
    hessian_scale: float = 0.5
    pgd: PGDConfig = PGDConfig(steps=20)
    selection: Optional[object] = None
    adversarial_xi: float = 0.005
    adversarial_lr: float = 0.01
    adversarial_steps: int = 7
    direction_pgd: PGDConfig = PGDConfig(steps=10)
    hessian_iters: int = 40

    def __post_init__(self):
        if self.steps < 1 or self.surface_steps < 1 or self.num_directions < 1:
            raise ValueError(f"steps, surface_steps and num_directions must be >= 1, got {self.steps}, "
                             f"{self.surface_steps}, {self.num_directions}")
        if not self.span > 0:
            raise ValueError(f"span must be > 0, got {self.span}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {self.normalization!r}; choose one of "
                             f"{', '.join(NORMALIZATIONS)}")
        for name in ("random_scale", "adversarial_scale", "hessian_scale", "adversarial_xi", "adversarial_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    @property
    def layer_selection(self):
        return LayerSelection() if self.selection is None else self.selection

    def coordinates(self, steps: Optional[int] = None) -> np.ndarray:
        return np.linspace(-self.span, self.span, self.steps if steps is None else steps)

    def scale(self, kind: str) -> float:
        return {"random": self.random_scale, "adversarial": self.adversarial_scale,
                "hessian": self.hessian_scale}.get(kind, 1.0)


# -------------------------------------------------------------------------------------------------- directions
def _neighbourhood(config: LandscapeConfig, granularity: str = "layer", xi: float = 1.0):
    return Neighbourhood(xi=xi, granularity=granularity, selection=config.layer_selection)


def _normalize(direction, params, scale, config: LandscapeConfig, mode: str):
    if mode in ("layer", "filter"):
        d = normalize(direction, params, _neighbourhood(config, mode))
        return jax.tree.map(lambda leaf: (scale * leaf).astype(leaf.dtype), d)
    mask = selection_mask(params, config.layer_selection)

    def one(d, w, m):
        if not m:
            return jnp.zeros_like(w)
        if mode == "none":
            return (scale * d).astype(w.dtype)
        dmax = jnp.max(jnp.abs(d))
        return (d * (scale * jnp.max(jnp.abs(w)) / jnp.where(dmax > 0, dmax, 1.0))).astype(w.dtype)

    return jax.tree.map(one, direction, params, mask)


_normalize_jit = xla.jit(_normalize, static_argnames=("config", "mode"))


def normalize_direction(direction, params, config: LandscapeConfig, scale: float, mode: Optional[str] = None):
    """Normalize ``direction`` relative to ``params`` (``mode``: default ``config.normalization``) and rescale.

    Unselected leaves become zero. A zero layer of ``direction`` stays zero."""
    mode = config.normalization if mode is None else mode
    if mode not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {mode!r}; choose one of {', '.join(NORMALIZATIONS)}")
    return _normalize_jit(direction, params, jnp.float32(scale), config=config, mode=mode)


def _random_direction(key, params, scale, config: LandscapeConfig):
    # One Gaussian draw for all leaves (a single RNG call compiles much faster than one per leaf); the
    # normalization makes each layer's (or filter's) norm relative to the weights and zeroes unselected leaves.
    flat, unravel = ravel_pytree(params)
    d = unravel(jax.random.normal(key, flat.shape, flat.dtype))
    return _normalize(d, params, scale, config, config.normalization)


_random_direction_jit = xla.jit(_random_direction, static_argnames=("config",))


def random_direction(key, params, config: LandscapeConfig = LandscapeConfig(), scale: Optional[float] = None):
    """A Gaussian direction per selected layer, normalized (scale default ``config.random_scale``)."""
    scale = config.random_scale if scale is None else scale
    return _random_direction_jit(key, params, jnp.float32(scale), config=config)


def adversarial_directions(logits_fn, params, model_state, x, y, key, config: LandscapeConfig = LandscapeConfig(),
                           num: Optional[int] = None, scale: Optional[float] = None) -> list:
    """``num`` (default ``config.num_directions``) adversarial directions: weight attacks from independent random
    starts on the CE at adversarial examples computed once by ``config.direction_pgd`` at ``params``."""
    src = Directions("adversarial", logits_fn, params, model_state, x, y, key, config, num, scale)
    return [src[i] for i in range(len(src))]


def hessian_direction(logits_fn, params, model_state, x, y, key, config: LandscapeConfig = LandscapeConfig(),
                      hessian_config=None, scale: Optional[float] = None):
    """The top Hessian eigenvector (default :class:`robust_flat.hessian.HessianConfig`: clean CE, >= 2-dim
    tensors; one batch = all of ``x``) as a direction, normalized layer-wise and scaled by ``config.hessian_scale``.
    Returns ``(direction, lambda_max)``."""
    if hessian_config is None:
        hessian_config = H.HessianConfig(batch_size=len(x))
    op = H.HessianOperator(logits_fn, params, model_state, x, y, hessian_config, key=jax.random.fold_in(key, 1))
    eig = extreme_eigenvalues(op, op.dim, key, k=1, num_iters=config.hessian_iters, vectors=True)
    selected = op.unravel(eig.top_vectors[0])
    rest = {k: jnp.zeros_like(v) for k, v in op.rest.items()}
    d = H.merge_params(selected, rest)
    d = jax.tree.map(lambda a, w: jnp.asarray(a, w.dtype), d, params)  # same container types as params
    return normalize_direction(d, params, config, config.hessian_scale if scale is None else scale), eig.max


# ------------------------------------------------------------------------------------------------- evaluation
def _point(logits_fn, params, model_state, d1, d2, a, b, x, y, key, pgd_config):
    p = jax.tree.map(lambda w, u, v: w + (a * u + b * v).astype(w.dtype), params, d1, d2)
    x_adv = pgd.raw(bind(logits_fn, p, model_state), x, y, key, pgd_config)
    adv_logits = logits_fn(p, model_state, x_adv)
    clean_logits = logits_fn(p, model_state, x)
    return (jnp.mean(cross_entropy(adv_logits, y)), jnp.mean(cross_entropy(clean_logits, y)),
            jnp.mean(jnp.argmax(adv_logits, -1) != y), jnp.mean(jnp.argmax(clean_logits, -1) != y))


_point_jit = xla.jit(_point, static_argnames=("logits_fn", "pgd_config"))
METRICS = ("robust_loss", "clean_loss", "robust_error", "clean_error")


def _check(x, y, pgd_config):
    """The checked data, on the device once (every point of a curve or surface uses it)."""
    return tuple(jnp.asarray(a) for a in check_data(x, y, pgd_config.eps, "landscape"))


def _eval(logits_fn, params, model_state, x, y, key, d1, d2, a, b, pgd_config):
    # 1D points use d2 = 0, so curves and surfaces share one compiled function.
    out = _point_jit(logits_fn, params, model_state, d1, d2, jnp.float32(a), jnp.float32(b), x, y, key,
                     pgd_config=pgd_config)
    return {m: float(v) for m, v in zip(METRICS, out)}


def evaluate_at(logits_fn, params, model_state, x, y, key, direction1=None, a: float = 0.0, direction2=None,
                b: float = 0.0, pgd_config: PGDConfig = PGDConfig(steps=20)) -> dict:
    """RLoss (PGD recomputed at the point), clean loss and errors at ``params + a * direction1 + b * direction2``
    (missing directions are zero)."""
    x, y = _check(x, y, pgd_config)
    zeros = optax.tree.zeros_like(params)
    return _eval(logits_fn, params, model_state, x, y, key, zeros if direction1 is None else direction1,
                 zeros if direction2 is None else direction2, a, b, pgd_config)


def loss_curve(logits_fn, params, model_state, x, y, direction, key, config: LandscapeConfig = LandscapeConfig(),
               progress: Optional[Callable[[int], Any]] = None):
    """Metrics at ``params + s * direction`` for ``s`` in ``config.coordinates()``; the same PGD ``key`` at every
    point. Returns ``{"s": [...], "robust_loss": [...], "clean_loss": [...], "robust_error": [...],
    "clean_error": [...]}``. ``progress(1)`` is called after every point."""
    x, y = _check(x, y, config.pgd)
    s = config.coordinates()
    zeros = optax.tree.zeros_like(params)
    out = {m: [] for m in METRICS}
    for si in s:
        vals = _eval(logits_fn, params, model_state, x, y, key, direction, zeros, si, 0.0, config.pgd)
        for m in METRICS:
            out[m].append(vals[m])
        if progress is not None:
            progress(1)
    return {"s": s.tolist(), **out}


def loss_surface(logits_fn, params, model_state, x, y, direction1, direction2, key,
                 config: LandscapeConfig = LandscapeConfig(), *, done_rows: Optional[dict] = None,
                 on_row: Optional[Callable[[int, dict], Any]] = None,
                 progress: Optional[Callable[[int], Any]] = None) -> dict:
    """Metrics on the ``surface_steps x surface_steps`` grid ``params + a * d1 + b * d2`` (``a`` indexes rows);
    the same PGD ``key`` at every point.

    Resumption: ``done_rows`` maps finished row indices to ``{metric: row values}`` (not recomputed; the
    directions may then be lazy, e.g. callables, see below), ``on_row(i, {metric: row values})`` is called after
    each computed row, ``progress(1)`` after every point. ``direction1``/``direction2`` may be zero-argument
    callables returning the direction: they are called only if a row has to be computed."""
    x, y = _check(x, y, config.pgd)
    grid = config.coordinates(config.surface_steps)
    done_rows = done_rows or {}
    out = {m: np.zeros((len(grid), len(grid))) for m in METRICS}
    for i, a in enumerate(grid):
        if i in done_rows:
            for m in METRICS:
                out[m][i] = done_rows[i][m]
            continue
        if callable(direction1):
            direction1 = direction1()
        if callable(direction2):
            direction2 = direction2()
        for j, b in enumerate(grid):
            vals = _eval(logits_fn, params, model_state, x, y, key, direction1, direction2, a, b, config.pgd)
            for m in METRICS:
                out[m][i, j] = vals[m]
            if progress is not None:
                progress(1)
        if on_row is not None:
            on_row(i, {m: out[m][i].copy() for m in METRICS})
    return {"a": grid.tolist(), "b": grid.tolist(), **{m: v.tolist() for m, v in out.items()}}


class Directions:
    """The ``num`` (default ``config.num_directions``; hessian: 1) directions of ``kind``, computed on first access
    (``src[i]``) with the same randomness as computing all of them: direction ``i`` of random/adversarial uses the
    ``i``-th key split from ``key``; the adversarial examples for the adversarial directions are computed once.
    ``info``: extra results (hessian: ``{"lambda_max": ...}`` once the direction is computed)."""

    def __init__(self, kind: str, logits_fn, params, model_state, x, y, key, config: LandscapeConfig,
                 num: Optional[int] = None, scale: Optional[float] = None):
        if kind not in KINDS:
            raise ValueError(f"unknown direction kind {kind!r}; choose one of {', '.join(KINDS)}")
        self.kind, self.config, self.params = kind, config, params
        self._args = (logits_fn, model_state, x, y)
        self.scale = config.scale(kind) if scale is None else scale
        num = config.num_directions if num is None else num
        self.num = 1 if kind == "hessian" else num
        if kind == "adversarial":
            self._key_pgd, key = jax.random.split(key)
        self._key = key
        self._keys = jax.random.split(key, self.num) if kind != "hessian" else None
        self._cache, self._x_adv, self.info = {}, None, {}

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, i: int):
        if not 0 <= i < self.num:
            raise IndexError(f"direction {i} of {self.num}")
        if i not in self._cache:
            self._cache[i] = self._compute(i)
        return self._cache[i]

    def _compute(self, i):
        logits_fn, model_state, x, y = self._args
        params, config = self.params, self.config
        if self.kind == "random":
            return random_direction(self._keys[i], params, config, self.scale)
        if self.kind == "hessian":
            d, lam = hessian_direction(logits_fn, params, model_state, x, y, self._key, config, scale=self.scale)
            self.info["lambda_max"] = lam
            return d
        if self._x_adv is None:
            self._x_adv = pgd(bind(logits_fn, params, model_state), jnp.asarray(x), jnp.asarray(y), self._key_pgd,
                              config.direction_pgd)
        attack = WeightAttackConfig(neighbourhood=_neighbourhood(config, "layer", config.adversarial_xi),
                                    lr=config.adversarial_lr, steps=config.adversarial_steps, init="uniform_norm")
        nu, _ = weight_attack(logits_fn, params, model_state, self._x_adv, jnp.asarray(y), self._keys[i], attack)
        return normalize_direction(nu, params, config, self.scale)


def num_points(config: LandscapeConfig, kinds: Sequence[str]) -> dict:
    """Points (PGD + loss evaluations) per unit of :func:`landscape_1d` (``"unperturbed"``, ``"<kind>_<i>"``: one
    curve) and per row of :func:`loss_surface` (``"surface_row"``)."""
    out = {"unperturbed": 1, "surface_row": config.surface_steps}
    for kind in kinds:
        for i in range(1 if kind == "hessian" else config.num_directions):
            out[curve_unit(kind, i)] = config.steps
    return out


def curve_unit(kind: str, i: int) -> str:
    return f"{kind}_{i:03d}"


def landscape_1d(logits_fn, params, model_state, x, y, key, config: LandscapeConfig = LandscapeConfig(),
                 kinds: Sequence[str] = ("random", "adversarial"), *, done: Optional[dict] = None,
                 on_unit: Optional[Callable[[str, dict], Any]] = None,
                 progress: Optional[Callable[[int], Any]] = None) -> dict:
    """The paper's 1D visualization: per kind, ``num_directions`` curves and their aggregate (mean for random and
    hessian, pointwise max for adversarial). ``key`` is split into the PGD key (shared by all points) and one key
    per kind.

    Resumption: the units are ``"unperturbed"`` (the metrics at ``params``) and one curve per direction,
    ``"random_003"`` (:func:`curve_unit`), holding the metrics along the curve, ``"direction_norm"`` and, for the
    hessian direction, ``"lambda_max"``. ``done`` maps finished unit names to those values (as passed to
    ``on_unit(name, values)`` after each computed unit); their directions are not even computed, and the result
    equals an uninterrupted run's. ``progress(1)`` is called after every point (see :func:`num_points`)."""
    x, y = _check(x, y, config.pgd)
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"unknown direction kind {kind!r}; choose one of {', '.join(KINDS)}")
    done = done or {}
    save = on_unit or (lambda name, values: None)
    k_pgd, k_dirs = jax.random.split(key)
    if "unperturbed" in done:
        unperturbed = {m: float(done["unperturbed"][m]) for m in METRICS}
    else:
        unperturbed = evaluate_at(logits_fn, params, model_state, x, y, k_pgd, pgd_config=config.pgd)
        save("unperturbed", unperturbed)
        if progress is not None:
            progress(1)
    result = {"s": config.coordinates().tolist(), "num_examples": int(x.shape[0]), "unperturbed": unperturbed,
              "kinds": {}}
    for kind, k in zip(kinds, jax.random.split(k_dirs, len(kinds))):
        src = Directions(kind, logits_fn, params, model_state, x, y, k, config)
        curves, info = [], {}
        for i in range(len(src)):
            unit = curve_unit(kind, i)
            if unit in done:
                c = done[unit]
            else:
                c = loss_curve(logits_fn, params, model_state, x, y, src[i], k_pgd, config, progress)
                c = {m: c[m] for m in METRICS}
                c["direction_norm"] = float(optax.tree.norm(src[i]))  # ||d||_2 over all leaves
                if kind == "hessian":
                    c["lambda_max"] = src.info["lambda_max"]
                save(unit, c)
            curves.append({m: [float(v) for v in c[m]] for m in METRICS})
            info["direction_norms"] = info.get("direction_norms", []) + [float(c["direction_norm"])]
            if "lambda_max" in c:
                info["lambda_max"] = float(c["lambda_max"])
        reduce = np.max if kind == "adversarial" else np.mean
        aggregate = {m: reduce(np.asarray([c[m] for c in curves]), axis=0).tolist() for m in METRICS}
        result["kinds"][kind] = {
            "aggregate": aggregate, "aggregation": "max" if kind == "adversarial" else "mean", "curves": curves,
            "direction_norms": info.pop("direction_norms"), "scale": config.scale(kind), **info}
    return result


# ------------------------------------------------------------------------------------------------------ plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_1d(result: dict, path: str, title: str = "") -> None:
    """One panel per direction kind: each direction's RLoss (thin), the aggregate RLoss and clean loss (thick)."""
    plt = _pyplot()
    kinds = list(result["kinds"])
    fig, axes = plt.subplots(1, max(len(kinds), 1), figsize=(4.5 * max(len(kinds), 1), 3.6), squeeze=False)
    s = np.asarray(result["s"])
    for ax, kind in zip(axes[0], kinds):
        r = result["kinds"][kind]
        for c in r["curves"]:
            ax.plot(s, c["robust_loss"], color="tab:red", lw=0.5, alpha=0.35)
        ax.plot(s, r["aggregate"]["robust_loss"], color="tab:red", lw=2, label=f"RLoss ({r['aggregation']})")
        ax.plot(s, r["aggregate"]["clean_loss"], color="tab:blue", lw=2, ls="--", label="clean loss")
        ax.set_title(f"{kind} (scale {r['scale']:g})")
        ax.set_xlabel("s")
        ax.set_ylabel("cross-entropy")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        atomic_save_figure(path, fig, dpi=120)
    finally:
        plt.close(fig)


def plot_surface(surface: dict, path: str, metric: str = "robust_loss", title: str = "") -> None:
    plt = _pyplot()
    a, b = np.asarray(surface["a"]), np.asarray(surface["b"])
    z = np.asarray(surface[metric])
    fig, ax = plt.subplots(figsize=(5, 4.2))
    cs = ax.contourf(b, a, z, levels=20, cmap="viridis")
    fig.colorbar(cs, ax=ax, label=metric)
    ax.plot([0], [0], "w+", ms=10)
    ax.set_xlabel(surface.get("label_b", "b (direction 2)"))
    ax.set_ylabel(surface.get("label_a", "a (direction 1)"))
    ax.set_title(title or metric)
    fig.tight_layout()
    try:
        atomic_save_figure(path, fig, dpi=120)
    finally:
        plt.close(fig)


__all__ = ["LandscapeConfig", "normalize_direction", "random_direction", "adversarial_directions",
           "hessian_direction", "evaluate_at", "loss_curve", "loss_surface", "Directions",
           "num_points", "curve_unit", "landscape_1d", "plot_1d", "plot_surface"]
