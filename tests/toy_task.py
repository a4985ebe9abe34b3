"""A tiny learnable image task and a small CNN trained on it in a few seconds (shared by the FAB/Square tests).

Each class is a fixed random low-frequency colour pattern; an image is ``0.5 + 0.1 * pattern[y] + noise``, clipped to
[0, 1]. ``create_model("small_cnn", channels=(8, 16), hidden=32)`` learns it to ~100% clean accuracy, but it is not
robust, so attacks at a few /255 break a good share of points.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from robust_flat import xla
from robust_flat.models import bind, create_model, init_model, make_logits_fn

NUM_CLASSES = 10


def make_data(n: int, size: int = 16, seed: int = 0, pattern_seed: int = 1234):
    rng = np.random.default_rng(pattern_seed)
    coarse = rng.uniform(-1.0, 1.0, (NUM_CLASSES, 4, 4, 3)).astype(np.float32)
    patterns = np.repeat(np.repeat(coarse, size // 4, axis=1), size // 4, axis=2)
    rng = np.random.default_rng(seed)
    y = rng.integers(0, NUM_CLASSES, n).astype(np.int32)
    x = 0.5 + 0.1 * patterns[y] + 0.15 * rng.normal(size=(n, size, size, 3)).astype(np.float32)
    return np.clip(x, 0.0, 1.0).astype(np.float32), y


def _he_init(model, seed: int, size: int):
    """He-normal kernels, zero biases, from ONE flat random draw.

    ``init_model`` draws every kernel with its own 4-D shape, and XLA:CPU takes ~8 s to compile each such threefry
    draw on this machine (a flat draw of the same size: ~1 s). Tests only need some reasonable start.
    """
    shapes = jax.eval_shape(lambda k: init_model(model, k, (1, size, size, 3)), jax.random.PRNGKey(0))
    leaves, treedef = jax.tree_util.tree_flatten(shapes)
    total = sum(int(np.prod(leaf.shape)) for leaf in leaves)
    flat = np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (total,), jnp.float32))
    out, start = [], 0
    for leaf in leaves:
        count = int(np.prod(leaf.shape))
        if len(leaf.shape) > 1:
            fan_in = int(np.prod(leaf.shape[:-1]))
            out.append(jnp.asarray(flat[start:start + count].reshape(leaf.shape) * np.sqrt(2.0 / fan_in)))
        else:
            out.append(jnp.zeros(leaf.shape, leaf.dtype))
        start += count
    return jax.tree_util.tree_unflatten(treedef, out)


@functools.lru_cache(maxsize=None)
def trained_model(size: int = 16, steps: int = 60, seed: int = 0):
    """``(model, params, model_state)`` after ``steps`` Adam steps of batch 64 on fresh toy data."""
    model = create_model("small_cnn", channels=(8, 16), hidden=32)
    params, state = _he_init(model, seed, size)
    logits_fn = make_logits_fn(model)
    opt = optax.adam(3e-3)
    opt_state = opt.init(params)

    @xla.jit
    def step(params, opt_state, x, y):
        def loss(p):
            logits = logits_fn(p, state, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        g = jax.grad(loss)(params)
        updates, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    x, y = make_data(steps * 64, size, seed=seed + 100)
    for i in range(steps):
        params, opt_state = step(params, opt_state, x[i * 64:(i + 1) * 64], y[i * 64:(i + 1) * 64])
    return model, params, state


def toy_logits_fn(size: int = 16):
    model, params, state = trained_model(size)
    return bind(make_logits_fn(model), params, state)


def accuracy(logits_fn, x, y) -> float:
    return float(jnp.mean(jnp.argmax(logits_fn(jnp.asarray(x)), axis=1) == jnp.asarray(y)))


def load_toy_run(run_dir, snapshot, size: int = 16):
    """A stand-in for ``robust_flat.runs.load_run`` (the CLIs take it as ``load_run=``): the trained toy model
    as a loaded run at epoch 7, step 70."""
    import types

    model, params, state = trained_model(size)
    return types.SimpleNamespace(model=model, params=params, model_state=state, ema_params=None, config=None,
                                 epoch=7, step=70)


def load_toy_eval_set(config, subset, data_dir=None, size: int = 16):
    """A stand-in for ``robust_flat.data.load_eval_set``: 48 fresh toy images."""
    return make_data(48, size, seed=21)
