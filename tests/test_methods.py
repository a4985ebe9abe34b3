"""The training methods the paper compares beyond PGD-AT: TRADES, MART, AT-AWP (robust_flat/training/).

Each is checked against an independent computation of what it must do (a numpy transcription of the MART authors'
loss, AWP's weight step and update computed by hand), not only for running. Tiny model, 8x8 inputs, batch 8.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.configs import awp as awp_config
from experiments.configs import entropy_sgd as esgd_config
from experiments.configs import mart as mart_config
from experiments.configs import trades as trades_config
from robust_flat import xla
from robust_flat.attacks.common import kl_from_clean
from robust_flat.attacks.pgd import PGDConfig
from robust_flat.models import create_model, make_apply_fn
from robust_flat.training import awp, entropy_sgd, make_step, mart, pgd_at, trades
from robust_flat.training.state import create_train_state
from tests.toy_task import _he_init, make_data

SIZE, B = 8, 8


def _setup(norm="none", seed=0):
    model = create_model("small_cnn", channels=(4, 8), hidden=16, norm=norm)
    params, model_state = _he_init(model, seed, SIZE)
    # _he_init zeroes every 1-D leaf; batch-norm running variances start at 1 as in a real init
    model_state = jax.tree_util.tree_map_with_path(
        lambda path, v: jnp.ones_like(v) if path[-1].key == "var" else v, model_state)
    x, y = make_data(B, SIZE, seed=seed + 7)
    batch = {"image": jnp.asarray(np.round(x * 255).astype(np.uint8)), "label": jnp.asarray(y)}
    return make_apply_fn(model), params, model_state, batch


def _np_mart(clean_logits, adv_logits, y, beta):
    """The MART authors' loss (github.com/YisenWang/MART, train_wideresnet.py::mart_loss) transcribed to numpy."""
    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    n = len(y)
    adv_probs = softmax(adv_logits.astype(np.float64))
    tmp1 = np.argsort(adv_probs, axis=1)[:, -2:]
    new_y = np.where(tmp1[:, -1] == y, tmp1[:, -2], tmp1[:, -1])
    ce = -np.log(adv_probs[np.arange(n), y])
    loss_adv = np.mean(ce) + np.mean(-np.log(1.0001 - adv_probs[np.arange(n), new_y] + 1e-12))
    nat_probs = softmax(clean_logits.astype(np.float64))
    true_probs = nat_probs[np.arange(n), y]
    kl = np.sum(nat_probs * (np.log(nat_probs) - np.log(adv_probs + 1e-12)), axis=1)
    loss_robust = np.sum(kl * (1.0000001 - true_probs)) / n
    return loss_adv + beta * loss_robust


def test_mart_objective_matches_the_authors_loss():
    rng = np.random.default_rng(0)
    clean = rng.normal(size=(64, 10)).astype(np.float32) * 3
    adv = rng.normal(size=(64, 10)).astype(np.float32) * 3
    y = rng.integers(0, 10, 64)
    adv[:16, :] -= 20.0
    adv[np.arange(16), y[:16]] += 40.0  # the true class on top: the boosted term takes the runner-up
    for beta in (0.0, 6.0):
        loss, _, _ = mart.mart_objective(jnp.asarray(clean), jnp.asarray(adv), jnp.asarray(y), beta)
        np.testing.assert_allclose(float(loss), _np_mart(clean, adv, y, beta), rtol=2e-5)


