"""Per-epoch monitoring: clean and robust loss/error of a model on fixed example sets (eval-mode BN), the trainer's
evaluators (:func:`make_evaluators`), and what the per-epoch evaluation costs relative to an epoch of training
(:func:`eval_cost`).

Evaluators, in the style of big_vision's: each has a name, a :class:`Schedule` (every N epochs and/or after the
last), ``run(state, epoch, progress) -> metrics`` and the prefix its metrics get in ``RUN/metrics.jsonl``. The
trainer's step loop runs the ones that are due at an epoch end and records their metrics; which model an evaluator
sees is a :data:`robust_flat.runs.WEIGHTS` name (the averaged weights' evaluators are the raw ones' with ``ema_``
in front of name and prefix).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from robust_flat import xla
from robust_flat.attacks.common import cross_entropy
from robust_flat.attacks.pgd import PGDConfig, pgd
from robust_flat.batching import padded_batches


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
    for b, batch in enumerate(padded_batches(x, y, batch_size, shrink=False)):
        out = _batch_stats(params, model_state, batch.x, batch.y, jax.random.fold_in(key, b), batch.mask,
                           logits_fn=logits_fn, attack=attack)
        out = jax.device_get(out)
        totals = out if totals is None else {k: totals[k] + out[k] for k in totals}
        if progress is not None:
            progress(batch.n_valid)
    return {k: float(v) / n for k, v in totals.items()}


# ------------------------------------------------------------------------------------------------ evaluators
@dataclasses.dataclass(frozen=True)
class Schedule:
    """When something runs at an epoch end: every ``every`` epochs (0: never on that account) and, with ``at_end``,
    after the last epoch."""

    every: int = 1
    at_end: bool = True

    def due(self, epoch: int, last: bool) -> bool:
        return (self.every > 0 and epoch % self.every == 0) or (last and self.at_end)


@dataclasses.dataclass(frozen=True)
class Evaluator:
    """``run(state, epoch, progress) -> metrics`` (``progress(n)`` after each batch of ``n`` images); the metrics
    named in ``keys`` (all if ``None``) are recorded as ``prefix + name``. ``images``: how many images one run
    attacks (for the progress bar); ``label``: what the progress bar says."""

    name: str
    prefix: str
    schedule: Schedule
    run: Callable[[Any, int, Optional[Callable[[int], None]]], dict]
    images: int = 0
    label: str = ""
    keys: Optional[tuple] = None

    def record(self, metrics: dict) -> dict:
        return {self.prefix + k: v for k, v in metrics.items() if self.keys is None or k in self.keys}


def eval_key(config, epoch: int):
    """The key of every evaluation at the end of ``epoch`` (the same for all evaluators: paired comparisons)."""
    return jax.random.fold_in(jax.random.PRNGKey(config.seed), 1_000_000 + epoch)


def _robustness(config, logits_fn, x, y, attack: PGDConfig, which: str) -> Callable:
    from robust_flat.runs import weights

    def run(state, epoch, progress=None):
        params, model_state = weights(state, which)
        return evaluate(logits_fn, params, model_state, x, y, eval_key(config, epoch), attack,
                        config.eval.batch_size, progress=progress)

    return run


def curves_evaluators(config, logits_fn, sets: dict, which: str = "params") -> list:
    """The per-epoch curves: clean and robust (PGD-``attack.steps``, one restart) loss and error on each non-empty
    set of ``sets`` (``{"train": (x, y), "test": (x, y)}``, float images), every epoch, as ``<set>_<metric>``."""
    from robust_flat.training.pgd_at import attack_config

    attack = attack_config(config, steps=config.attack.steps, restarts=1)
    return [Evaluator(name=name, prefix=f"{name}_", schedule=Schedule(1), images=len(x),
                      run=_robustness(config, logits_fn, x, y, attack, which),
                      label=f"eval {name} (PGD-{config.attack.steps})")
            for name, (x, y) in sets.items() if len(x)]


def early_stopping_evaluators(config, logits_fn, es_set, which: str = "params") -> list:
    """The paper's early stopping: robust error on the last 500 test images (``es_set``) with PGD-``eval.es_steps``
    and ``eval.es_restarts`` restarts, at every snapshot epoch and after the last, as ``es_robust_error`` (the
    trainer keeps the best epoch). None if ``eval.early_stopping`` is off or the set is empty."""
    from robust_flat.training.pgd_at import attack_config

    x, y = es_set
    if not (config.eval.early_stopping and len(x)):
        return []
    attack = attack_config(config, steps=config.eval.es_steps, restarts=config.eval.es_restarts)
    return [Evaluator(name="es", prefix="es_", schedule=Schedule(config.checkpoint.snapshot_every), images=len(x),
                      run=_robustness(config, logits_fn, x, y, attack, which), keys=("robust_error",),
                      label=f"early stopping (PGD-{config.eval.es_steps} x {config.eval.es_restarts})")]


# The evaluators a config gets, by name, in the order they run (big_vision-style registry): each factory takes
# (config, logits_fn, data, which) with data = {"curves": {"train": (x, y), "test": (x, y)}, "es": (x, y)}.
EVALUATORS: dict[str, Callable[..., list]] = {
    "curves": lambda config, logits_fn, data, which: curves_evaluators(config, logits_fn, data["curves"], which),
    "early_stopping": lambda config, logits_fn, data, which: early_stopping_evaluators(config, logits_fn,
                                                                                       data["es"], which),
}


def make_evaluators(config, logits_fn, data: dict) -> list:
    """Every evaluator of a run: those of :data:`EVALUATORS` on the trained weights, then, with weight averaging
    (``ema.enabled``), the same on the averaged weights (names and prefixes ``ema_...``: ``ema_test_robust_loss``,
    ``ema_es_robust_error``)."""
    out = []
    for which in ("params", "ema") if config.ema.enabled else ("params",):
        for factory in EVALUATORS.values():
            for ev in factory(config, logits_fn, data, which):
                if which == "ema":
                    ev = dataclasses.replace(ev, name="ema_" + ev.name, prefix="ema_" + ev.prefix,
                                             label="EMA " + ev.label)
                out.append(ev)
    return out


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
    AT: k + 2; clean training: 2; AT-AWP adds one pass per weight-attack step, SAM/ASAM one for the gradient at the
    perturbed weights; rotation self-supervision attacks and trains the image and its 4 rotations: 5 x (k + 2))."""
    if config.method == "clean":
        return 2.0
    k = float(config.attack.steps)
    if config.method == "pgd_at":
        k *= float(config.attack.get("fraction", 1.0))
    extra = float(config.awp.steps) if config.method == "awp" else 1.0 if config.method == "sam" else 0.0
    return (k + 2.0 + extra) * (5.0 if config.method == "ssl" else 1.0)


