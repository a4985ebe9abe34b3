"""The Hessian of the clean or robust loss with respect to a subset of the weights.

Pieces:

* :class:`HessianOperator`: ``v -> H v`` on the flattened selected parameters (``jax.flatten_util.ravel_pytree``
  order), by forward-over-reverse differentiation (``jax.jvp`` of ``jax.grad``), jitted per batch and accumulated
  over batches on the host.
* :func:`lanczos` (full re-orthogonalization, host loop over jitted vector operations) and
  :func:`extreme_eigenvalues`: top-k (largest) and bottom-k (smallest, most negative) eigenvalues with Ritz
  residual bounds and optional eigenvectors.
* :func:`hutchinson_trace`: trace estimate with Rademacher probes.
* :func:`spectral_density`: stochastic Lanczos quadrature (Ghorbani, Krishnan & Xiao, ICML 2019): for each random
  unit start vector, the eigenpairs (theta_i, s_i) of the Lanczos tridiagonal give quadrature nodes theta_i with
  weights tau_i = s_i[0]^2 (they sum to 1); the density is the Gaussian-broadened mixture
  ``phi(t) = mean_probes sum_i tau_i N(t; theta_i, sigma^2)``, which integrates to 1 and estimates the eigenvalue
  distribution (1/n) sum_j delta(t - lambda_j).
* :func:`spectrum_summary`: all of them as one resumable computation (the command line,
  ``python -m experiments.flatness --measure hessian``, is :mod:`experiments.hessian`).

What the paper / code compute (docs/paper-vs-code.md#hessian): the **largest eigenvalue** (and |lambda_min| /
lambda_max) of the Hessian of the **clean** cross-entropy, model in **eval** mode (BN running statistics), w.r.t.
**all tensors with >= 2 dims** (conv and dense kernels; biases, BN parameters and the whitening excluded), on the
**last 500 test images** in 4 batches, with the HVPs **summed over batches** (each batch contributes the Hessian of
its batch-mean loss, so eigenvalues are ~4x those of the 500-example mean loss); k=4 extreme eigenvalues by ARPACK
(``eigsh(which='BE', tol=1e-2)``). These are the defaults of :class:`HessianConfig`. ``reduction="mean"`` gives the
Hessian of the mean loss over all examples instead. The code has no trace or density estimate; those are extras.

Robust loss (``loss="robust"``): the adversarial examples are computed **once at the start** by PGD at the given
weights and then **held fixed**, so the operator is the Hessian of ``w -> CE(f(x_adv; w), y)`` at fixed ``x_adv``.
This is the usual practical meaning of "Hessian of the robust loss": the dependence of the inner maximizer
``delta*(w)`` on ``w`` is not differentiated through (for the gradient this is exact by Danskin's theorem; for the
Hessian it drops the ``d delta*/dw`` term, and PGD's maximizer is piecewise constant in ``w`` anyway).

Memory: Lanczos with full re-orthogonalization keeps the ``num_iters x dim`` basis (float32): ResNet-18 (11M
kernel weights) with 80 iterations needs ~3.5 GB.
"""
from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.flatten_util import ravel_pytree

from robust_flat import xla
from robust_flat.attacks.common import check_inputs, cross_entropy
from robust_flat.attacks.pgd import PGDConfig, pgd
from robust_flat.io import atomic_save_figure
from robust_flat.models import bind

SEP = "/"  # parameter paths are the Flax module path joined by "/", e.g. "stage1_block0/conv1/kernel"


# -------------------------------------------------------------------------------------------- layer selection
def kernels_filter(path: str, leaf) -> bool:
    """The code's Hessian parameter set: every tensor with >= 2 dims (conv and dense kernels), auxiliary heads
    (paths with an ``aux`` component, e.g. self-supervision's ``aux_rotation_head``) excluded as the code removes its
    auxiliary model first."""
    return np.ndim(leaf) >= 2 and not any(part.startswith("aux") for part in path.split(SEP))