def test_trades_attack_raises_the_kl_within_the_ball_and_loss_reduces_to_ce():
    apply_fn, params, model_state, batch = _setup(norm="rebn")
    state = create_train_state(params, model_state, optax.sgd(0.1), jax.random.PRNGKey(0))
    x = batch["image"].astype(jnp.float32) / 255.0
    attack = PGDConfig(eps=8 / 255, step_size=2 / 255, steps=5, best_iterate="batch")
    x_adv = jax.jit(lambda s, x, k: trades.trades_attack(s, x, k, apply_fn=apply_fn, attack=attack))(
        state, x, jax.random.PRNGKey(1))
    assert float(jnp.max(jnp.abs(x_adv - x))) <= 8 / 255 + 1e-6
    assert 0.0 <= float(jnp.min(x_adv)) and float(jnp.max(x_adv)) <= 1.0

    @jax.jit
    def kl_sum(inputs):
        clean = apply_fn(params, model_state, x, train=False)[0]
        return jnp.sum(kl_from_clean(apply_fn(params, model_state, inputs, train=False)[0], clean))

    def kl_at(inputs):
        return float(kl_sum(inputs))

    noise = x + 8 / 255 * jnp.sign(jax.random.normal(jax.random.PRNGKey(2), x.shape))
    assert kl_at(x_adv) > 3 * kl_at(jnp.clip(noise, 0, 1)) > 0  # ascent beats a random corner of the ball

    rng = jax.random.PRNGKey(3)
    loss_fn = jax.jit(lambda xa, beta: trades.trades_loss(params, model_state, x, xa, batch["label"], rng,
                                                          apply_fn=apply_fn, beta=beta))
    same, (_, _, m) = loss_fn(x, 6.0)  # x' = x: both train-mode forwards agree, the KL term vanishes
    assert abs(float(m["batch_kl"])) < 1e-6
    np.testing.assert_allclose(float(same), float(m["batch_clean_loss"]), rtol=1e-6)
    adv0, (_, _, m0) = loss_fn(x_adv, 0.0)
    adv6, (adv_logits, _, m6) = loss_fn(x_adv, 6.0)
    # the KL goes from the clean to the adversarial prediction (train-mode BN: batch statistics, both forwards)
    clean_logits = np.asarray(jax.jit(lambda: apply_fn(params, model_state, x, train=True)[0])(), np.float64)
    log_pc = clean_logits - np.log(np.exp(clean_logits).sum(1, keepdims=True))
    log_pa = np.asarray(adv_logits, np.float64)
    log_pa = log_pa - np.log(np.exp(log_pa).sum(1, keepdims=True))
    np.testing.assert_allclose(float(m6["batch_kl"]), np.mean(np.sum(np.exp(log_pc) * (log_pc - log_pa), 1)),
                               rtol=1e-4)
    assert float(m6["batch_kl"]) > 0
    np.testing.assert_allclose(float(adv6) - float(adv0), 6.0 * float(m6["batch_kl"]), rtol=1e-5)


@pytest.mark.parametrize("loss", [trades.trades_loss, mart.mart_loss], ids=["trades", "mart"])
def test_two_forward_losses_update_batch_norm_clean_then_adversarial(loss):
    apply_fn, params, model_state, batch = _setup(norm="rebn")
    x = batch["image"].astype(jnp.float32) / 255.0
    x_adv = jnp.clip(x + 8 / 255 * jnp.sign(jax.random.normal(jax.random.PRNGKey(2), x.shape)), 0, 1)

    @jax.jit
    def run():
        _, (_, new_state, _) = loss(params, model_state, x, x_adv, batch["label"], jax.random.PRNGKey(0),
                                    apply_fn=apply_fn, beta=6.0)
        after_clean = apply_fn(params, model_state, x, train=True)[1]
        return new_state, apply_fn(params, after_clean, x_adv, train=True)[1]

    got, want = run()
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def _awp_step(apply_fn, xi, grad_clip, steps=1):
    weights = awp.weight_perturbation_config(xi, steps) if xi else None
    return xla.jit(lambda s, b, k: awp.train_step(s, b, k, apply_fn=apply_fn, tx=optax.sgd(1.0),
                                                  attack=PGDConfig(init="zero", steps=2), weights=weights,
                                                  grad_clip=grad_clip, augment=False))


