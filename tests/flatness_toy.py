"""Tiny models and a learnable synthetic task for the weight-perturbation and flatness tests (fast on CPU).

Each class is a fixed random coarse colour pattern; ``x = 0.5 + 0.15 * pattern[y] + noise`` clipped to [0, 1],
8x8x3 images. ``small_cnn(channels=(4, 8), hidden=16)`` learns it in a few dozen Adam steps.
"""
from __future__ import annotations

import functools

import jax
import numpy as np
import optax

from robust_flat import xla
from robust_flat.models import create_model, init_model, make_apply_fn

SIZE = 8


def make_data(n: int, seed: int = 0):
    rng = np.random.default_rng(1234)
    coarse = rng.uniform(-1.0, 1.0, (10, 2, 2, 3)).astype(np.float32)
    patterns = np.repeat(np.repeat(coarse, SIZE // 2, axis=1), SIZE // 2, axis=2)
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n).astype(np.int32)
    x = 0.5 + 0.15 * patterns[y] + 0.1 * rng.normal(size=(n, SIZE, SIZE, 3))
    return np.clip(x, 0.0, 1.0).astype(np.float32), y


def tiny_model(norm: str = "none"):
    return create_model("small_cnn", channels=(4, 8), hidden=16, norm=norm)


def random_params(model, seed: int = 0):
    """``(params, model_state)`` filled with NumPy random numbers (shapes from ``jax.eval_shape``): much cheaper to
    build than ``init_model``, whose per-layer random initializers take tens of seconds to compile on a busy CPU.
    Kernels ~ N(0, 2/fan_in), biases and BN affine parameters ~ N(0, 0.1^2), BN running means ~ N(0, 0.1^2),
    variances ~ U[0.5, 1.5]."""
    params, state = jax.eval_shape(lambda k: init_model(model, k, (1, SIZE, SIZE, 3)), jax.random.PRNGKey(0))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = str(path[-1].key)
        if name == "kernel":
            return rng.normal(0.0, np.sqrt(2.0 / np.prod(leaf.shape[:-1])), leaf.shape).astype(np.float32)
        if name == "var":
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        return rng.normal(0.0, 0.1, leaf.shape).astype(np.float32)

    to_jax = lambda tree: jax.tree.map(jax.numpy.asarray, jax.tree_util.tree_map_with_path(fill, tree))  # noqa
    return to_jax(params), to_jax(state)


@functools.lru_cache(maxsize=None)
def trained(norm: str = "none", steps: int = 40, seed: int = 0):
    """``(model, params, model_state)`` after ``steps`` Adam steps (train-mode BN, running stats updated)."""
    model = tiny_model(norm)
    params, state = random_params(model, seed)
    apply_fn = make_apply_fn(model)
    opt = optax.adam(1e-2)
    opt_state = opt.init(params)

    @xla.jit
    def step(params, state, opt_state, x, y):
        def loss(p):
            logits, new_state = apply_fn(p, state, x, train=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new_state

        (_, state), g = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, updates), state, opt_state

    x, y = make_data(steps * 32, seed=seed + 100)
    for i in range(steps):
        params, state, opt_state = step(params, state, opt_state, x[i * 32:(i + 1) * 32], y[i * 32:(i + 1) * 32])
    return model, params, state
