"""The weight neighbourhood B_xi(w) of the paper: a relative, layer-wise L2 ball.

    B_xi(w) = { w + nu : ||nu_l||_2 <= xi * ||w_l||_2 for every selected layer l }     (paper eq. main-ball)

* Layers are the leaves picked by :class:`~robust_flat.weights.selection.LayerSelection` (conv/dense kernels and biases,
  each its own layer; BN, whitening and aux heads excluded). Unselected leaves are never perturbed: a perturbation
  ``nu`` is a pytree with the structure of ``params`` whose unselected leaves are zeros, and :func:`perturb` returns
  those leaves of ``params`` unchanged.
* Radii always come from the ORIGINAL weights ``params`` (never from ``params + nu``); the ball is centred at ``w``.

Options (:class:`Neighbourhood`):

* ``granularity="layer"`` (paper), ``"filter"`` (Li et al. / the code's ``FilterWise*``: one ball per output filter of
  tensors with more than 2 dims -- Flax conv kernels are HWIO, so the output axis is the LAST one; dense kernels and
  biases stay one unit, as in the code), or ``"global"`` (one ball over all selected leaves together, as the code's
  ``L2Projection(relative_epsilon)`` ablation, though restricted to the selected leaves).
* ``relative=True`` (paper): radius ``xi * ||w_unit||``; ``relative=False``: absolute radius ``xi`` per unit.
* ``box``: for models trained with weight clipping the code prepends the box ``[-box, box]`` on the perturbed
  weights to the projection (docs/paper-vs-code.md#weight-clipping); :func:`project` does the same (box first, then
  ball; the result satisfies both because the ball is shrunk towards ``w``, which lies in the box).

All functions are pure, jit-able and take the neighbourhood as a static (hashable) configuration.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from robust_flat.weights.selection import LayerSelection, path_string, selection_mask

GRANULARITIES = ("layer", "filter", "global")


@dataclasses.dataclass(frozen=True)
class Neighbourhood:
    """B_xi(w). Defaults: the paper's layer-wise relative ball with the average-case radius xi = 0.5."""

    xi: float = 0.5
    granularity: str = "layer"
    relative: bool = True
    selection: LayerSelection = LayerSelection()
    box: Optional[float] = None

    def __post_init__(self):
        # xi may be a tracer inside jitted code (robust_flat.flatness traces it so a sweep over xi compiles once)
        if not isinstance(self.xi, jax.core.Tracer) and (not (self.xi >= 0) or not np.isfinite(self.xi)):
            raise ValueError(f"Neighbourhood xi must be a finite number >= 0, got {self.xi}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {self.granularity!r}; choose one of {', '.join(GRANULARITIES)}")
        if self.box is not None and not self.box > 0:
            raise ValueError(f"Neighbourhood box must be > 0 (or None), got {self.box}")
        if not isinstance(self.selection, LayerSelection):
            raise ValueError(f"selection must be a LayerSelection, got {type(self.selection).__name__}")


# ------------------------------------------------------------------------------------------------ internals
def _flatten(tree, params, nb: Neighbourhood):
    """Leaves of ``tree`` (structured like ``params``), the selection mask and the treedef."""
    leaves, treedef = jax.tree.flatten(tree)
    if tree is not params and treedef != jax.tree.structure(params):
        raise ValueError(f"the perturbation's tree structure {treedef} differs from the params' "
                         f"{jax.tree.structure(params)}; pass a pytree with the structure of params")
    mask = jax.tree.leaves(selection_mask(params, nb.selection))
    return leaves, mask, treedef


def _sq_sum(leaf, granularity: str):
    """Sum of squares per unit, shaped to broadcast against the leaf (scalar, or (1, ..., 1, O) per filter)."""
    leaf = leaf.astype(jnp.float32)
    if granularity == "filter" and leaf.ndim > 2:
        return jnp.sum(leaf * leaf, axis=tuple(range(leaf.ndim - 1)), keepdims=True)
    return jnp.sum(leaf * leaf)


def _unit_norms(leaves, mask, granularity: str):
    """Per-leaf norms of the units (None for unselected leaves); global: one shared scalar."""
    if granularity == "global":
        total = sum((_sq_sum(l, "layer") for l, m in zip(leaves, mask) if m), jnp.zeros((), jnp.float32))
        n = jnp.sqrt(total)
        return [n if m else None for m in mask]
    return [jnp.sqrt(_sq_sum(l, granularity)) if m else None for l, m in zip(leaves, mask)]


def _safe_div(a, b):
    return a / jnp.where(b > 0, b, 1.0)


def unit_sizes(params, nb: Neighbourhood) -> list[Optional[int]]:
    """Dimension of each leaf's unit (for the uniform-in-ball radius law); None for unselected leaves."""
    leaves, mask, _ = _flatten(params, params, nb)
    if nb.granularity == "global":
        d = int(sum(int(np.prod(np.shape(l))) for l, m in zip(leaves, mask) if m))
        return [d if m else None for m in mask]
    out = []
    for l, m in zip(leaves, mask):
        shape = np.shape(l)
        if not m:
            out.append(None)
        elif nb.granularity == "filter" and len(shape) > 2:
            out.append(int(np.prod(shape[:-1])))
        else:
            out.append(int(np.prod(shape)))
    return out


