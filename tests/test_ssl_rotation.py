"""Rotation self-supervision (robust_flat/training/ssl_rotation.py, the paper's AT-SSL): the head sees the 4
rotations of every image with their labels, lambda = 0 is the PGD-AT step, the head's parameters stay out of
everything that attacks, evaluates or perturbs the classifier, and one step trains backbone and head. Tiny model, 8x8
inputs, batch 8."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.configs import ssl as ssl_config
from robust_flat import hessian, xla
from robust_flat.attacks.pgd import PGDConfig
from robust_flat.models import create_model, make_apply_fn, make_logits_fn
from robust_flat.models.layers import AUX_HEAD_NAME
from robust_flat.runs import build
from robust_flat.training import make_step, pgd_at, ssl_rotation
from robust_flat.training.config_check import check_config
from robust_flat.training.state import create_train_state
from robust_flat.weights import Neighbourhood, perturb, sample, selected_paths
from tests.toy_task import _he_init, make_data

SIZE, B = 8, 8
ATTACK = PGDConfig(init="zero", steps=2)
TX = optax.sgd(1.0)


def _setup(seed=0):
    model = create_model("small_cnn", channels=(4, 8), hidden=16, norm="rebn", rotation_head=8)
    params, model_state = _he_init(model, seed, SIZE)
    model_state = jax.tree_util.tree_map_with_path(
        lambda path, v: jnp.ones_like(v) if path[-1].key == "var" else v, model_state)
    x, y = make_data(B, SIZE, seed=seed + 7)
    batch = {"image": jnp.asarray(np.round(x * 255).astype(np.uint8)), "label": jnp.asarray(y)}
    return model, make_apply_fn(model), params, model_state, batch


@functools.lru_cache(maxsize=None)
def _ssl_step(apply_fn, attack=ATTACK):
    """``(state, batch, rng, lam) -> (state, metrics)`` with SGD(lr=1); lambda is traced (one compile)."""
    return xla.jit(lambda s, b, k, lam: ssl_rotation.train_step(s, b, k, apply_fn=apply_fn, tx=TX, attack=attack,
                                                                lam=lam, augment=False))


def _max_diff(a, b):
    return max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_rotations_are_the_four_quarter_turns_of_every_image_with_their_labels():
    x = np.random.default_rng(0).normal(size=(3, 5, 5, 2)).astype(np.float32)
    x_rot, y_rot = ssl_rotation.rotations(jnp.asarray(x))
    assert x_rot.shape == (12, 5, 5, 2) and y_rot.tolist() == [0, 1, 2, 3] * 3
    for i in range(3):
        for k in range(4):
            np.testing.assert_array_equal(np.asarray(x_rot[4 * i + k]), np.rot90(x[i], k, axes=(0, 1)))
    # 90 degrees counter-clockwise: the top row becomes the left column, read bottom-up
    np.testing.assert_array_equal(np.asarray(x_rot[1])[::-1, 0], x[0][0, :])


def test_the_step_trains_the_head_on_all_four_rotations_with_their_labels():
    """With a zero-step attack the rotated examples are the clean rotations; the step's rotation loss and error are
    the head's train-mode cross-entropy and error on them against labels 0..3, and a wrong label order would not
    give them."""
    model, apply_fn, params, model_state, batch = _setup()
    state = create_train_state(params, model_state, TX, jax.random.PRNGKey(0))
    _, metrics = _ssl_step(apply_fn, PGDConfig(init="zero", steps=0))(state, batch, jax.random.PRNGKey(2), 1.0)
    x = batch["image"].astype(jnp.float32) / 255.0
    rotated = np.concatenate([np.rot90(np.asarray(x), k, axes=(1, 2)) for k in range(4)])  # rotation-major
    labels = np.repeat(np.arange(4), B)
    head = dataclasses.replace(apply_fn, output="rotation")
    logits = np.asarray(jax.jit(lambda p, s, x: head(p, s, x, train=True)[0])(params, model_state, rotated))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    np.testing.assert_allclose(float(metrics["batch_rotation_loss"]), float(ce.mean()), rtol=1e-5)
    assert float(metrics["batch_rotation_error"]) == float(np.mean(logits.argmax(-1) != labels))
    wrong = optax.softmax_cross_entropy_with_integer_labels(logits, np.roll(labels, B))  # 180 degrees off
    assert abs(float(wrong.mean()) - float(ce.mean())) > 1e-3
    np.testing.assert_allclose(float(metrics["batch_loss"]),
                               float(metrics["batch_classification_loss"] + metrics["batch_rotation_loss"]),
                               rtol=1e-6)


def test_lambda_zero_is_the_pgd_at_step_and_the_head_keeps_its_own_statistics():
    model, apply_fn, params, model_state, batch = _setup()
    state = create_train_state(params, model_state, TX, jax.random.PRNGKey(0))
    rng = jax.random.PRNGKey(3)
    at = xla.jit(lambda s, b, k: pgd_at.train_step(s, b, k, apply_fn=apply_fn, tx=TX, attack=ATTACK,
                                                   augment=False))
    at_state, _ = at(state, batch, rng)
    zero_state, metrics = _ssl_step(apply_fn)(state, batch, rng, 0.0)
    assert float(metrics["batch_rotation_loss"]) > 0
    for a, b in zip(jax.tree.leaves(zero_state.params), jax.tree.leaves(at_state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)  # XLA fusion order
    stats, at_stats = zero_state.model_state["batch_stats"], at_state.model_state["batch_stats"]
    backbone = [k for k in stats if k != AUX_HEAD_NAME]
    for k in backbone:  # the backbone's running statistics: the classification pass only, as PGD-AT
        for a, b in zip(jax.tree.leaves(stats[k]), jax.tree.leaves(at_stats[k])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    assert _max_diff(stats[AUX_HEAD_NAME], model_state["batch_stats"][AUX_HEAD_NAME]) > 1e-4  # the rotation pass's
    assert _max_diff(at_stats[AUX_HEAD_NAME], model_state["batch_stats"][AUX_HEAD_NAME]) == 0
    # lambda = 4 (the config's): one step trains backbone and head, and the backbone differently from PGD-AT
    trained, metrics = _ssl_step(apply_fn)(state, batch, rng, 4.0)
    assert int(trained.step) == 1 and all(np.isfinite(float(v)) for v in metrics.values())
    assert {"batch_loss", "batch_error", "batch_rotation_loss", "batch_rotation_error"} <= set(metrics)
    assert _max_diff({k: v for k, v in trained.params.items() if k != AUX_HEAD_NAME},
                     {k: v for k, v in at_state.params.items() if k != AUX_HEAD_NAME}) > 1e-4
    for part in (AUX_HEAD_NAME, "conv1"):
        assert _max_diff(trained.params[part], params[part]) > 1e-4, part
    for part in (AUX_HEAD_NAME, "norm1"):
        assert _max_diff(trained.model_state["batch_stats"][part], model_state["batch_stats"][part]) > 1e-4, part


def test_the_head_is_outside_the_classifier_flatness_hessian_and_the_run_state():
    model, apply_fn, params, model_state, batch = _setup()
    x = batch["image"].astype(jnp.float32) / 255.0
    head_paths = [p for p, _ in hessian.flatten_params(params).items() if p.startswith(AUX_HEAD_NAME + "/")]
    assert len(head_paths) == 6  # dense1, norm1, dense2 (kernel/bias, scale/bias)
    # the classifier's logits do not read the head: wild head weights change nothing, and a model without a head
    # gives the same logits from the same backbone
    wild = {**params, AUX_HEAD_NAME: jax.tree.map(lambda v: v + 100.0, params[AUX_HEAD_NAME])}
    logits_fn = make_logits_fn(model)
    logits = np.asarray(logits_fn(params, model_state, x))
    np.testing.assert_array_equal(np.asarray(logits_fn(wild, model_state, x)), logits)
    plain = create_model("small_cnn", channels=(4, 8), hidden=16, norm="rebn")
    backbone = {k: v for k, v in params.items() if k != AUX_HEAD_NAME}
    bn = {"batch_stats": {k: v for k, v in model_state["batch_stats"].items() if k != AUX_HEAD_NAME}}
    np.testing.assert_array_equal(np.asarray(make_logits_fn(plain)(backbone, bn, x)), logits)
    # output="features": what the classifier layer (and the head) reads
    features = np.asarray(model.apply({"params": params, **model_state}, x, output="features"))
    assert features.shape == (B, 16)
    np.testing.assert_allclose(features @ np.asarray(params["logits"]["kernel"]) + np.asarray(params["logits"]["bias"]),
                               logits, rtol=1e-5, atol=1e-5)
    # flatness and landscapes (the weight neighbourhood's default layers) and the Hessian never see it
    assert not any(p.startswith(AUX_HEAD_NAME) for p in selected_paths(params))
    nb = Neighbourhood(xi=0.5)
    moved = perturb(params, sample(jax.random.PRNGKey(0), params, nb), nb)
    assert _max_diff(moved[AUX_HEAD_NAME], params[AUX_HEAD_NAME]) == 0 and _max_diff(moved, params) > 0
    for select in (None, "layers"):
        selected, rest = hessian.split_params(params, select)
        assert not any(p.startswith(AUX_HEAD_NAME) for p in selected) and set(head_paths) <= set(rest)
    # a run of the ssl config: the train state (what checkpoints hold and load_run restores) carries the head
    config = ssl_config.get_config("tiny")
    shapes = jax.eval_shape(lambda: build(config, (SIZE, SIZE, 3), 1)[2])
    assert AUX_HEAD_NAME in shapes.params and AUX_HEAD_NAME in shapes.model_state["batch_stats"]
    assert shapes.params[AUX_HEAD_NAME]["dense1"]["kernel"].shape == (128, 256)  # small CNN features -> 256


def test_config_validation_and_the_registry_step():
    config = ssl_config.get_config("tiny")
    assert check_config(config) == [] and config.method == "ssl" and config.ssl.lam == 4.0
    assert config.model.rotation_head == 256
    bad = ssl_config.get_config("tiny")
    bad.ssl.lam, bad.model.rotation_head = -1.0, 0
    assert check_config(bad) == ["ssl.lam must be a number >= 0 (paper: 0.5 to 8), got -1.0",
                                 "model.rotation_head must be an integer >= 1 (the rotation head's hidden width, "
                                 "e.g. 256), got 0"]
    config.attack.steps = 1
    step = make_step(config, _setup()[1], optax.sgd(0.01))  # the step the tests above run, with the config's options
    assert step.func is ssl_rotation.train_step and step.keywords["attack"].steps == 1
    assert step.keywords["lam"] == 4.0 and step.keywords["fraction"] == 1.0