def test_awp_update_is_the_clipped_gradient_at_the_normalized_weight_ascent_step():
    """By hand: x' (PGD, deterministic start), g = grad of the batch loss at (w, x'), nu_l = xi ||w_l|| g_l/||g_l||
    on kernels only, update = -clip(grad of the loss at (w + nu, x'), 0.05) with SGD(lr=1)."""
    apply_fn, params, model_state, batch = _setup(norm="none")
    params = jax.tree_util.tree_map_with_path(  # non-zero biases: a perturbation of them would show
        lambda path, v: jnp.asarray(0.1 * np.cos(np.arange(v.size, dtype=np.float32))) if path[-1].key == "bias"
        else v, params)
    xi, clip = 0.05, 0.05
    state = create_train_state(params, model_state, optax.sgd(1.0), jax.random.PRNGKey(0))
    new_state, metrics = _awp_step(apply_fn, xi, clip)(state, batch, jax.random.PRNGKey(5))

    x = batch["image"].astype(jnp.float32) / 255.0
    y = batch["label"]
    x_adv = jax.jit(lambda s, x: pgd_at.adversarial_batch(s, x, y, jax.random.PRNGKey(9), apply_fn=apply_fn,
                                                          attack=PGDConfig(init="zero", steps=2), fraction=1.0))(
        state, x)

    @jax.jit
    @jax.grad
    def grad_at(p):
        logits = apply_fn(p, model_state, x_adv, train=False)[0]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    # the by-hand part in NumPy (eager jnp ops here compiled one program per op and leaf shape)
    g = jax.tree.map(np.asarray, grad_at(params))
    w = jax.tree.map(np.asarray, params)
    nu = {}
    for layer, leaves in g.items():  # conv1..4, fc1, logits: {kernel, bias}
        nu[layer] = {"kernel": xi * np.linalg.norm(w[layer]["kernel"]) * leaves["kernel"]
                     / np.linalg.norm(leaves["kernel"]), "bias": np.zeros_like(leaves["bias"])}
    g_at = jax.tree.map(np.asarray, grad_at(jax.tree.map(np.add, w, nu)))
    assert any(np.abs(gg).max() > clip for gg in jax.tree.leaves(g_at))  # the clipping is active
    expected = jax.tree.map(lambda p, gg: p - np.clip(gg, -clip, clip), w, g_at)
    for path, got in jax.tree_util.tree_flatten_with_path(new_state.params)[0]:
        want = dict(jax.tree_util.tree_flatten_with_path(expected)[0])[path]
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=2e-6, err_msg=str(path))
    assert float(metrics["batch_perturbed"]) == 1.0
    assert float(metrics["batch_loss"]) > float(metrics["batch_loss_at_w"])  # the weight step ascends

    # xi = 0 without clipping is exactly PGD-AT (same attack, same update)
    zero_state, _ = _awp_step(apply_fn, 0.0, 0.0)(state, batch, jax.random.PRNGKey(5))
    at = xla.jit(lambda s, b, k: pgd_at.train_step(s, b, k, apply_fn=apply_fn, tx=optax.sgd(1.0),
                                                   attack=PGDConfig(init="zero", steps=2), augment=False))
    at_state, _ = at(state, batch, jax.random.PRNGKey(5))
    for a, b in zip(jax.tree.leaves(zero_state.params), jax.tree.leaves(at_state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("module", [trades_config, mart_config, awp_config], ids=["trades", "mart", "awp"])
def test_method_configs_train_one_step(module):
    config = module.get_config("tiny")
    config.attack.steps = 1
    apply_fn, params, model_state, batch = _setup(norm="rebn")
    tx = optax.sgd(0.01)
    state = create_train_state(params, model_state, tx, jax.random.PRNGKey(0))
    step = xla.jit(make_step(config, apply_fn, tx))
    new_state, metrics = step(state, batch, jax.random.PRNGKey(1))
    assert int(new_state.step) == 1
    assert all(np.isfinite(float(v)) for v in metrics.values()) and {"batch_loss", "batch_error"} <= set(metrics)
    moved = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(new_state.params),
                                                           jax.tree.leaves(state.params))]
    assert max(moved) > 0
    # batch-norm running statistics were updated by the train-mode forwards
    assert any(float(jnp.max(jnp.abs(a - b))) > 0 for a, b in zip(jax.tree.leaves(new_state.model_state),
                                                                   jax.tree.leaves(state.model_state)))


