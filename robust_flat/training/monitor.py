"""Per-epoch monitoring: clean and robust loss/error of a model on fixed example sets (eval-mode BN)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from robust_flat import xla
from robust_flat.attacks.common import cross_entropy
from robust_flat.attacks.pgd import PGDConfig, pgd


@functools.partial(xla.jit, static_argnames=("logits_fn", "attack"))
def _batch_stats(params, model_state, x, y, key, mask, *, logits_fn, attack: PGDConfig):
    """Sums over the (masked) batch of clean/robust loss and error; robust error = clean OR adversarial error."""
    f = jax.tree_util.Partial(logits_fn, params, model_state)
    clean = f(x)
    x_adv = pgd.raw(f, x, y, key, attack)
    adv = f(x_adv)
    clean_wrong = jnp.argmax(clean, -1) != y
    adv_wrong = (jnp.argmax(adv, -1) != y) | clean_wrong
    m = mask.astype(jnp.float32)
    return {"loss": jnp.sum(cross_entropy(clean, y) * m), "error": jnp.sum(clean_wrong * m),
            "robust_loss": jnp.sum(cross_entropy(adv, y) * m), "robust_error": jnp.sum(adv_wrong * m)}


def evaluate(logits_fn, params, model_state, x: np.ndarray, y: np.ndarray, key, attack: PGDConfig,
             batch_size: int = 256) -> dict:
    """Mean clean/robust loss and error over ``(x, y)`` (float images in [0, 1]); the last batch is padded so every
    batch has one shape (one compilation)."""
    n = len(x)
    totals = None
    for b, start in enumerate(range(0, n, batch_size)):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        pad = batch_size - len(xb)
        mask = np.concatenate([np.ones(len(xb), bool), np.zeros(pad, bool)])
        if pad:
            xb = np.concatenate([xb, np.repeat(xb[:1], pad, 0)])
            yb = np.concatenate([yb, np.repeat(yb[:1], pad, 0)])
        out = _batch_stats(params, model_state, xb, yb, jax.random.fold_in(key, b), mask,
                           logits_fn=logits_fn, attack=attack)
        out = jax.device_get(out)
        totals = out if totals is None else {k: totals[k] + out[k] for k in totals}
    return {k: float(v) / n for k, v in totals.items()}