# ------------------------------------------------------------------------------------------------ public API
def scales(params, nb: Neighbourhood) -> list:
    """Per leaf (leaf order): the unit scale s_l = ||w_l|| (relative) or 1 (absolute), broadcastable to the leaf;
    None for unselected leaves. The radius is ``xi * s_l``; gradients are normalized to length ``s_l``."""
    leaves, mask, _ = _flatten(params, params, nb)
    if nb.relative:
        return _unit_norms(leaves, mask, nb.granularity)
    return [jnp.ones((), jnp.float32) if m else None for m in mask]


def radii(params, nb: Neighbourhood) -> list:
    """Per leaf: the ball radius ``xi * s_l`` from the ORIGINAL weights (None for unselected leaves)."""
    return [None if s is None else nb.xi * s for s in scales(params, nb)]


def norms(nu, params, nb: Neighbourhood) -> list:
    """Per leaf: the per-unit L2 norms of ``nu`` (None for unselected leaves)."""
    leaves, mask, _ = _flatten(nu, params, nb)
    return _unit_norms(leaves, mask, nb.granularity)


def zeros(params):
    """The zero perturbation (structure of ``params``)."""
    return jax.tree.map(jnp.zeros_like, params)


def perturb(params, nu, nb: Neighbourhood):
    """``w + nu`` on the selected leaves; unselected leaves of ``params`` are returned untouched."""
    p_leaves, mask, treedef = _flatten(params, params, nb)
    n_leaves, _, _ = _flatten(nu, params, nb)
    out = [(p + n.astype(p.dtype)) if m else p for p, n, m in zip(p_leaves, n_leaves, mask)]
    return jax.tree.unflatten(treedef, out)


def project(nu, params, nb: Neighbourhood):
    """Projection onto the neighbourhood: box on ``w + nu`` (if ``box``), then ``nu_l * min(1, r_l / ||nu_l||)`` per
    unit. Unselected leaves become zeros."""
    n_leaves, mask, treedef = _flatten(nu, params, nb)
    p_leaves = jax.tree.leaves(params)
    if nb.box is not None:
        n_leaves = [(jnp.clip(p + n, -nb.box, nb.box) - p) if m else n for p, n, m in zip(p_leaves, n_leaves, mask)]
    r = radii(params, nb)
    current = _unit_norms(n_leaves, mask, nb.granularity)
    out = []
    for n, m, r_l, c_l in zip(n_leaves, mask, r, current):
        if not m:
            out.append(jnp.zeros_like(n))
            continue
        factor = jnp.where(c_l > r_l, _safe_div(r_l, c_l), 1.0)
        out.append((n * factor).astype(n.dtype))
    return jax.tree.unflatten(treedef, out)


def normalize(g, params, nb: Neighbourhood):
    """Relative gradient normalization ``g_l / ||g_l|| * s_l`` per unit (paper eq. supp-normalization; the code's
    ``LayerWiseRelativeL2Normalization``; ``s_l = ||w_l||``, or 1 for an absolute ball). A zero gradient stays zero
    (the code divides without an epsilon). Unselected leaves become zeros."""
    g_leaves, mask, treedef = _flatten(g, params, nb)
    s = scales(params, nb)
    gn = _unit_norms(g_leaves, mask, nb.granularity)
    out = [(_safe_div(l, n) * s_l).astype(l.dtype) if m else jnp.zeros_like(l)
           for l, m, n, s_l in zip(g_leaves, mask, gn, s)]
    return jax.tree.unflatten(treedef, out)


def relative_norms(nu, params, nb: Neighbourhood) -> dict[str, np.ndarray]:
    """``{path: ||nu_unit|| / r_unit}`` for every selected leaf (concrete arrays; 1 = on the sphere).
    Units with radius 0 report 0 if nu is 0 there and inf otherwise."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    r = radii(params, nb)
    c = norms(nu, params, nb)
    out = {}
    for (path, _), r_l, c_l in zip(flat, r, c):
        if r_l is None:
            continue
        r_l, c_l = np.asarray(r_l, np.float64), np.asarray(c_l, np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(r_l > 0, c_l / np.where(r_l > 0, r_l, 1.0), np.where(c_l > 0, np.inf, 0.0))
        out[path_string(path)] = ratio
    return out


def within_ball(nu, params, nb: Neighbourhood, rtol: float = 1e-5, atol: float = 1e-7) -> bool:
    """Whether ``params + nu`` lies in B_xi(params): every selected unit has ``||nu_u|| <= r_u (1 + rtol) + atol``,
    every unselected leaf of ``nu`` is exactly zero, and (with ``box``) ``|w + nu| <= box`` (+ atol). Concrete check."""
    n_leaves, mask, _ = _flatten(nu, params, nb)
    p_leaves = jax.tree.leaves(params)
    r = radii(params, nb)
    c = _unit_norms(n_leaves, mask, nb.granularity)
    for n, p, m, r_l, c_l in zip(n_leaves, p_leaves, mask, r, c):
        if not m:
            if np.any(np.asarray(n) != 0):
                return False
            continue
        if np.any(np.asarray(c_l) > np.asarray(r_l) * (1 + rtol) + atol):
            return False
        if nb.box is not None and np.any(np.abs(np.asarray(p) + np.asarray(n)) > nb.box + atol):
            return False
    return True
