"""Random perturbations in the weight neighbourhood B_xi(w) (average-case flatness, attack initializations).

Per unit (layer, filter or the global set, see :class:`~robust_flat.weights.neighbourhood.Neighbourhood`) with
radius ``r = xi * ||w_unit||`` (original weights) and a Gaussian direction ``g / ||g||``, ``g ~ N(0, I)``:

* ``"ball"`` (paper: "sample nu with ||nu_l|| <= xi ||w_l||"; read as uniform in the ball's volume;
  docs/paper-vs-code.md#nu-distribution):
  ``nu = r * u**(1/d) * g/||g||`` with ``u ~ U[0, 1]`` and ``d`` the unit's dimension
  (the code's ``LayerWiseL2UniformBallInitialization``). For layers with thousands of weights ``u**(1/d)`` is ~1,
  so this is practically the sphere except on tiny tensors (biases).
* ``"sphere"`` (the released code's average-case sampler, ``LayerWiseL2UniformSphereInitialization``):
  ``nu = r * g/||g||``, exactly on the sphere.
* ``"uniform_norm"`` (the code's worst-case initialization, ``LayerWiseL2UniformNormInitialization``):
  ``nu = r * u * g/||g||``, uniform in norm (not in volume).

All selected leaves share ONE random draw (the Gaussians and the radius factors), sliced per leaf in leaf order:
one random call per sample whatever the number of layers (each ``jax.random`` call costs ~1 s of XLA:CPU compile
time, so a call per leaf made compiling a small CNN's sampler take 40 s). The same key therefore gives the same
directions for any xi and any rescaling of the weights (what the scale-invariance tests rely on). With a ``box`` the
sample is projected (box first, then the ball), as the code does for models trained with weight clipping.
Unselected leaves are zeros.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from robust_flat.weights.neighbourhood import (Neighbourhood, _flatten, _safe_div, _unit_norms, project, radii,
                                               unit_sizes)

DISTRIBUTIONS = ("ball", "sphere", "uniform_norm")
_LOWEST = float(np.nextafter(np.float32(-1.0), np.float32(0.0)))


def _draw(key, n_normal: int, n_uniform: int):
    """``n_normal`` standard normals and ``n_uniform`` U[0, 1) numbers from ONE ``jax.random.uniform`` call (the normals
    by the inverse CDF, as ``jax.random.normal`` itself does): every random call costs seconds of XLA:CPU compile."""
    v = jax.random.uniform(key, (n_normal + n_uniform,), jnp.float32)
    g = jnp.sqrt(2.0) * jax.scipy.special.erfinv(jnp.maximum(2.0 * v[:n_normal] - 1.0, _LOWEST))
    return g, v[n_normal:]


def sample(key: jax.Array, params, nb: Neighbourhood, distribution: str = "ball"):
    """One random perturbation ``nu`` (structure of ``params``) in/on B_xi(params). Pure and jit-able."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown weight distribution {distribution!r}; choose one of {', '.join(DISTRIBUTIONS)}")
    leaves, mask, treedef = _flatten(params, params, nb)
    r = radii(params, nb)
    sizes = unit_sizes(params, nb)
    shapes = [tuple(jnp.shape(l)) for l in leaves]
    total = sum(int(np.prod(sh)) for sh, m in zip(shapes, mask) if m)
    # radius factors: one uniform per unit (per leaf or per filter), or one in total for a global ball
    unit_shapes = [((1,) * (len(sh) - 1) + (sh[-1],) if nb.granularity == "filter" and len(sh) > 2 else ())
                   if m else None for sh, m in zip(shapes, mask)]
    n_u = 0 if distribution == "sphere" else (
        1 if nb.granularity == "global" else sum(int(np.prod(sh)) for sh in unit_shapes if sh is not None))
    flat_g, flat_u = _draw(key, total, n_u)
    g, offset = [], 0
    for sh, m in zip(shapes, mask):
        if m:
            size = int(np.prod(sh))
            g.append(flat_g[offset:offset + size].reshape(sh))
            offset += size
        else:
            g.append(None)
    gn = _unit_norms([x if x is not None else l for x, l in zip(g, leaves)], mask, nb.granularity)
    out, offset = [], 0
    for i, (l, m) in enumerate(zip(leaves, mask)):
        if not m:
            out.append(jnp.zeros_like(l))
            continue
        if distribution == "sphere":
            u = 1.0
        else:
            if nb.granularity == "global":
                u = flat_u[0]
            else:
                size = int(np.prod(unit_shapes[i]))
                u = flat_u[offset:offset + size].reshape(unit_shapes[i])
                offset += size
            if distribution == "ball":
                u = u ** (1.0 / sizes[i])
        out.append((_safe_div(g[i], gn[i]) * (r[i] * u)).astype(l.dtype))
    nu = jax.tree.unflatten(treedef, out)
    if nb.box is not None:
        nu = project(nu, params, nb)
    return nu
