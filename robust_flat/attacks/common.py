"""Pieces every input attack shares: input checks, losses, projections, initializations, and the jit wrapper.

Attacks take ``logits_fn: x -> logits``. Pass a ``jax.tree_util.Partial`` (see :func:`robust_flat.models.bind`) to
keep the weights as traced leaves, so new weights do not recompile the attack; any other hashable callable is
treated as a static argument.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from robust_flat import xla


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_inputs(x, eps: float | None = None, name: str = "attack") -> None:
    """Raise ``ValueError`` unless ``x`` lies in [0, 1] (checked only on concrete arrays) and ``eps > 0``."""
    if eps is not None and not (eps > 0):
        raise ValueError(f"{name}: eps must be > 0, got {eps}")
    if _is_concrete(x):
        arr = np.asarray(x)
        if arr.size and not np.all(np.isfinite(arr)):
            raise ValueError(f"{name}: inputs contain NaN or inf")
        if arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
            raise ValueError(f"{name}: inputs must lie in [0, 1], got range [{arr.min():.4g}, {arr.max():.4g}]; "
                             "scale images to [0, 1] and normalize inside the model")


NORMS = ("linf", "l2")


def check_threat_model(attack: str, eps: float, norm: str) -> None:
    """The threat-model checks of every attack's config: ``eps > 0`` and ``norm`` one of :data:`NORMS`."""
    if not eps > 0:
        raise ValueError(f"{attack} eps must be > 0, got {eps}")
    if norm not in NORMS:
        raise ValueError(f"{attack} norm must be linf or l2, got {norm!r}")


def check_data(x, y, eps: float | None = None, name: str = "attack", *, allow_empty: bool = False):
    """``(x, y)`` as float32 and int32 NumPy arrays after checking them as an evaluation set: ``x [N, ...]`` (at
    least 2 dims) and ``y [N]`` integer labels with ``N > 0`` (``N >= 0`` with ``allow_empty``), ``x`` in [0, 1]
    and ``eps > 0`` (:func:`check_inputs`). A failure is a ``ValueError`` naming ``name``."""
    x = np.asarray(x, np.float32)
    y = np.asarray(y)
    if x.ndim < 2 or y.shape != x.shape[:1] or (x.shape[0] == 0 and not allow_empty):
        raise ValueError(f"{name}: expected x [N, ...] and y [N] with N {'>=' if allow_empty else '>'} 0, got shapes "
                         f"{x.shape} and {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name}: labels must be integers, got {y.dtype}")
    check_inputs(x, eps, name)
    return x, y.astype(np.int32)


