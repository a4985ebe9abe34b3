"""Random perturbations in the weight neighbourhood B_xi(w) (average-case flatness, attack initializations).

Per unit (layer, filter or the global set, see :class:`~robust_flat.weights.neighbourhood.Neighbourhood`) with
radius ``r = xi * ||w_unit||`` (original weights) and a Gaussian direction ``g / ||g||``, ``g ~ N(0, I)``:

* ``"ball"`` (paper D1: "sample nu with ||nu_l|| <= xi ||w_l||"; read as uniform in the ball's volume):
  ``nu = r * u**(1/d) * g/||g||`` with ``u ~ U[0, 1]`` and ``d`` the unit's dimension
  (the code's ``LayerWiseL2UniformBallInitialization``). For layers with thousands of weights ``u**(1/d)`` is ~1,
  so this is practically the sphere except on tiny tensors (biases).
* ``"sphere"`` (the released code's average-case sampler, ``LayerWiseL2UniformSphereInitialization``):
  ``nu = r * g/||g||``, exactly on the sphere.
* ``"uniform_norm"`` (the code's worst-case initialization, ``LayerWiseL2UniformNormInitialization``):
  ``nu = r * u * g/||g||``, uniform in norm (not in volume).

Each leaf draws from ``fold_in(key, leaf_index)``, so the same key gives the same direction for any xi and any
rescaling of the weights (what the scale-invariance tests rely on). With a ``box`` the sample is projected (box
first, then the ball), as the code does for models trained with weight clipping. Unselected leaves are zeros.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from robust_flat.weights.neighbourhood import (Neighbourhood, _flatten, _safe_div, _unit_norms, project, radii,
                                               unit_sizes)

DISTRIBUTIONS = ("ball", "sphere", "uniform_norm")
_GLOBAL_U = 0x7FFFFFFF  # fold_in data for the single radius draw of a global ball


def sample(key: jax.Array, params, nb: Neighbourhood, distribution: str = "ball"):
    """One random perturbation ``nu`` (structure of ``params``) in/on B_xi(params). Pure and jit-able."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown weight distribution {distribution!r}; choose one of {', '.join(DISTRIBUTIONS)}")
    leaves, mask, treedef = _flatten(params, params, nb)
    r = radii(params, nb)
    sizes = unit_sizes(params, nb)
    keys = [jax.random.split(jax.random.fold_in(key, i)) for i in range(len(leaves))]
    g = [jax.random.normal(k[0], jnp.shape(l), jnp.float32) if m else None
         for k, l, m in zip(keys, leaves, mask)]
    gn = _unit_norms([x if x is not None else l for x, l in zip(g, leaves)], mask, nb.granularity)
    u_global = jax.random.uniform(jax.random.fold_in(key, _GLOBAL_U), (), jnp.float32)
    out = []
    for i, (l, m) in enumerate(zip(leaves, mask)):
        if not m:
            out.append(jnp.zeros_like(l))
            continue
        if distribution == "sphere":
            u = 1.0
        else:
            u = u_global if nb.granularity == "global" else jax.random.uniform(keys[i][1], jnp.shape(gn[i]),
                                                                                jnp.float32)
            if distribution == "ball":
                u = u ** (1.0 / sizes[i])
        out.append((_safe_div(g[i], gn[i]) * (r[i] * u)).astype(l.dtype))
    nu = jax.tree.unflatten(treedef, out)
    if nb.box is not None:
        nu = project(nu, params, nb)
    return nu
