"""Square Attack (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020): score-based random search, L-inf and L2.

Semantics follow AutoAttack's PyTorch code (`fra31/auto-attack:autoattack/square.py`); AutoAttack "standard" runs it
untargeted with the margin loss, 5000 queries, ``p_init = 0.8`` and 1 restart.

* Start (L-inf): vertical stripes, ``x + eps * s`` with one random sign per (column, channel), clipped to [0, 1].
  Start (L2): a grid of ``h // 5``-sized blocks, each holding the two-lobed "eta" pattern with a random sign per
  channel, rescaled to L2 norm eps, clipped to [0, 1].
* Query ``i`` (``i = 0 .. n_queries - 1``): the square side is ``s = round(sqrt(p(i) * h * w))``, with the
  original's piecewise schedule ``p(i)`` (``p_init`` halved at 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 on
  the 10000-query scale; ``rescale_schedule`` maps ``n_queries`` onto it). L-inf: s >= 1; the window gets
  ``+-2 eps`` per channel and is projected back onto the ball and the box. L2: s >= 3 and odd; the window's mass
  is redrawn from ``eta(s)`` plus the old window content, a second window is zeroed, and the whole perturbation is
  rescaled to norm eps.
* A candidate replaces the current point when it lowers the loss, or when it misclassifies; the loss itself is only
  ever lowered, so it is monotone in the number of queries (see :func:`square_trace`). Points stop being updated
  once their margin is <= 0. The queries run in a ``lax.while_loop`` that ends early once every point is fooled.
* Only points classified correctly at the start are attacked. Points that stay robust come back unchanged, as in
  the original.

Window positions follow the original, ``floor(u * (h - s))`` with ``u ~ U[0, 1)``: the window never touches the last
row or column unless ``s = h``. Difference from the PyTorch code: per query it draws ONE window position and eta
orientation, and for L-inf one sign pattern, for the whole batch. Here they are drawn per example by default, as
in the paper's reference implementation (`max-andr/square-attack`). The distribution for each single example is the
same, so robust accuracy agrees in expectation. ``shared_window=True`` restores the batch-shared draws. The L2
signs and both initializations are per example in the PyTorch code as well. Masks are built by comparing iotas with
the per-example window corners, not by dynamic slicing.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from robust_flat.attacks.common import check_threat_model, cross_entropy, jit_attack

_LOSSES = ("margin", "ce")


@dataclasses.dataclass(frozen=True)
class SquareConfig:
    """Defaults are Square as AutoAttack "standard" runs it: L-inf eps 8/255, 5000 queries, p_init 0.8, 1 restart.

    ``loss``: ``"margin"`` (AutoAttack, ``z_y - max_{k != y} z_k``) or ``"ce"`` (minimizes ``-CE``).
    ``rescale_schedule``: map the p schedule onto ``n_queries`` (original default True).
    ``shared_window``: one window and sign pattern per query for the whole batch, as AutoAttack's PyTorch code does.
    """

    eps: float = 8 / 255
    norm: str = "linf"
    n_queries: int = 5000
    p_init: float = 0.8
    n_restarts: int = 1
    loss: str = "margin"
    rescale_schedule: bool = True
    shared_window: bool = False

    def __post_init__(self):
        check_threat_model("Square", self.eps, self.norm)
        if self.loss not in _LOSSES:
            raise ValueError(f"Square loss must be margin or ce, got {self.loss!r}")
        if self.n_queries < 0 or self.n_restarts < 1:
            raise ValueError(f"Square needs n_queries >= 0 and n_restarts >= 1, got {self.n_queries}, "
                             f"{self.n_restarts}")
        if not 0.0 < self.p_init <= 1.0:
            raise ValueError(f"Square p_init must lie in (0, 1], got {self.p_init}")


# ------------------------------------------------------------------------------------------ static schedule
_P_BOUNDS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_schedule(i: int, n_queries: int, p_init: float, rescale: bool = True) -> float:
    """The fraction ``p`` of pixels changed at query ``i`` (the original's ``p_selection``)."""
    it = int(i / n_queries * 10000) if rescale else i
    halvings = sum(it > bound for bound in _P_BOUNDS)
    return p_init / 2 ** halvings


def square_sizes(n_queries: int, p_init: float, h: int, w: int, norm: str, rescale: bool = True) -> np.ndarray:
    """Square side per query (int32 [n_queries]); computed at trace time, so the schedule is exact."""
    sizes = np.empty(max(n_queries, 0), np.int32)
    for i in range(n_queries):
        s = int(round(math.sqrt(p_schedule(i, n_queries, p_init, rescale) * h * w)))
        if norm == "linf":
            s = max(s, 1)
        else:
            s = max(s, 3)
            s += 1 - s % 2  # odd
        sizes[i] = min(s, h, w)
    return sizes


def _eta_rectangle(rows: int, cols: int) -> np.ndarray:
    """Nested rectangles around the centre, weight 1 / (k + 1)^2 for ring ``k``, unit L2 norm."""
    if rows == 0:
        return np.zeros((0, cols), np.float64)
    ci, cj = rows // 2, cols // 2
    rings = max(rows // 2 + 1, cols // 2 + 1)
    dist = np.maximum(np.abs(np.arange(rows)[:, None] - ci), np.abs(np.arange(cols)[None, :] - cj))
    tail = np.cumsum((1.0 / (np.arange(rings) + 1.0) ** 2)[::-1])[::-1]  # tail[d] = sum_{k >= d} 1 / (k + 1)^2
    out = tail[dist]
    return out / np.sqrt(np.sum(out ** 2))


def eta_pattern(s: int) -> np.ndarray:
    """The L2 window pattern of side ``s``: a positive upper and a negative lower lobe, unit L2 norm (untransposed)."""
    out = np.concatenate([_eta_rectangle(s // 2, s), -_eta_rectangle(s - s // 2, s)], axis=0)
    return out / np.sqrt(np.sum(out ** 2))


# ------------------------------------------------------------------------------------------ helpers
def _margin_and_loss(logits, y, loss: str):
    logits = logits.astype(jnp.float32)
    onehot = jax.nn.one_hot(y, logits.shape[1], dtype=bool)
    z_y = jnp.sum(jnp.where(onehot, logits, 0.0), axis=1)
    z_other = jnp.max(jnp.where(onehot, -jnp.inf, logits), axis=1)
    margin = z_y - z_other
    if loss == "margin":
        return margin, margin
    return margin, -cross_entropy(logits, y)


def _bcast(v, like):
    return v.reshape((-1,) + (1,) * (like.ndim - 1))


def _uniforms(key, *shapes):
    """Independent U[0, 1) arrays of the given shapes from ONE flat draw.

    XLA:CPU compiles a threefry draw of a multi-dimensional shape several times slower than a flat one, and every
    call site costs compile time. One flat draw per step keeps the attack's compile time low.
    """
    sizes = [int(np.prod(shape)) for shape in shapes]
    flat = jax.random.uniform(key, (sum(sizes),))
    out, start = [], 0
    for shape, size in zip(shapes, sizes):
        out.append(flat[start:start + size].reshape(shape))
        start += size
    return out


def _signs(u):
    return jnp.where(u < 0.5, -1.0, 1.0)


def _corner(u, dim: int, s):
    """Window corner ``floor(u * (dim - s))``, as the original draws it."""
    return jnp.floor(u * (dim - s)).astype(jnp.int32)


def _window(vh, vw, s, h: int, w: int):
    """[n, h, w, 1] boolean masks of the s x s windows at (vh, vw), from iota comparisons."""
    rows = lax.broadcasted_iota(jnp.int32, (1, h, w, 1), 1)
    cols = lax.broadcasted_iota(jnp.int32, (1, h, w, 1), 2)
    vh, vw = vh[:, None, None, None], vw[:, None, None, None]
    return (rows >= vh) & (rows < vh + s) & (cols >= vw) & (cols < vw + s)


def _l2_norm(v, axes):
    return jnp.sqrt(jnp.sum(v * v, axis=axes, keepdims=True))


# ------------------------------------------------------------------------------------------ initializations
def _init_linf(key, x, eps):
    n, _, w, c = x.shape
    (u,) = _uniforms(key, (n, 1, w, c))
    return jnp.clip(x + eps * _signs(u), 0.0, 1.0)


def _init_l2(key, x, eps, draws):
    n, h, w, c = x.shape
    s = h // 5
    if s < 1:
        raise ValueError(f"square: L2 initialization needs images of height >= 5, got {h}")
    start = (h - 5 * s) // 2
    pattern = jnp.asarray(eta_pattern(s), x.dtype)
    blocks = [(start + bi * s, start + bj * s) for bi in range(h // s) for bj in range(w // s)]
    blocks = [(r0, c0) for r0, c0 in blocks if r0 < h and c0 < w]
    u_flip, u_sign = _uniforms(key, (len(blocks), draws, 1, 1, 1), (len(blocks), n, 1, 1, c))
    delta = jnp.zeros_like(x)
    for block, (r0, c0) in enumerate(blocks):
        r1, c1 = min(r0 + s, h), min(c0 + s, w)
        eta = jnp.where(u_flip[block] < 0.5, pattern.T[None, :, :, None], pattern[None, :, :, None])
        delta = delta.at[:, r0:r1, c0:c1, :].add((eta * _signs(u_sign[block]))[:, :r1 - r0, :c1 - c0, :])
    delta = delta / (_l2_norm(delta, (1, 2, 3)) + 1e-12)
    return jnp.clip(x + eps * delta, 0.0, 1.0)


# ------------------------------------------------------------------------------------------ one run
@functools.lru_cache(maxsize=64)
def _schedule(config: SquareConfig, h: int, w: int):
    """Static per-query square sides and, for L2, the padded table of eta patterns (numpy, built at trace time)."""
    sizes = (square_sizes(config.n_queries, config.p_init, h, w, config.norm, config.rescale_schedule)
             if config.n_queries else np.full(1, 3, np.int32))
    distinct = sorted(set(int(s) for s in sizes))
    s_max = max(distinct)
    table = np.zeros((len(distinct), s_max, s_max), np.float32)
    stage_of_size = np.zeros(s_max + 1, np.int32)
    if config.norm == "l2":
        for j, s in enumerate(distinct):
            table[j, :s, :s] = eta_pattern(s)
        stage_of_size[distinct] = np.arange(len(distinct))
    return sizes, table, stage_of_size


def _candidate_linf(key, x, x_best, s, config: SquareConfig):
    n, h, w, c = x.shape
    draws = 1 if config.shared_window else n
    eps = config.eps
    u_h, u_w, u_sign = _uniforms(key, (draws,), (draws,), (draws, 1, 1, c))
    mask = _window(_corner(u_h, h, s), _corner(u_w, w, s), s, h, w)
    x_new = x_best + jnp.where(mask, 2.0 * eps * _signs(u_sign), 0.0)
    return jnp.clip(jnp.clip(x_new, x - eps, x + eps), 0.0, 1.0)


def _candidate_l2(key, x, x_best, s, table, stage_of_size, config: SquareConfig):
    n, h, w, c = x.shape
    draws = 1 if config.shared_window else n
    eps = config.eps
    u_pos, u_flip, u_sign = _uniforms(key, (4, draws), (draws, 1, 1), (n, 1, 1, c))
    vh1, vw1, vh2, vw2 = (_corner(u_pos[j], h if j % 2 == 0 else w, s) for j in range(4))
    m1 = _window(vh1, vw1, s, h, w)
    m2 = _window(vh2, vw2, s, h, w)
    delta = x_best - x
    norm_w1 = _l2_norm(jnp.where(m1, delta, 0.0), (1, 2))  # per channel
    norm_img = _l2_norm(delta, (1, 2, 3))
    norm_ws = _l2_norm(jnp.where(m1 | m2, delta, 0.0), (1, 2))
    # eta(s), optionally transposed, placed at window 1: a gather from the padded table at (row - vh, col - vw)
    pattern = jnp.asarray(table)[jnp.asarray(stage_of_size)[s]]
    pattern = jnp.where(u_flip < 0.5, pattern.T[None], pattern[None])  # [draws, s_max, s_max]
    rows = jnp.clip(jnp.arange(h)[None, :, None] - vh1[:, None, None], 0, pattern.shape[1] - 1)
    cols = jnp.clip(jnp.arange(w)[None, None, :] - vw1[:, None, None], 0, pattern.shape[2] - 1)
    placed = pattern[jnp.arange(draws)[:, None, None], rows, cols][..., None]  # [draws, h, w, 1]
    new = jnp.where(m1, placed * _signs(u_sign) + delta / (1e-12 + norm_w1), 0.0)
    budget = jnp.sqrt(jnp.maximum(eps ** 2 - norm_img ** 2, 0.0) / c + norm_ws ** 2)
    new = new / (1e-12 + _l2_norm(new, (1, 2))) * budget
    delta = jnp.where(m1, new, jnp.where(m2, 0.0, delta))
    return jnp.clip(x + eps * delta / (_l2_norm(delta, (1, 2, 3)) + 1e-12), 0.0, 1.0)


def _init_state(logits_fn, x, y, key, config: SquareConfig, trace: bool) -> dict:
    """The start of one restart: query counter, current points, their margin and loss, the trace buffer."""
    n = x.shape[0]
    k_init, k_loop = jax.random.split(key)
    if config.norm == "linf":
        x_best = _init_linf(k_init, x, config.eps)
    else:
        x_best = _init_l2(k_init, x, config.eps, 1 if config.shared_window else n)
    margin, loss = _margin_and_loss(logits_fn(x_best), y, config.loss)
    buf = jnp.zeros((config.n_queries + 1, n) if trace else (0, n), jnp.float32)
    if trace:
        buf = buf.at[0].set(loss)
    return {"i": jnp.asarray(0, jnp.int32), "key": k_loop, "x_best": x_best, "margin": margin, "loss": loss,
            "trace": buf}


def _query(logits_fn, x, y, attacked, state: dict, config: SquareConfig, trace: bool) -> dict:
    """Query ``state["i"]``: one candidate per point, accepted where it lowers the loss or misclassifies. Points
    not attacked, or already fooled, do not change (so extra queries after everyone is fooled are no-ops)."""
    n, h, w, c = x.shape
    sizes, table, stage_of_size = _schedule(config, h, w)
    i = state["i"]
    s = jnp.asarray(sizes)[jnp.minimum(i, len(sizes) - 1)]
    key = jax.random.fold_in(state["key"], i)
    if config.norm == "linf":
        x_new = _candidate_linf(key, x, state["x_best"], s, config)
    else:
        x_new = _candidate_l2(key, x, state["x_best"], s, table, stage_of_size, config)
    new_margin, new_loss = _margin_and_loss(logits_fn(x_new), y, config.loss)
    active = attacked & (state["margin"] > 0)
    improved = active & (new_loss < state["loss"])
    loss = jnp.where(improved, new_loss, state["loss"])
    accept = improved | (active & (new_margin <= 0))
    buf = state["trace"].at[i + 1].set(loss) if trace else state["trace"]
    return {"i": i + 1, "key": state["key"], "x_best": jnp.where(_bcast(accept, x), x_new, state["x_best"]),
            "margin": jnp.where(accept, new_margin, state["margin"]), "loss": loss, "trace": buf}


def _finish(logits_fn, x, y, robust, x_adv, state: dict, config: SquareConfig, trace: bool):
    """Merge one restart into the result; queries skipped by the early exit keep the final loss in the trace."""
    fooled = robust & (jnp.argmax(logits_fn(state["x_best"]), axis=1) != y)
    buf = state["trace"]
    if trace:
        buf = jnp.where(jnp.arange(config.n_queries + 1)[:, None] > state["i"], state["loss"][None], buf)
    return robust & ~fooled, jnp.where(_bcast(fooled, x), state["x_best"], x_adv), buf


def _prepare(logits_fn, x, y):
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y)
    if x.ndim != 4 or y.shape != (x.shape[0],):
        raise ValueError(f"square: need images x [N, H, W, C] and labels y [N], got shapes {x.shape} and {y.shape}")
    if not jnp.issubdtype(y.dtype, jnp.integer):
        raise ValueError(f"square: labels must be integers, got dtype {y.dtype}")
    out = jax.eval_shape(logits_fn, x)
    if len(out.shape) != 2 or out.shape[0] != x.shape[0] or out.shape[1] < 2:
        raise ValueError(f"square: logits_fn must return [N, K >= 2] logits, got shape {out.shape}")
    return x, y.astype(jnp.int32)


def _clean(logits_fn, x, y):
    return jnp.argmax(logits_fn(x), axis=1) == y


# ------------------------------------------------------------------------------------------ the attack
def _square_impl(logits_fn, x, y, key, config: SquareConfig, trace: bool):
    x, y = _prepare(logits_fn, x, y)
    robust = _clean(logits_fn, x, y)
    x_adv, traces = x, []
    for restart in range(config.n_restarts):
        attacked = robust
        state = _init_state(logits_fn, x, y, jax.random.fold_in(key, restart), config, trace)
        state = lax.while_loop(
            lambda st: (st["i"] < config.n_queries) & jnp.any(attacked & (st["margin"] > 0)),
            lambda st: _query(logits_fn, x, y, attacked, st, config, trace), state)
        robust, x_adv, buf = _finish(logits_fn, x, y, robust, x_adv, state, config, trace)
        traces.append(buf)
    x_adv = lax.stop_gradient(x_adv)
    return (x_adv, jnp.stack(traces)) if trace else x_adv


def _square(logits_fn, x, y, key, config: SquareConfig):
    return _square_impl(logits_fn, x, y, key, config, trace=False)


def _square_trace(logits_fn, x, y, key, config: SquareConfig):
    return _square_impl(logits_fn, x, y, key, config, trace=True)


square = jit_attack(_square)
square.__doc__ = """``square(logits_fn, x, y, key, config) -> x_adv`` (jitted; see :class:`SquareConfig`).

Images are NHWC in [0, 1]. Points that stay robust come back unchanged. ``square.raw`` is the un-jitted function.
The queries run in one ``lax.while_loop``. On XLA:CPU a host-driven loop over compiled chunks of queries measured
no faster: the body is a forward pass only (FAB, with a backward pass, gains ~3x from one)."""

square_trace = jit_attack(_square_trace)
square_trace.__doc__ = """``square_trace(logits_fn, x, y, key, config) -> (x_adv, losses)``.

:func:`square` plus the accepted loss of every point after each query, ``losses`` [n_restarts, n_queries + 1, N]
(row 0: the initialization). Same randomness as :func:`square`, so ``x_adv`` is identical. Each restart's trace only
covers the points it attacks; the others keep their initial value."""

__all__ = ["SquareConfig", "square", "square_trace", "p_schedule", "square_sizes", "eta_pattern"]