def bucket_sizes(batch_size: int, shape_buckets: int) -> list[int]:
    """The ``shape_buckets`` largest of the sizes ``ceil(batch_size / 2^k)`` and ``ceil(3 batch_size / 2^(k+2))``
    (two per octave: 128, 96, 64, 48, 32, 24, ... for a batch of 128), ascending."""
    sizes, k = [], 0
    while len(sizes) < max(shape_buckets, 1) and 2 ** k <= 4 * batch_size:
        for s in (-(-batch_size // 2 ** k), -(-3 * batch_size // 2 ** (k + 2))):
            if s not in sizes and len(sizes) < max(shape_buckets, 1):
                sizes.append(s)
        k += 1
    return sorted(sizes)


def bucket_size(n: int, batch_size: int, shape_buckets: int) -> int:
    """The smallest of :func:`bucket_sizes` that holds ``n`` points: a subset of a batch padded to one of a few
    fixed shapes compiles at most ``shape_buckets`` times and wastes at most a third of its rows on padding (above
    the smallest size)."""
    return next(s for s in bucket_sizes(batch_size, shape_buckets) if s >= n) if n <= batch_size else batch_size


def jit_logits_fn(fn: Callable) -> Callable:
    """jit ``fn(logits_fn, *args, config=...)`` (via :func:`robust_flat.xla.jit`) with ``config`` static;
    ``logits_fn`` is traced when it is a ``jax.tree_util.Partial`` (new weights: no recompile) and static otherwise."""
    traced = xla.jit(fn, static_argnames=("config",))
    static = xla.jit(fn, static_argnames=("logits_fn", "config"))

    def call(logits_fn, *args, config):
        jitted = traced if isinstance(logits_fn, jax.tree_util.Partial) else static
        return jitted(logits_fn, *args, config=config)

    return call


def jit_attack(fn: Callable) -> Callable:
    """:func:`jit_logits_fn` for ``fn(logits_fn, x, y, key, config)``, with the inputs checked first."""
    jitted = jit_logits_fn(fn)

    @functools.wraps(fn)
    def wrapper(logits_fn, x, y, key, config):
        check_inputs(x, getattr(config, "eps", None), fn.__name__)
        return jitted(logits_fn, x, y, key, config=config)

    wrapper.raw = fn  # the un-jitted function, for use inside other traced code
    return wrapper


# ---------------------------------------------------------------------------------------------------- losses
def cross_entropy(logits, y):
    """Per-example cross-entropy with integer labels."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.take_along_axis(logp, y[:, None].astype(jnp.int32), axis=1)[:, 0]


def kl_from_clean(logits, clean_logits):
    """Per-example KL(softmax(clean) || softmax(logits)); TRADES' attack objective (``y`` = clean logits)."""
    p = jax.nn.softmax(clean_logits.astype(jnp.float32))
    return jnp.sum(p * (jax.nn.log_softmax(clean_logits.astype(jnp.float32))
                        - jax.nn.log_softmax(logits.astype(jnp.float32))), axis=-1)


def dlr_loss(logits, y):
    """Untargeted difference-of-logits-ratio loss (Croce & Hein 2020); larger is more adversarial."""
    logits = logits.astype(jnp.float32)
    srt = jnp.sort(logits, axis=1)
    z_y = jnp.take_along_axis(logits, y[:, None].astype(jnp.int32), axis=1)[:, 0]
    top_is_y = jnp.argmax(logits, axis=1) == y
    other = jnp.where(top_is_y, srt[:, -2], srt[:, -1])
    return -(z_y - other) / (srt[:, -1] - srt[:, -3] + 1e-12)


LOSSES: dict[str, Callable] = {"ce": cross_entropy, "kl": kl_from_clean, "dlr": dlr_loss}


def get_loss(loss) -> Callable:
    if callable(loss):
        return loss
    try:
        return LOSSES[loss]
    except KeyError:
        raise ValueError(f"unknown attack loss {loss!r}; choose one of {', '.join(LOSSES)} or pass a callable") from None


# ----------------------------------------------------------------------------------------------- geometry
def _per_example_norm(v, norm: str):
    flat = v.reshape(v.shape[0], -1)
    if norm == "linf":
        return jnp.max(jnp.abs(flat), axis=1)
    if norm == "l2":
        return jnp.sqrt(jnp.sum(flat * flat, axis=1))
    raise ValueError(f"unknown norm {norm!r}; choose linf or l2")


def _bcast(v, like):
    return v.reshape((-1,) + (1,) * (like.ndim - 1))


def project(delta, x, eps: float, norm: str):
    """Box [0, 1] for ``x + delta`` first, then the eps-ball (the paper's order; the result satisfies both)."""
    delta = jnp.clip(delta, -x, 1.0 - x)
    if norm == "linf":
        return jnp.clip(delta, -eps, eps)
    n = _per_example_norm(delta, "l2")
    return delta * _bcast(jnp.minimum(1.0, eps / jnp.maximum(n, 1e-12)), delta)


def normalize_gradient(g, norm: str):
    """Steepest-ascent direction for the norm: sign for L-inf, unit L2 per example for L2."""
    if norm == "linf":
        return jnp.sign(g)
    return g / _bcast(jnp.maximum(_per_example_norm(g, "l2"), 1e-12), g)


def init_delta(key, x, eps: float, norm: str, kind: str):
    """Random start. ``uniform_norm`` (paper/code): eps * u * g / ||g|| with g ~ N(0, I), u ~ U[0, 1] per example;
    ``uniform``: U[-eps, eps]^D for L-inf (Madry et al.), uniform in the ball for L2; ``small_normal``: 0.001 * N(0, I)
    whatever eps (the original TRADES attack, Zhang et al. 2019); ``zero``: no random start."""
    if kind == "zero":
        return jnp.zeros_like(x)
    if kind == "small_normal":
        return 0.001 * jax.random.normal(key, x.shape, x.dtype)
    kg, ku = jax.random.split(key)
    if kind == "uniform" and norm == "linf":
        return jax.random.uniform(kg, x.shape, x.dtype, -eps, eps)
    g = jax.random.normal(kg, x.shape, x.dtype)
    g = g / _bcast(jnp.maximum(_per_example_norm(g, norm), 1e-12), g)
    u = jax.random.uniform(ku, (x.shape[0],), x.dtype)
    if kind == "uniform":  # uniform in the L2 ball volume
        u = u ** (1.0 / np.prod(x.shape[1:]))
    elif kind != "uniform_norm":
        raise ValueError(f"unknown initialization {kind!r}; choose uniform_norm, uniform, small_normal or zero")
    return eps * _bcast(u, x) * g
