"""Model-independent linear algebra of a symmetric operator given as a matrix-vector product ``v -> A v`` on flat
vectors (e.g. :class:`robust_flat.hessian.HessianOperator`):

* :func:`lanczos` (full re-orthogonalization, host loop over jitted vector operations) and
  :func:`extreme_eigenvalues`: top-k (largest) and bottom-k (smallest, most negative) eigenvalues with Ritz
  residual bounds and optional eigenvectors.
* :func:`hutchinson_trace`: trace estimate with Rademacher probes.
* :func:`spectral_density`: stochastic Lanczos quadrature (Ghorbani, Krishnan & Xiao, ICML 2019): for each random
  unit start vector, the eigenpairs (theta_i, s_i) of the Lanczos tridiagonal give quadrature nodes theta_i with
  weights tau_i = s_i[0]^2 (they sum to 1); the density is the Gaussian-broadened mixture
  ``phi(t) = mean_probes sum_i tau_i N(t; theta_i, sigma^2)``, which integrates to 1 and estimates the eigenvalue
  distribution (1/n) sum_j delta(t - lambda_j).

The trace and density estimates are resumable probe by probe (``done``/``on_probe``). Memory: Lanczos with full
re-orthogonalization keeps the ``num_iters x dim`` basis (float32).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from robust_flat import xla


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
def _probes(probe: Callable[[jax.Array], Any], key: jax.Array, num_probes: int, done: dict,
            on_probe: Optional[Callable[[int, Any], Any]]) -> list:
    """``[probe(key_i) for i < num_probes]`` with ``key_i`` the ``i``-th key split from ``key``, except that the
    indices in ``done`` take their saved results (resumption); ``on_probe(i, result)`` after each computed probe."""
    if num_probes < 1:
        raise ValueError(f"num_probes must be >= 1, got {num_probes}")
    out = []
    for i, kk in enumerate(jax.random.split(key, num_probes)):
        if i in done:
            out.append(done[i])
            continue
        out.append(probe(kk))
        if on_probe is not None:
            on_probe(i, out[-1])
    return out


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

    def probe(kk):
        z = jax.random.rademacher(kk, (dim,), dtype)
        return float(jnp.vdot(z, matvec(z)))

    samples = np.asarray(_probes(probe, key, num_probes, {i: float(v) for i, v in (done or {}).items()}, on_probe))
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

    def probe(kk):
        theta, s = lanczos(matvec, dim, num_iters, kk, dtype).ritz()
        return theta, s[0, :] ** 2

    runs = _probes(probe, key, num_probes, {i: tuple(np.asarray(a, np.float64) for a in v)
                                            for i, v in (done or {}).items()},
                   None if on_probe is None else lambda i, r: on_probe(i, *r))
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


__all__ = ["lanczos", "LanczosResult", "extreme_eigenvalues", "EigenResult", "hutchinson_trace", "TraceResult",
           "spectral_density", "DensityResult", "gaussian_density"]
