"""The Hessian of the clean or robust loss with respect to a subset of the weights.

Pieces:

* :class:`HessianOperator`: ``v -> H v`` on the flattened selected parameters (``jax.flatten_util.ravel_pytree``
  order), by forward-over-reverse differentiation (``jax.jvp`` of ``jax.grad``), jitted per batch and accumulated
  over batches on the host.
* :func:`spectrum_summary`: the extreme eigenvalues (Lanczos), the trace (Hutchinson) and the spectral density
  (stochastic Lanczos quadrature) of the operator as one resumable computation, by the model-independent routines
  of :mod:`robust_flat.linalg` (the command line, ``python -m experiments.flatness --measure hessian``, is
  :mod:`experiments.hessian`); :func:`plot_density` draws the density.

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
import re
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.flatten_util import ravel_pytree

from robust_flat import xla
from robust_flat.attacks.common import check_data, cross_entropy
from robust_flat.attacks.pgd import PGDConfig, pgd
from robust_flat.batching import padded_batches
from robust_flat.io import atomic_save_figure
from robust_flat.linalg import (DensityResult, EigenResult, extreme_eigenvalues, hutchinson_trace,
                                spectral_density)
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


def adversarial_examples(logits_fn, params, model_state, x, y, key, config: PGDConfig = PGDConfig(steps=20),
                         batch_size: int = 128) -> np.ndarray:
    """PGD adversarial examples for ``(x, y)`` at fixed weights, in batches (one key per batch, from ``key``)."""
    x, y = check_data(x, y, name="hessian")
    f = bind(logits_fn, params, model_state)
    batches = list(padded_batches(x, y, batch_size))
    keys = jax.random.split(key, len(batches))
    out = [np.asarray(pgd(f, b.x, b.y, k, config))[:b.n_valid] for b, k in zip(batches, keys)]
    return np.concatenate(out)


class HessianOperator:
    """``H v`` for the Hessian of the (clean or robust) CE w.r.t. the selected parameters, on flat vectors.

    ``logits_fn``: ``(params, model_state, x) -> logits`` in eval mode (:func:`robust_flat.models.make_logits_fn`),
    hashable. ``key`` is needed only for ``loss="robust"`` (the PGD start). Attributes: ``dim``, ``paths`` (the
    selected parameters, in the order of the flat vector), ``x_used`` (the inputs of the loss: ``x`` or the fixed
    adversarial examples), ``num_hvps`` and ``hvp_seconds`` (host-side counters). ``adversarial``: adversarial
    examples computed earlier for the same weights, data and ``config.pgd`` (``loss="robust"`` only; e.g. saved by
    an interrupted CLI run): used instead of running the attack.

    Batches have a fixed shape (one compile): the last one is padded with zero-weight copies of its first example,
    which is exact only for an eval-mode ``logits_fn`` (train-mode BN would mix the copies into the batch
    statistics).
    """

    def __init__(self, logits_fn, params, model_state, x, y, config: HessianConfig = HessianConfig(),
                 key: Optional[jax.Array] = None, adversarial: Optional[np.ndarray] = None):
        x, y = check_data(x, y, name="hessian")
        if adversarial is not None:
            if config.loss != "robust":
                raise ValueError("adversarial examples are only used for loss='robust'")
            adversarial, _ = check_data(adversarial, y, name="hessian")
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
        self._batches = list(padded_batches(x, y, config.batch_size))
        n = len(x)
        self._coeffs = [1.0 if config.reduction == "sum" else b.n_valid / n for b in self._batches]
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
        for b, c in zip(self._batches, self._coeffs):
            hv = c * _hvp_jit(self.logits_fn, self.selected, self.rest, self.model_state, b.x, b.y, b.mask, v)
            out = hv if out is None else out + hv
        out.block_until_ready()
        self.hvp_seconds += time.perf_counter() - t0
        self.num_hvps += 1
        return out

    __call__ = matvec

    def loss(self) -> float:
        """The loss whose Hessian this is (same batch reduction)."""
        total = 0.0
        for b, c in zip(self._batches, self._coeffs):
            total += c * float(_loss_jit(self.logits_fn, self.selected, self.rest, self.model_state, b.x, b.y,
                                         b.mask))
        return total


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
           "flatten_params", "resolve_filter", "kernels_filter", "plot_density", "num_matvecs", "spectrum_summary"]