def eval_cost(config, n_train: Optional[int] = None, n_test: Optional[int] = None) -> dict:
    """What the trainer's per-epoch evaluation costs, in forward-backward passes, next to an epoch of training.

    * an epoch: ``steps_per_epoch x batch`` images x :func:`train_passes_per_image`;
    * the per-epoch curves: ``eval.n_examples`` training and as many test images (fewer if the data has fewer), each
      with PGD-``attack.steps`` (``attack.steps + 1`` passes: the attack plus the clean and adversarial forwards);
    * early stopping (if ``eval.early_stopping``): the last 500 test images with ``eval.es_restarts`` restarts of
      PGD-``eval.es_steps``, only at snapshot epochs, so it counts ``1 / checkpoint.snapshot_every`` per epoch;
    * weight averaging (if ``ema.enabled``): curves and early stopping once more for the averaged weights, and the
      recalibration of their batch-norm statistics (``ema.bn_batches`` forwards of ``train.batch_size`` images, a
      forward counted as half a pass) as ``ema_bn``.

    ``n_train``/``n_test``: the dataset's sizes (default: :func:`dataset_sizes`). Returns the costs per epoch and
    ``ratio`` = (curves + early stopping + ema_bn) / epoch.
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
    ema_bn = 0.0
    if config.ema.enabled:
        curves, es = 2 * curves, 2 * es
        ema_bn = 0.5 * bn_batches(config, n_train) * int(config.train.batch_size)
    return {"train": float(train), "curves": float(curves), "early_stopping": float(es), "ema_bn": float(ema_bn),
            "ratio": (curves + es + ema_bn) / train if train else float("inf")}


def bn_batches(config, n_train: int) -> int:
    """Batches of ``train.batch_size`` training images that re-estimate the averaged weights' batch-norm statistics:
    ``ema.bn_batches``, or with 0 one pass over the training data (the released code's one epoch)."""
    return int(config.ema.get("bn_batches", 0)) or n_train // int(config.train.batch_size)
