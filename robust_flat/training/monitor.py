"""Per-epoch monitoring: clean and robust loss/error of a model on fixed example sets (eval-mode BN), and what the
per-epoch evaluation costs relative to an epoch of training (:func:`eval_cost`)."""
from __future__ import annotations

import functools
from typing import Callable, Optional

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
             batch_size: int = 256, progress: Optional[Callable[[int], None]] = None) -> dict:
    """Mean clean/robust loss and error over ``(x, y)`` (float images in [0, 1]); the last batch is padded so every
    batch has one shape (one compilation). ``progress(n)`` is called after each batch with its number of examples."""
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
        if progress is not None:
            progress(len(xb) - pad)
    return {k: float(v) / n for k, v in totals.items()}


# ------------------------------------------------------------------------------------------------ cost model
# Training images of the datasets whose size a config does not state (test images second).
DATASET_SIZES = {"cifar10": (50000, 10000), "cifar100": (50000, 10000), "svhn": (73257, 26032)}
ES_EXAMPLES = 500  # the paper's early stopping: the last 500 test images (robust_flat.data.SUBSETS["test_last500"])


def dataset_sizes(config) -> tuple:
    """``(training images, test images)`` a config trains and evaluates on (``data.train_examples`` applied)."""
    d = config.data
    if d.dataset == "synthetic":
        n_train, n_test = int(d.synthetic_train), int(d.synthetic_test)
    elif d.dataset in DATASET_SIZES:
        n_train, n_test = DATASET_SIZES[d.dataset]
    else:
        raise ValueError(f"unknown dataset {d.dataset!r}: pass n_train and n_test")
    if d.get("train_examples"):
        n_train = min(n_train, int(d.train_examples))
    return n_train, n_test


def train_passes_per_image(config) -> float:
    """Forward-backward passes per training image of one step: the attack's steps plus about 2 for the update (PGD-k
    AT: k + 2; clean training: 2; AT-AWP adds one pass per weight-attack step)."""
    if config.method == "clean":
        return 2.0
    k = float(config.attack.steps)
    if config.method == "pgd_at":
        k *= float(config.attack.get("fraction", 1.0))
    extra = float(config.awp.steps) if config.method == "awp" else 0.0
    return k + 2.0 + extra


def eval_cost(config, n_train: Optional[int] = None, n_test: Optional[int] = None) -> dict:
    """What the trainer's per-epoch evaluation costs, in forward-backward passes, next to an epoch of training.

    * an epoch: ``steps_per_epoch x batch`` images x :func:`train_passes_per_image`;
    * the per-epoch curves: ``eval.n_examples`` training and as many test images (fewer if the data has fewer), each
      with PGD-``attack.steps`` (``attack.steps + 1`` passes: the attack plus the clean and adversarial forwards);
    * early stopping (if ``eval.early_stopping``): the last 500 test images with ``eval.es_restarts`` restarts of
      PGD-``eval.es_steps``, only at snapshot epochs, so it counts ``1 / checkpoint.snapshot_every`` per epoch.

    ``n_train``/``n_test``: the dataset's sizes (default: :func:`dataset_sizes`). Returns the three costs per epoch
    and ``ratio`` = (curves + early stopping) / epoch.
    """
    if n_train is None or n_test is None:
        sizes = dataset_sizes(config)
        n_train = sizes[0] if n_train is None else n_train
        n_test = sizes[1] if n_test is None else n_test
    bs = int(config.train.batch_size) * int(config.train.get("batches_per_step", 1))
    train = (n_train // bs) * bs * train_passes_per_image(config)
    n = int(config.eval.n_examples)
    curves = (min(n, n_train) + min(n, n_test)) * (int(config.attack.steps) + 1)
    es = 0.0
    if config.eval.early_stopping:
        es = (min(ES_EXAMPLES, n_test) * int(config.eval.es_restarts) * (int(config.eval.es_steps) + 1)
              / max(int(config.checkpoint.snapshot_every), 1))
    return {"train": float(train), "curves": float(curves), "early_stopping": float(es),
            "ratio": (curves + es) / train if train else float("inf")}
