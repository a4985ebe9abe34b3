"""The parameter update shared by every training method: optimizer step, weight projection, weight averaging."""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from robust_flat.attacks.common import cross_entropy
from robust_flat.training.state import TrainState


def apply_gradients(state: TrainState, grads, model_state, tx: optax.GradientTransformation,
                    ema_decay: Optional[float] = None, clip_weights: Optional[float] = None) -> TrainState:
    """One optimizer step. ``clip_weights`` projects every parameter onto [-w, w] after the step (the paper's
    weight clipping). With ``ema_decay`` the averaged weights follow w_avg <- tau w_avg + (1 - tau) w."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if clip_weights:
        params = jax.tree.map(lambda p: jnp.clip(p, -clip_weights, clip_weights), params)
    ema = state.ema_params
    if ema is not None and ema_decay is not None:
        ema = jax.tree.map(lambda a, p: ema_decay * a + (1.0 - ema_decay) * p, ema, params)
    return state.replace(step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state,
                         ema_params=ema)


def gradient_update(state: TrainState, loss_fn, y, *, tx, ema_decay=None, clip_weights=None, clip_grads=None):
    """Differentiate ``loss_fn(params) -> (loss, (logits, new_model_state, extra_metrics))`` at ``state.params`` and
    take one :func:`apply_gradients` step; every method's update goes through here. ``logits`` are those of the
    examples trained on (``batch_error`` is measured on them against ``y``). ``clip_grads`` clips every gradient
    element to [-c, c] before the optimizer (AT-AWP's 0.05). Returns ``(state, metrics)``."""
    (loss, (logits, new_model_state, extra)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    if clip_grads:
        grads = jax.tree.map(lambda g: jnp.clip(g, -clip_grads, clip_grads), grads)
    state = apply_gradients(state, grads, new_model_state, tx, ema_decay, clip_weights)
    # "batch_*": the training batch as trained on (adversarial for PGD-AT, train-mode BN); the trainer's
    # per-epoch "train_*"/"test_*" metrics are separate evaluations on fixed subsets
    metrics = {"batch_loss": loss, "batch_error": jnp.mean(jnp.argmax(logits, -1) != y), "grad_norm": grad_norm,
               **extra}
    return state, metrics


def training_targets(y, num_classes: int, label_smoothing: float):
    """The target distributions of label smoothing: ``(1 - tau) one_hot(y) + tau / C`` (``optax.smooth_labels``;
    the released code's target, the paper writes ``tau / (C - 1)`` off the true class:
    docs/paper-vs-code.md#label-smoothing)."""
    return optax.smooth_labels(jax.nn.one_hot(y, num_classes, dtype=jnp.float32), label_smoothing)


def training_loss(logits, y, label_smoothing: float = 0.0):
    """Per-example training loss: cross-entropy with the integer labels ``y``, or with
    :func:`training_targets` when ``label_smoothing`` (tau; default 0: off; paper: 0.1, 0.2, 0.3) is set. tau = 0
    is exactly the plain cross-entropy (the same code path)."""
    if not label_smoothing:
        return cross_entropy(logits, y)
    logits = logits.astype(jnp.float32)
    return optax.softmax_cross_entropy(logits, training_targets(y, logits.shape[-1], label_smoothing))


def supervised_update(state: TrainState, x, y, rng, *, apply_fn, tx, ema_decay=None, clip_weights=None,
                      label_smoothing: float = 0.0):
    """Train-mode forward/backward of the mean :func:`training_loss` on ``(x, y)`` (cross-entropy, label-smoothed
    when ``label_smoothing`` > 0) and one :func:`apply_gradients` step. Batch-norm statistics are updated by this
    forward only. Returns ``(state, metrics)``."""

    def loss_fn(params):
        logits, new_model_state = apply_fn(params, state.model_state, x, train=True, rng=rng)
        return jnp.mean(training_loss(logits, y, label_smoothing)), (logits, new_model_state, {})

    return gradient_update(state, loss_fn, y, tx=tx, ema_decay=ema_decay, clip_weights=clip_weights)


class Augmentation(NamedTuple):
    """The input pipeline of a training step, applied by :func:`prepare_images` in this order (a static, hashable
    step option): ``crop_flip`` random crop after zero padding by 4 and horizontal flip (``data.augment``, default
    True); ``autoaugment`` the CIFAR-10 AutoAugment policy (``data.autoaugment``, default False; the paper's
    AutoAugment model: True); ``cutout`` the side of one Cutout square (``data.cutout``, default 0: none; that
    model: 16)."""
    crop_flip: bool = True
    autoaugment: bool = False
    cutout: int = 0


def augmentation(config) -> Augmentation:
    """The config's :class:`Augmentation` (a config written before AutoAugment existed has neither field: off)."""
    d = config.data
    return Augmentation(bool(d.augment), bool(d.get("autoaugment", False)), int(d.get("cutout", 0)))


def step_options(config) -> dict:
    """The static options every method's step takes from the config: augmentation (:func:`augmentation`), weight
    averaging (EMA) and weight clipping."""
    return dict(augment=augmentation(config), ema_decay=config.ema.decay if config.ema.enabled else None,
                clip_weights=config.train.clip_weights or None)


def forward_clean_then_adversarial(params, model_state, x, x_adv, rng, *, apply_fn):
    """Train-mode forwards on the clean and then the adversarial batch (batch-norm statistics updated by both, in
    that order; TRADES and MART). Returns ``(clean_logits, adv_logits, new_model_state)``."""
    k_clean, k_adv = jax.random.split(rng)
    clean_logits, model_state = apply_fn(params, model_state, x, train=True, rng=k_clean)
    adv_logits, model_state = apply_fn(params, model_state, x_adv, train=True, rng=k_adv)
    return clean_logits, adv_logits, model_state


# fold_in(rng, _PER_EXAMPLE_STREAM): the key of AutoAugment and Cutout (crop/flip keep drawing from rng itself, so a
# run without them augments exactly as before they existed)
_PER_EXAMPLE_STREAM = 0x41417567


def prepare_images(batch, rng, augment):
    """uint8 batch -> float32 in [0, 1], augmented by ``augment``: an :class:`Augmentation`, or a bool (True: crop
    and flip only). Crop/flip draw from ``rng``; AutoAugment and Cutout give the example at batch position ``i`` the
    key ``fold_in(k, i)`` (:mod:`robust_flat.autoaugment`, ``k`` derived from ``rng``), so what an example gets is
    a function of (the step's key, its position) alone. Values stay on uint8 levels in [0, 1]."""
    from robust_flat.data import augment as augment_fn

    spec = augment if isinstance(augment, Augmentation) else Augmentation(crop_flip=bool(augment))
    x = batch["image"].astype(jnp.float32) / 255.0
    if spec.crop_flip:
        x = augment_fn(rng, x)
    if spec.autoaugment or spec.cutout:
        from robust_flat.autoaugment import autoaugment, cutout

        k_policy, k_cutout = jax.random.split(jax.random.fold_in(rng, _PER_EXAMPLE_STREAM))
        if spec.autoaugment:
            x = autoaugment(k_policy, x)
        if spec.cutout:
            x = cutout(k_cutout, x, spec.cutout)
    return x
