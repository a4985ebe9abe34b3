"""The parameter update shared by every training method: optimizer step, weight projection, weight averaging."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax

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


def supervised_update(state: TrainState, x, y, rng, *, apply_fn, tx, ema_decay=None, clip_weights=None):
    """Train-mode forward/backward of the mean cross-entropy on ``(x, y)`` and one :func:`apply_gradients` step.
    Batch-norm statistics are updated by this forward only. Returns ``(state, metrics)``."""

    def loss_fn(params):
        logits, new_model_state = apply_fn(params, state.model_state, x, train=True, rng=rng)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        loss = -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))
        return loss, (logits, new_model_state)

    (loss, (logits, new_model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = apply_gradients(state, grads, new_model_state, tx, ema_decay, clip_weights)
    # "batch_*": the training batch as trained on (adversarial for PGD-AT, train-mode BN); the trainer's
    # per-epoch "train_*"/"test_*" metrics are separate evaluations on fixed subsets
    metrics = {"batch_loss": loss, "batch_error": jnp.mean(jnp.argmax(logits, -1) != y),
               "grad_norm": optax.tree.norm(grads)}
    return state, metrics


def prepare_images(batch, rng, augment: bool):
    """uint8 batch -> float32 in [0, 1], randomly cropped and flipped when ``augment``."""
    from robust_flat.data import augment as augment_fn

    x = batch["image"].astype(jnp.float32) / 255.0
    return augment_fn(rng, x) if augment else x