def resolve_filter(select) -> Callable[[str, Any], bool]:
    """A ``(path, leaf) -> bool`` predicate from ``select``.

    ``None`` or ``"kernels"``: tensors with >= 2 dims (the code's Hessian default); ``"layers"``: the paper's
    flatness layer set (:class:`robust_flat.weights.LayerSelection` defaults: kernels and biases, no BN); a
    ``LayerSelection``: its path patterns; a string or a sequence of strings: regular expressions, a parameter is
    selected if any matches its path (``re.search``); a callable ``(path, leaf) -> bool``: used as is.
    """
    if select is None or select == "kernels":
        return kernels_filter
    if isinstance(select, str) and select == "layers":
        from robust_flat.weights import LayerSelection  # lazy: keeps this module importable on its own

        select = LayerSelection()
    if hasattr(select, "matches") and hasattr(select, "include"):  # a robust_flat.weights.LayerSelection
        return lambda path, leaf: bool(jnp.issubdtype(leaf.dtype, jnp.inexact) and select.matches(path))
    if callable(select):
        return select
    patterns = (select,) if isinstance(select, str) else tuple(select)
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"select must be None, 'kernels', 'layers', a LayerSelection, a regex, a sequence of "
                         f"regexes or a callable; got {select!r}")
    compiled = [re.compile(p) for p in patterns]
    return lambda path, leaf: any(c.search(path) for c in compiled)


def flatten_params(params) -> dict:
    """``{path: array}`` with "/"-joined Flax paths."""
    return traverse_util.flatten_dict(dict(params), sep=SEP)


def split_params(params, select=None) -> tuple[dict, dict]:
    """``(selected, rest)``: two ``{path: array}`` dicts partitioning ``params`` (see :func:`resolve_filter`)."""
    keep = resolve_filter(select)
    flat = flatten_params(params)
    selected = {k: v for k, v in flat.items() if keep(k, v)}
    if not selected:
        raise ValueError(f"the parameter selection {select!r} matches no parameter; paths are e.g. "
                         f"{', '.join(list(flat)[:4])}")
    rest = {k: v for k, v in flat.items() if k not in selected}
    return selected, rest


def merge_params(selected: dict, rest: dict):
    """Inverse of :func:`split_params`."""
    return traverse_util.unflatten_dict({**rest, **selected}, sep=SEP)


