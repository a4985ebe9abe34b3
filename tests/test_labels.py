"""Label smoothing (train.label_smoothing) and label noise (data.label_noise): the paper's label variants.

Tiny model, 8x8 inputs, batch 8 (as tests/test_methods.py).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.configs import clean as clean_config
from experiments.configs import pgd_at as pgd_at_config
from robust_flat import xla
from robust_flat.attacks.common import cross_entropy
from robust_flat.models import create_model, make_apply_fn
from robust_flat.training import make_step, pgd_at
from robust_flat.training.config_check import check_config
from robust_flat.training.labels import label_noise_mask, noisy_labels
from robust_flat.training.state import create_train_state
from robust_flat.training.update import gradient_update, prepare_images, training_loss, training_targets
from tests.toy_task import _he_init, make_data

SIZE, B, C = 8, 8, 10


def test_smoothed_targets_are_one_minus_tau_one_hot_plus_tau_over_c_and_the_loss_is_their_cross_entropy():
    y = jnp.asarray([0, 3, 9, 3])
    logits = jax.random.normal(jax.random.PRNGKey(0), (4, C)) * 3
    for tau in (0.1, 0.2, 0.3):
        targets = np.asarray(training_targets(y, C, tau))
        expected = (1 - tau) * np.eye(C)[np.asarray(y)] + tau / C
        np.testing.assert_allclose(targets, expected, rtol=0, atol=1e-7)
        assert np.allclose(targets.sum(1), 1.0) and np.allclose(targets[np.arange(4), y], 1 - tau + tau / C)
        # the loss is the cross-entropy to that distribution: its gradient in the logits is softmax - targets
        grad = jax.grad(lambda z: jnp.sum(training_loss(z, y, tau)))(logits)
        np.testing.assert_allclose(np.asarray(grad), np.asarray(jax.nn.softmax(logits)) - expected, atol=1e-6)
    # tau = 0: the plain cross-entropy, bit for bit
    np.testing.assert_array_equal(np.asarray(training_loss(logits, y, 0.0)), np.asarray(cross_entropy(logits, y)))


def _setup():
    model = create_model("small_cnn", channels=(4, 8), hidden=16, norm="rebn")
    params, model_state = _he_init(model, 0, SIZE)
    model_state = jax.tree_util.tree_map_with_path(
        lambda path, v: jnp.ones_like(v) if path[-1].key == "var" else v, model_state)
    x, y = make_data(B, SIZE, seed=7)
    batch = {"image": jnp.asarray(np.round(x * 255).astype(np.uint8)), "label": jnp.asarray(y)}
    return make_apply_fn(model), params, model_state, batch


def _reference_step(state, batch, rng, *, apply_fn, tx, attack, tau):
    """PGD-AT written out from its parts: PGD on the TRUE labels, then the (smoothed) cross-entropy update."""
    k_aug, k_att, k_drop = jax.random.split(rng, 3)
    x = prepare_images(batch, k_aug, True)
    y = batch["label"]
    x_adv = pgd_at.adversarial_batch(state, x, y, k_att, apply_fn=apply_fn, attack=attack, fraction=1.0)

    def loss_fn(params):
        logits, new_model_state = apply_fn(params, state.model_state, x_adv, train=True, rng=k_drop)
        if tau:
            targets = (1 - tau) * jax.nn.one_hot(y, C) + tau / C
            loss = jnp.mean(-jnp.sum(targets * jax.nn.log_softmax(logits), -1))
        else:  # the step as it was before label smoothing existed
            loss = jnp.mean(cross_entropy(logits, y))
        return loss, (logits, new_model_state, {})

    return gradient_update(state, loss_fn, y, tx=tx)


def test_pgd_at_step_smooths_only_the_update_and_tau_zero_is_the_plain_step_bit_for_bit():
    apply_fn, params, model_state, batch = _setup()
    tx = optax.sgd(0.1, momentum=0.9)
    state = create_train_state(params, model_state, tx, jax.random.PRNGKey(0))
    rng = jax.random.PRNGKey(3)
    results = {}
    for tau in (0.0, 0.3):
        c = pgd_at_config.get_config("tiny")
        c.train.label_smoothing = tau
        attack = pgd_at.attack_config(c)
        step = xla.jit(make_step(c, apply_fn, tx))
        reference = xla.jit(functools.partial(_reference_step, apply_fn=apply_fn, tx=tx, attack=attack, tau=tau))
        (s1, m1), (s2, m2) = step(state, batch, rng), reference(state, batch, rng)
        leaves1, leaves2 = jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)
        if tau == 0:
            for a, b in zip(leaves1, leaves2):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            assert float(m1["batch_loss"]) == float(m2["batch_loss"])
        else:
            for a, b in zip(leaves1, leaves2):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(float(m1["batch_loss"]), float(m2["batch_loss"]), rtol=1e-5)
        results[tau] = leaves1
    assert any(not np.allclose(np.asarray(a), np.asarray(b)) for a, b in zip(results[0.0], results[0.3]))


def test_label_smoothing_is_checked_and_refused_where_it_does_not_apply():
    c = pgd_at_config.get_config("tiny")
    for bad in (-0.1, 1.0):
        c.train.label_smoothing = bad
        assert [p for p in check_config(c) if p.startswith("train.label_smoothing must be a number in [0, 1)")]
    c.train.label_smoothing = 0.2
    assert check_config(c) == []
    c2 = clean_config.get_config("tiny")
    c2.train.label_smoothing = 0.2
    assert check_config(c2) == []
    from experiments.configs import mart as mart_config
    c3 = mart_config.get_config("tiny")
    c3.train.label_smoothing = 0.2
    assert any("train.label_smoothing is implemented for" in p and "not for mart" in p for p in check_config(c3))


def test_label_noise_replaces_exactly_the_share_tau_and_is_a_function_of_the_seed():
    rng = np.random.default_rng(0)
    y = rng.integers(0, C, 2000).astype(np.int32)
    for tau in (0.1, 0.3, 0.5):
        mask = label_noise_mask(len(y), tau, seed=0)
        assert mask.sum() == round(tau * len(y))
        noisy = noisy_labels(y, tau, seed=0, num_classes=C)
        assert noisy.dtype == y.dtype and noisy.min() >= 0 and noisy.max() < C
        # only the chosen examples change; a redrawn label is uniform over all C classes, so it keeps the true one
        # with probability 1/C: the changed share of the chosen is 0.9, within 4 binomial standard deviations
        assert np.all(noisy[~mask] == y[~mask])
        n = mask.sum()
        kept = np.mean(noisy[mask] == y[mask])
        assert abs(kept - 1 / C) <= 4 * np.sqrt(0.1 * 0.9 / n), kept
        np.testing.assert_array_equal(noisy, noisy_labels(y, tau, seed=0, num_classes=C))  # a rerun
    a, b = noisy_labels(y, 0.3, seed=0, num_classes=C), noisy_labels(y, 0.3, seed=1, num_classes=C)
    assert np.mean(a != b) > 0.3  # a different seed: other examples, other labels
    np.testing.assert_array_equal(noisy_labels(y, 0.0, seed=0, num_classes=C), y)


def test_label_noise_is_applied_once_at_loading_and_the_same_for_a_resumed_run(tmp_path):
    from robust_flat.training.trainer import load_data

    c = pgd_at_config.get_config("tiny")
    c.data.label_noise = 0.3
    c.train.epochs = 1
    c.eval.n_examples, c.eval.early_stopping = 0, False
    logs = []
    _, y_noisy, _, y_test = load_data(c, logs.append)
    c0 = pgd_at_config.get_config("tiny")
    _, y_true, _, y_test0 = load_data(c0, lambda m: None)
    np.testing.assert_array_equal(y_noisy, noisy_labels(y_true, 0.3, c.seed, C))
    np.testing.assert_array_equal(y_test, y_test0)  # test labels are never noised
    assert any(f"{int((y_noisy != y_true).sum())} of {len(y_true)} training labels changed" in m for m in logs)
    # the same command again (a resumption) loads the same noisy labels; a new seed other ones
    np.testing.assert_array_equal(load_data(c, lambda m: None)[1], y_noisy)
    c.seed = 1
    assert np.any(load_data(c, lambda m: None)[1] != y_noisy)
    for bad in (-0.1, 1.0):
        c.data.label_noise = bad
        assert [p for p in check_config(c) if p.startswith("data.label_noise must be a share in [0, 1)")]