def test_entropy_sgd_step_is_the_langevin_loop_of_the_original_optimizer():
    """L = 2, no noise, SGD(lr) with weight decay: the outer update computed as the original EntropySGD.step does
    (ucla-vision/entropy-sgd, the released code's port), mini-batch by mini-batch."""
    apply_fn, params, model_state, _ = _setup(norm="none")
    x, y = make_data(3 * 4, SIZE, seed=11)
    batch = {"image": jnp.asarray(np.round(x * 255).astype(np.uint8)), "label": jnp.asarray(y)}
    x = np.asarray(batch["image"], np.float32) / 255.0  # what the step sees
    lr, wd, llr, beta1, gamma0, gamma1, t = 0.05, 0.05, 0.1, 0.75, 0.3, 0.5, 3  # large wd, gamma: visible
    tx = optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr))
    state = create_train_state(params, model_state, tx, jax.random.PRNGKey(0)).replace(step=jnp.asarray(t))
    attack = PGDConfig(init="zero", steps=1)
    step = xla.jit(lambda s, b, k: entropy_sgd.train_step(
        s, b, k, apply_fn=apply_fn, tx=tx, attack=attack, L=2, gamma0=gamma0, gamma1=gamma1, langevin_lr=llr,
        beta1=beta1, noise=0.0, weight_decay=wd, augment=False))
    new_state, metrics = step(state, batch, jax.random.PRNGKey(1))

    @jax.jit
    def grad_on(w, xi, yi):
        xa = pgd_at.adversarial_batch(state.replace(params=w), xi, yi, jax.random.PRNGKey(0), apply_fn=apply_fn,
                                      attack=attack, fraction=1.0)
        return jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
            apply_fn(p, model_state, xa, train=True)[0], yi).mean())(w)

    g = gamma0 * (1 + gamma1) ** t
    wc = {k: {n: np.asarray(v, np.float64) for n, v in d.items()} for k, d in params.items()}
    w = {k: {n: v.copy() for n, v in d.items()} for k, d in wc.items()}
    mw = {k: {n: v.copy() for n, v in d.items()} for k, d in wc.items()}
    for i in (1, 2):  # mini-batch 0 only reports the loss at w
        grads = grad_on(jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), w), x[4 * i:4 * (i + 1)],
                        y[4 * i:4 * (i + 1)])
        for k in w:
            for n in w[k]:
                dw = np.asarray(grads[k][n], np.float64) + wd * w[k][n]
                dw = dw - g * (wc[k][n] - w[k][n])
                w[k][n] = w[k][n] - llr * dw
                mw[k][n] = beta1 * mw[k][n] + (1 - beta1) * w[k][n]
    for k in wc:
        for n in wc[k]:
            dw = (wc[k][n] - mw[k][n]) + wd * wc[k][n]
            np.testing.assert_allclose(np.asarray(new_state.params[k][n]), wc[k][n] - lr * dw, rtol=1e-5,
                                       atol=1e-7, err_msg=f"{k}/{n}")
    np.testing.assert_allclose(float(metrics["gamma"]), g, rtol=1e-6)
    assert int(new_state.step) == t + 1


def test_entropy_sgd_config_ties_mini_batches_and_epochs_to_L():
    """The step consumes L + 1 mini-batches (the trainer loads batch_size x batches_per_step) for 150 // L epochs;
    overriding L moves both, and an inconsistent pair is refused before anything runs."""
    c = esgd_config.get_config()
    assert (c.train.batches_per_step, c.train.epochs, c.optimizer.momentum) == (2, 150, 0.0)
    c.esgd.L = 3
    assert (c.train.batches_per_step, c.train.epochs) == (4, 50)
    tx = optax.sgd(0.05)
    step = make_step(c, None, tx)
    assert step.keywords["L"] == 3 and step.keywords["weight_decay"] == c.optimizer.weight_decay
    c.train.batches_per_step = 2
    with pytest.raises(ValueError, match="batches_per_step = 4"):
        make_step(c, None, tx)