# ------------------------------------------------------------------------------------------------ the operator
@dataclasses.dataclass(frozen=True)
class HessianConfig:
    """Defaults reproduce the paper's Hessian (= the released code, docs/paper-vs-code.md#hessian).

    ``loss``: ``"clean"`` (paper/code) or ``"robust"`` (CE at PGD adversarial examples computed once at the given
    weights and then held fixed). ``select``: see :func:`resolve_filter` (default: tensors with >= 2 dims).
    ``batch_size``: 128 (the code's loader: the last 500 test images in 4 batches). ``reduction``: ``"sum"`` of
    batch-mean Hessians (code; eigenvalues scale with the number of batches) or ``"mean"`` (Hessian of the mean loss
    over all examples). ``pgd``: the attack for ``loss="robust"`` (default PGD-20, eps 8/255, step 0.007: the
    paper's RLoss attack, one restart).
    """

    loss: str = "clean"
    select: Any = None
    batch_size: int = 128
    reduction: str = "sum"
    pgd: PGDConfig = PGDConfig(steps=20)

    def __post_init__(self):
        if self.loss not in ("clean", "robust"):
            raise ValueError(f"Hessian loss must be 'clean' or 'robust', got {self.loss!r}")
        if self.reduction not in ("sum", "mean"):
            raise ValueError(f"Hessian reduction must be 'sum' or 'mean', got {self.reduction!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def _batch_loss(logits_fn, selected, rest, model_state, x, y, w):
    logits = logits_fn(merge_params(selected, rest), model_state, x)
    return jnp.sum(w * cross_entropy(logits, y)) / jnp.sum(w)


def _hvp(logits_fn, selected, rest, model_state, x, y, w, v):
    _, unravel = ravel_pytree(selected)
    grad_fn = jax.grad(lambda s: _batch_loss(logits_fn, s, rest, model_state, x, y, w))
    _, hv = jax.jvp(grad_fn, (selected,), (unravel(v),))
    return ravel_pytree(hv)[0]


_hvp_jit = xla.jit(_hvp, static_argnames=("logits_fn",))
_loss_jit = xla.jit(_batch_loss, static_argnames=("logits_fn",))


def _check_data(x, y):
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim != 4 or y.ndim != 1 or len(x) != len(y) or len(x) == 0:
        raise ValueError(f"expected x [N, H, W, C] and y [N] with N > 0, got {x.shape} and {y.shape}")
    check_inputs(x, name="hessian")
    return x.astype(np.float32), y.astype(np.int32)


def _padded_batches(x, y, batch_size):
    """Fixed-shape batches (one compile): the last batch is padded by repeating examples with weight 0."""
    n = len(x)
    bs = min(batch_size, n)
    out = []
    for start in range(0, n, bs):
        xb, yb = x[start:start + bs], y[start:start + bs]
        m = len(xb)
        w = np.zeros(bs, np.float32)
        w[:m] = 1.0
        if m < bs:
            idx = np.arange(bs - m) % n
            xb, yb = np.concatenate([xb, x[idx]]), np.concatenate([yb, y[idx]])
        out.append((jnp.asarray(xb), jnp.asarray(yb), jnp.asarray(w), m))
    return out


def adversarial_examples(logits_fn, params, model_state, x, y, key, config: PGDConfig = PGDConfig(steps=20),
                         batch_size: int = 128) -> np.ndarray:
    """PGD adversarial examples for ``(x, y)`` at fixed weights, in batches (one key per batch, from ``key``)."""
    x, y = _check_data(x, y)
    f = bind(logits_fn, params, model_state)
    batches = _padded_batches(x, y, batch_size)
    keys = jax.random.split(key, len(batches))
    out = [np.asarray(pgd(f, xb, yb, k, config))[:m] for (xb, yb, _, m), k in zip(batches, keys)]
    return np.concatenate(out)


class HessianOperator:
    """``H v`` for the Hessian of the (clean or robust) CE w.r.t. the selected parameters, on flat vectors.

    ``logits_fn``: ``(params, model_state, x) -> logits`` in eval mode (:func:`robust_flat.models.make_logits_fn`),
    hashable. ``key`` is needed only for ``loss="robust"`` (the PGD start). Attributes: ``dim``, ``paths`` (the
    selected parameters, in the order of the flat vector), ``x_used`` (the inputs of the loss: ``x`` or the fixed
    adversarial examples), ``num_hvps`` and ``hvp_seconds`` (host-side counters). ``adversarial``: adversarial
    examples computed earlier for the same weights, data and ``config.pgd`` (``loss="robust"`` only; e.g. saved by
    an interrupted CLI run): used instead of running the attack.

    Batches have a fixed shape (one compile): the last one is padded with zero-weight copies of other examples,
    which is exact only for an eval-mode ``logits_fn`` (train-mode BN would mix the copies into the batch
    statistics).
    """

    def __init__(self, logits_fn, params, model_state, x, y, config: HessianConfig = HessianConfig(),
                 key: Optional[jax.Array] = None, adversarial: Optional[np.ndarray] = None):
        x, y = _check_data(x, y)
        if adversarial is not None:
            if config.loss != "robust":
                raise ValueError("adversarial examples are only used for loss='robust'")
            adversarial, _ = _check_data(adversarial, y)
            if adversarial.shape != x.shape:
                raise ValueError(f"adversarial examples of shape {adversarial.shape} for inputs of shape {x.shape}")
            x = adversarial
        elif config.loss == "robust":
            if key is None:
                raise ValueError("the robust-loss Hessian needs a key for the PGD attack")
            x = adversarial_examples(logits_fn, params, model_state, x, y, key, config.pgd, config.batch_size)
        self.logits_fn = logits_fn
        self.config = config
        self.model_state = model_state
        self.selected, self.rest = split_params(params, config.select)
        self.paths = tuple(sorted(self.selected))
        flat, self._unravel = ravel_pytree(self.selected)
        self.dim = int(flat.size)
        self.dtype = flat.dtype
        self.x_used, self.y_used = x, y
        self._batches = _padded_batches(x, y, config.batch_size)
        n = len(x)
        self._coeffs = [1.0 if config.reduction == "sum" else m / n for *_, m in self._batches]
        self.num_hvps = 0
        self.hvp_seconds = 0.0

    @property
    def num_batches(self) -> int:
        return len(self._batches)

    def flat_params(self) -> jax.Array:
        return ravel_pytree(self.selected)[0]

    def unravel(self, v) -> dict:
        """A flat vector as ``{path: array}`` over the selected parameters."""
        return self._unravel(jnp.asarray(v, self.dtype))

    def matvec(self, v) -> jax.Array:
        v = jnp.asarray(v, self.dtype)
        if v.shape != (self.dim,):
            raise ValueError(f"expected a vector of shape ({self.dim},), got {v.shape}")
        t0 = time.perf_counter()
        out = None
        for (xb, yb, wb, _), c in zip(self._batches, self._coeffs):
            hv = c * _hvp_jit(self.logits_fn, self.selected, self.rest, self.model_state, xb, yb, wb, v)
            out = hv if out is None else out + hv
        out.block_until_ready()
        self.hvp_seconds += time.perf_counter() - t0
        self.num_hvps += 1
        return out

    __call__ = matvec

    def loss(self) -> float:
        """The loss whose Hessian this is (same batch reduction)."""
        total = 0.0
        for (xb, yb, wb, _), c in zip(self._batches, self._coeffs):
            total += c * float(_loss_jit(self.logits_fn, self.selected, self.rest, self.model_state, xb, yb, wb))
        return total


# ---------------------------------------------------------------------------------------------------- Lanczos
@xla.jit
def _reorthogonalize(basis, w):
    # Classical Gram-Schmidt, twice ("twice is enough"); rows of `basis` not yet filled are zero.
    w = w - basis.T @ (basis @ w)
    return w - basis.T @ (basis @ w)


def _set_row(basis, j, v):
    return basis.at[j].set(v)


_set_row_jit = jax.jit(_set_row, donate_argnums=0)


@dataclasses.dataclass
class LanczosResult:
    """Tridiagonal ``T`` (``alphas`` diagonal, ``betas`` off-diagonal, float64), the orthonormal basis rows
    (``basis[:m]``, shape ``[m, dim]``) and ``beta_last``, the norm of the residual after the last step (0 when an
    invariant subspace was found)."""

    alphas: np.ndarray
    betas: np.ndarray
    basis: jax.Array
    beta_last: float

    @property
    def num_iters(self) -> int:
        return len(self.alphas)

    def ritz(self) -> tuple[np.ndarray, np.ndarray]:
        """Eigenvalues (ascending) and eigenvectors (columns) of ``T``."""
        from scipy.linalg import eigh_tridiagonal

        if len(self.alphas) == 1:
            return self.alphas.copy(), np.ones((1, 1))
        return eigh_tridiagonal(self.alphas, self.betas)


def lanczos(matvec: Callable, dim: int, num_iters: int, key: jax.Array, dtype=jnp.float32,
            start: Optional[jax.Array] = None) -> LanczosResult:
    """``num_iters`` steps of Lanczos with full re-orthogonalization from a Gaussian start (or ``start``).

    Stops early when the Krylov space becomes invariant (``beta < 1e-6 * ||T||``); never runs more than ``dim``
    steps. The loop runs on the host; vector operations stay on the device.
    """
    if num_iters < 1 or dim < 1:
        raise ValueError(f"lanczos needs num_iters >= 1 and dim >= 1, got {num_iters}, {dim}")
    m = min(int(num_iters), int(dim))
    v = jax.random.normal(key, (dim,), dtype) if start is None else jnp.asarray(start, dtype)
    v = v / jnp.linalg.norm(v)
    basis = _set_row_jit(jnp.zeros((m, dim), dtype), 0, v)
    alphas, betas = [], []
    w = matvec(v)
    a = float(jnp.vdot(w, v))
    alphas.append(a)
    w = w - a * v
    scale = abs(a)
    beta_last = 0.0
    for j in range(1, m + 1):
        w = _reorthogonalize(basis, w)
        b = float(jnp.linalg.norm(w))
        scale = max(scale, b)
        if b <= 1e-6 * scale:
            beta_last = 0.0
            break
        if j == m:
            beta_last = b
            break
        v_prev, v = v, w / b
        basis = _set_row_jit(basis, j, v)
        betas.append(b)
        w = matvec(v)
        a = float(jnp.vdot(w, v))
        alphas.append(a)
        scale = max(scale, abs(a))
        w = w - a * v - b * v_prev
    k = len(alphas)
    return LanczosResult(np.asarray(alphas, np.float64), np.asarray(betas, np.float64), basis[:k], beta_last)


@dataclasses.dataclass
class EigenResult:
    """``top``: the k largest eigenvalues (descending); ``bottom``: the k smallest (ascending). ``*_residuals``:
    Ritz residual norms ``||H y - theta y||`` (small = converged). ``top_vectors``: ``[k, dim]`` unit Ritz vectors
    for ``top`` (when requested)."""

    top: np.ndarray
    bottom: np.ndarray
    top_residuals: np.ndarray
    bottom_residuals: np.ndarray
    num_iters: int
    top_vectors: Optional[jax.Array] = None

    @property
    def max(self) -> float:
        return float(self.top[0])

    @property
    def min(self) -> float:
        return float(self.bottom[0])


def extreme_eigenvalues(matvec: Callable, dim: int, key: jax.Array, k: int = 4, num_iters: int = 80,
                        vectors: bool = False, dtype=jnp.float32) -> EigenResult:
    """Top-k and bottom-k eigenvalues by one Lanczos run of ``num_iters`` steps (k=4 as in the paper's README).

    ``matvec`` may be a :class:`HessianOperator` (then ``dim`` may be ``None``).
    """
    if dim is None:
        dim = matvec.dim
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    res = lanczos(matvec, dim, max(num_iters, 2 * k), key, dtype)
    theta, s = res.ritz()
    resid = np.abs(res.beta_last * s[-1, :])
    k = min(k, len(theta))
    top_idx = np.arange(len(theta))[::-1][:k]
    bottom_idx = np.arange(len(theta))[:k]
    top_vectors = None
    if vectors:
        top_vectors = jnp.asarray(s[:, top_idx].T, res.basis.dtype) @ res.basis
    return EigenResult(theta[top_idx], theta[bottom_idx], resid[top_idx], resid[bottom_idx], res.num_iters,
                       top_vectors)


# ------------------------------------------------------------------------------------------ trace and density
@dataclasses.dataclass
class TraceResult:
    trace: float
    stderr: float
    samples: np.ndarray


def hutchinson_trace(matvec: Callable, dim: int, key: jax.Array, num_probes: int = 100,
                     dtype=jnp.float32, *, done: Optional[dict] = None,
                     on_probe: Optional[Callable[[int, float], Any]] = None) -> TraceResult:
    """Hutchinson's estimator ``mean_i z_i^T H z_i`` with Rademacher ``z_i`` (variance ``2 sum_{j != k} H_jk^2``).

    Resumption: ``done`` maps finished probe indices to their ``z^T H z`` (skipped; probe ``i`` always uses the
    ``i``-th key split from ``key``), ``on_probe(i, value)`` is called after each computed probe."""
    if dim is None:
        dim = matvec.dim
    if num_probes < 1:
        raise ValueError(f"num_probes must be >= 1, got {num_probes}")
    done = done or {}
    samples = []
    for i, kk in enumerate(jax.random.split(key, num_probes)):
        if i in done:
            samples.append(float(done[i]))
            continue
        z = jax.random.rademacher(kk, (dim,), dtype)
        samples.append(float(jnp.vdot(z, matvec(z))))
        if on_probe is not None:
            on_probe(i, samples[-1])
    samples = np.asarray(samples)
    stderr = float(samples.std(ddof=1) / math.sqrt(num_probes)) if num_probes > 1 else float("nan")
    return TraceResult(float(samples.mean()), stderr, samples)


@dataclasses.dataclass
class DensityResult:
    """``density`` on ``grid`` (integrates to ~1 over the grid); ``nodes``/``weights``: ``[probes, m]``
    quadrature nodes (Ritz values) and weights (squared first components, rows sum to 1), NaN-padded when a run
    stopped early; ``sigma``: the Gaussian broadening (standard deviation)."""

    grid: np.ndarray
    density: np.ndarray
    nodes: np.ndarray
    weights: np.ndarray
    sigma: float

    def mean(self) -> float:
        """Estimate of ``trace / dim`` (the first moment of the quadrature)."""
        return float(np.nanmean(np.nansum(self.nodes * self.weights, axis=1)))


def gaussian_density(grid, nodes, weights, sigma: float) -> np.ndarray:
    """``mean_rows sum_i w_i N(grid; node_i, sigma^2)`` (NaN entries ignored)."""
    nodes = np.atleast_2d(nodes)
    weights = np.atleast_2d(weights)
    ok = np.isfinite(nodes)
    d = np.where(ok[:, :, None], (grid[None, None, :] - np.where(ok, nodes, 0.0)[:, :, None]) / sigma, np.inf)
    kern = np.exp(-0.5 * d ** 2) / (sigma * math.sqrt(2 * math.pi))
    return np.mean(np.sum(np.where(ok, weights, 0.0)[:, :, None] * kern, axis=1), axis=0)


def spectral_density(matvec: Callable, dim: int, key: jax.Array, num_probes: int = 5, num_iters: int = 80,
                     grid_size: int = 1000, sigma: Optional[float] = None, sigma_rel: float = 0.01,
                     dtype=jnp.float32, *, done: Optional[dict] = None,
                     on_probe: Optional[Callable[[int, np.ndarray, np.ndarray], Any]] = None) -> DensityResult:
    """Stochastic Lanczos quadrature (Ghorbani et al. 2019) with ``num_probes`` Gaussian start vectors.

    ``sigma``: the Gaussian broadening (standard deviation); default ``sigma_rel`` times the range of the Ritz
    values. The grid extends 5 sigma past the extreme Ritz values, so the density integrates to 1 up to truncation
    (it is not renormalized).

    Resumption: ``done`` maps finished probe indices to their ``(nodes, weights)`` (skipped; probe ``i`` always
    uses the ``i``-th key split from ``key``), ``on_probe(i, nodes, weights)`` is called after each computed probe.
    """
    if dim is None:
        dim = matvec.dim
    if num_probes < 1:
        raise ValueError(f"num_probes must be >= 1, got {num_probes}")
    done = done or {}
    runs = []
    for i, kk in enumerate(jax.random.split(key, num_probes)):
        if i in done:
            runs.append(tuple(np.asarray(a, np.float64) for a in done[i]))
            continue
        res = lanczos(matvec, dim, num_iters, kk, dtype)
        theta, s = res.ritz()
        runs.append((theta, s[0, :] ** 2))
        if on_probe is not None:
            on_probe(i, *runs[-1])
    m = max(len(t) for t, _ in runs)
    nodes = np.full((num_probes, m), np.nan)
    weights = np.full((num_probes, m), np.nan)
    for i, (t, w) in enumerate(runs):
        nodes[i, :len(t)], weights[i, :len(w)] = t, w
    lo, hi = float(np.nanmin(nodes)), float(np.nanmax(nodes))
    if sigma is None:
        sigma = sigma_rel * max(hi - lo, 1e-12 + 1e-6 * max(abs(lo), abs(hi)))
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, grid_size)
    return DensityResult(grid, gaussian_density(grid, nodes, weights, sigma), nodes, weights, float(sigma))


# ---------------------------------------------------------------------------------------------------- outputs
def plot_density(result: DensityResult, path: str, eigen: Optional[EigenResult] = None, title: str = "") -> None:
    """PNG of the spectral density (log scale), with the extreme Lanczos eigenvalues marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    floor = max(result.density.max() * 1e-8, 1e-30)
    ax.semilogy(result.grid, np.maximum(result.density, floor))
    if eigen is not None:
        for v in np.concatenate([eigen.top, eigen.bottom]):
            ax.axvline(v, color="tab:red", lw=0.6, alpha=0.6)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (SLQ)")
    ax.set_title(title or "Hessian spectral density")
    fig.tight_layout()
    try:
        atomic_save_figure(path, fig, dpi=120)
    finally:
        plt.close(fig)


def _counting(matvec, progress):
    def counted(v):
        out = matvec(v)
        progress(1)
        return out

    return counted


EIGEN_FIELDS = ("top", "bottom", "top_residuals", "bottom_residuals")


def num_matvecs(dim: int, k: int = 4, num_iters: int = 80, trace_probes: int = 50, density_probes: int = 5) -> dict:
    """Hessian-vector products :func:`spectrum_summary` needs per unit (Lanczos may stop earlier on an invariant
    subspace): ``{"eigen": ..., "trace": per probe, "density": per probe}``."""
    return {"eigen": min(max(num_iters, 2 * k), dim), "trace": 1, "density": min(num_iters, dim)}


def spectrum_summary(op: HessianOperator, key: jax.Array, k: int = 4, num_iters: int = 80,
                     trace_probes: int = 50, density_probes: int = 5, vectors: bool = False, *,
                     done: Optional[dict] = None, on_unit: Optional[Callable[[str, dict], Any]] = None,
                     progress: Optional[Callable[[int], Any]] = None):
    """Eigenvalues, trace and density of ``op`` with independent keys split from ``key``; returns
    ``(summary dict for JSON, EigenResult, TraceResult, DensityResult)``.

    Resumption: the work is split into units -- ``"eigen"`` (the top/bottom-k Lanczos run), ``"trace_0007"`` (one
    Hutchinson probe), ``"density_0002"`` (one SLQ probe). ``done`` maps finished unit names to their arrays (as
    passed to ``on_unit(name, arrays)`` after each computed unit); those are not recomputed and the result equals
    an uninterrupted run's. (With ``vectors=True`` the eigen unit is always recomputed: eigenvectors are not
    saved.) ``progress(1)`` is called after every Hessian-vector product (see :func:`num_matvecs`)."""
    done = done or {}
    save = on_unit or (lambda name, arrays: None)
    matvec = op if progress is None else _counting(op, progress)
    k_eig, k_trace, k_density = jax.random.split(key, 3)
    if "eigen" in done and not vectors:
        u = done["eigen"]
        eig = EigenResult(*(np.asarray(u[f], np.float64) for f in EIGEN_FIELDS), int(u["num_iters"]))
    else:
        eig = extreme_eigenvalues(matvec, op.dim, k_eig, k=k, num_iters=num_iters, vectors=vectors)
        save("eigen", {**{f: getattr(eig, f) for f in EIGEN_FIELDS}, "num_iters": np.asarray(eig.num_iters)})
    trace = density = None
    if trace_probes > 0:
        trace_done = {i: done[f"trace_{i:04d}"]["value"] for i in range(trace_probes) if f"trace_{i:04d}" in done}
        trace = hutchinson_trace(matvec, op.dim, k_trace, trace_probes, done=trace_done,
                                 on_probe=lambda i, v: save(f"trace_{i:04d}", {"value": np.asarray(v)}))
    if density_probes > 0:
        dens_done = {i: (done[u]["nodes"], done[u]["weights"])
                     for i, u in ((i, f"density_{i:04d}") for i in range(density_probes)) if u in done}
        density = spectral_density(
            matvec, op.dim, k_density, density_probes, num_iters, done=dens_done,
            on_probe=lambda i, t, w: save(f"density_{i:04d}", {"nodes": t, "weights": w}))
    summary = {
        "lambda_max": eig.max,
        "lambda_min": eig.min,
        "convexity_ratio": abs(eig.min) / abs(eig.max) if eig.max != 0 else None,  # |lambda_min|/lambda_max
        "top_eigenvalues": eig.top.tolist(),
        "bottom_eigenvalues": eig.bottom.tolist(),
        "top_residuals": eig.top_residuals.tolist(),
        "bottom_residuals": eig.bottom_residuals.tolist(),
        "lanczos_iters": eig.num_iters,
    }
    if trace is not None:
        summary.update(trace=trace.trace, trace_stderr=trace.stderr, trace_probes=len(trace.samples))
    if density is not None:
        summary["density"] = {"grid": density.grid.tolist(), "density": density.density.tolist(),
                              "sigma": density.sigma, "nodes": np.nan_to_num(density.nodes, nan=0.0).tolist(),
                              "weights": np.nan_to_num(density.weights, nan=0.0).tolist(),
                              "mean_eigenvalue": density.mean(), "probes": density_probes}
    return summary, eig, trace, density


__all__ = ["HessianConfig", "HessianOperator", "adversarial_examples", "split_params", "merge_params",
           "flatten_params", "resolve_filter", "kernels_filter", "lanczos", "LanczosResult", "extreme_eigenvalues",
           "EigenResult", "hutchinson_trace", "TraceResult", "spectral_density", "DensityResult",
           "gaussian_density", "plot_density", "num_matvecs", "spectrum_summary"]
