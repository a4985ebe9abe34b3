"""SAM / ASAM on the robust loss (robust_flat/training/sam.py): the perturbation's radius and direction, rho = 0 is the
PGD-AT step, the update is the gradient at w + eps with the batch-norm statistics of the pass at w, and the config's
defaults. Tiny model, 8x8 inputs, batch 8."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.configs import sam as sam_config
from robust_flat import xla
from robust_flat.attacks.pgd import PGDConfig
from robust_flat.models import create_model, make_apply_fn
from robust_flat.training import make_step, pgd_at, sam
from robust_flat.training.config_check import check_config
from robust_flat.training.state import create_train_state
from tests.toy_task import _he_init, make_data

SIZE, B = 8, 8
ATTACK = PGDConfig(init="zero", steps=2)  # deterministic start: the by-hand x' is the step's
TX = optax.sgd(1.0)


def _setup(seed=0):
    model = create_model("small_cnn", channels=(4, 8), hidden=16, norm="rebn")
    params, model_state = _he_init(model, seed, SIZE)
    # non-zero biases and BN scales (they are perturbed too), running variances 1 as in a real init
    params = jax.tree_util.tree_map_with_path(
        lambda path, v: jnp.asarray(0.1 * np.cos(np.arange(v.size, dtype=np.float32))) if v.ndim == 1 else v, params)
    model_state = jax.tree_util.tree_map_with_path(
        lambda path, v: jnp.ones_like(v) if path[-1].key == "var" else v, model_state)
    x, y = make_data(B, SIZE, seed=seed + 7)
    batch = {"image": jnp.asarray(np.round(x * 255).astype(np.uint8)), "label": jnp.asarray(y)}
    return make_apply_fn(model), params, model_state, batch


def _flat(tree):
    return {"/".join(str(k.key) for k in p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_perturbation_has_radius_rho_in_its_norm_and_maximizes_the_linear_term():
    rng = np.random.default_rng(0)
    params = {"conv": {"kernel": rng.normal(size=(3, 3, 2, 4)), "bias": rng.normal(size=4)},
              "norm": {"scale": rng.normal(size=4), "bias": rng.normal(size=4)}}
    grads = jax.tree.map(lambda v: rng.normal(size=v.shape), params)
    params, grads = (jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), t) for t in (params, grads))
    g, w = _flat(grads), _flat(params)
    rho, eta = 0.05, 0.01

    eps = _flat(sam.sam_perturbation(params, grads, rho))
    g_norm = np.sqrt(sum(np.sum(v ** 2) for v in g.values()))
    assert np.sqrt(sum(np.sum(v ** 2) for v in eps.values())) == pytest.approx(rho, rel=1e-5)
    for k in g:
        np.testing.assert_allclose(eps[k], rho * g[k] / g_norm, rtol=1e-5, atol=1e-8)

    eps = _flat(sam.sam_perturbation(params, grads, 0.5, adaptive=True, eta=eta))
    t = {k: np.ones_like(w[k]) if k.endswith("bias") else np.abs(w[k]) + eta for k in w}  # ASAM's T_w
    assert np.sqrt(sum(np.sum((eps[k] / t[k]) ** 2) for k in eps)) == pytest.approx(0.5, rel=1e-5)
    tg_norm = np.sqrt(sum(np.sum((t[k] * g[k]) ** 2) for k in g))
    for k in g:
        np.testing.assert_allclose(eps[k], 0.5 * t[k] ** 2 * g[k] / tg_norm, rtol=1e-5, atol=1e-8)
    # the first-order worst case of the ellipsoid ||e / T|| <= rho: no random boundary point has a larger <g, e>
    best = sum(np.sum(g[k] * eps[k]) for k in g)
    for _ in range(50):
        u = {k: rng.normal(size=v.shape) for k, v in g.items()}
        u_norm = np.sqrt(sum(np.sum(v ** 2) for v in u.values()))
        assert sum(np.sum(g[k] * 0.5 * t[k] * u[k] / u_norm) for k in g) < best
    assert all(np.all(v == 0) for v in _flat(sam.sam_perturbation(params, jax.tree.map(jnp.zeros_like, grads),
                                                                  rho)).values())


@functools.lru_cache(maxsize=None)
def _sam_step(apply_fn, adaptive=False):
    """``(state, batch, rng, rho) -> (state, metrics)`` with SGD(lr=1); rho is traced (one compile per variant)."""
    return xla.jit(lambda s, b, k, rho: sam.train_step(s, b, k, apply_fn=apply_fn, tx=TX, attack=ATTACK, rho=rho,
                                                       adaptive=adaptive, augment=False))


def test_sam_update_is_the_gradient_at_the_perturbed_weights_with_the_statistics_of_the_pass_at_w():
    """By hand: x' (PGD at w, eval mode), g at (w, x') in train mode, eps = rho g/||g||, update = -grad of the
    train-mode loss at (w + eps, x') with SGD(lr=1); the running statistics are those of the train-mode pass at w."""
    apply_fn, params, model_state, batch = _setup()
    state = create_train_state(params, model_state, TX, jax.random.PRNGKey(0))
    rng, rho = jax.random.PRNGKey(5), 0.3
    new_state, metrics = _sam_step(apply_fn)(state, batch, rng, rho)

    x = batch["image"].astype(jnp.float32) / 255.0
    y = batch["label"]
    k_att = jax.random.split(rng, 3)[1]
    x_adv = jax.jit(lambda s, x: pgd_at.adversarial_batch(s, x, y, k_att, apply_fn=apply_fn, attack=ATTACK,
                                                          fraction=1.0))(state, x)

    @jax.jit
    def loss_and_grad(p):
        def loss(p):
            logits, stats = apply_fn(p, model_state, x_adv, train=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), stats
        return jax.value_and_grad(loss, has_aux=True)(p)

    (loss_w, stats_w), g = loss_and_grad(params)
    g, w = _flat(g), _flat(params)
    g_norm = np.sqrt(sum(np.sum(v ** 2) for v in g.values()))
    w_eps = {k: w[k] + rho * g[k] / g_norm for k in w}
    (loss_eps, stats_eps), g_eps = loss_and_grad(jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(params), [w_eps[k] for k in _flat(params)]))
    got = _flat(new_state.params)
    for k, gg in _flat(g_eps).items():
        np.testing.assert_allclose(got[k], w[k] - gg, rtol=2e-4, atol=2e-6, err_msg=k)
    assert max(np.abs(got[k] - w[k]).max() for k in w) > 1e-3  # the step moved the weights
    np.testing.assert_allclose(float(metrics["batch_loss"]), float(loss_eps), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["batch_loss_at_w"]), float(loss_w), rtol=1e-5)
    assert float(loss_eps) > float(loss_w)  # the weight step ascends
    new_stats, at_w, at_eps = _flat(new_state.model_state), _flat(stats_w), _flat(stats_eps)
    for k in at_w:
        np.testing.assert_allclose(new_stats[k], at_w[k], rtol=1e-5, atol=1e-7, err_msg=k)
    assert max(np.abs(at_w[k] - at_eps[k]).max() for k in at_w) > 1e-4  # the two passes' statistics differ
    assert max(np.abs(at_w[k] - _flat(model_state)[k]).max() for k in at_w) > 1e-4  # and were updated


def test_rho_zero_is_the_pgd_at_step_and_asam_moves_otherwise():
    apply_fn, params, model_state, batch = _setup()
    state = create_train_state(params, model_state, TX, jax.random.PRNGKey(0))
    rng = jax.random.PRNGKey(3)
    at = xla.jit(lambda s, b, k: pgd_at.train_step(s, b, k, apply_fn=apply_fn, tx=TX, attack=ATTACK,
                                                   augment=False))
    at_state, _ = at(state, batch, rng)
    for adaptive in (False, True):
        zero_state, _ = _sam_step(apply_fn, adaptive)(state, batch, rng, 0.0)
        for tree in ("params", "model_state"):
            for a, b in zip(jax.tree.leaves(getattr(zero_state, tree)), jax.tree.leaves(getattr(at_state, tree))):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)  # XLA fusion order
    asam_state, _ = _sam_step(apply_fn, True)(state, batch, rng, 0.5)
    assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(asam_state.params),
                                                             jax.tree.leaves(at_state.params))) > 1e-4


def test_config_defaults_validation_and_the_registry_step():
    config = sam_config.get_config("tiny")
    assert check_config(config) == [] and config.method == "sam" and config.sam.rho is None
    apply_fn, tx = _setup()[0], optax.sgd(0.01)
    assert make_step(config, apply_fn, tx).keywords["rho"] == 0.05  # SAM (Foret et al.)
    config.sam.adaptive = True
    assert make_step(config, apply_fn, tx).keywords["rho"] == 0.5  # ASAM (Kwon et al.)
    config.sam.rho, config.attack.steps = 0.2, 1
    step = make_step(config, apply_fn, tx)  # the step the tests above run, with the config's options
    assert step.func is sam.train_step and step.keywords["attack"].steps == 1
    assert {k: step.keywords[k] for k in ("rho", "adaptive", "eta", "fraction")} == dict(
        rho=0.2, adaptive=True, eta=0.01, fraction=1.0)
    bad = sam_config.get_config("tiny")
    bad.sam.rho, bad.sam.eta = -0.1, -1.0
    assert check_config(bad) == ["sam.rho must be a number >= 0 (or None: 0.05, 0.5 with sam.adaptive), got -0.1",
                                 "sam.eta must be a number >= 0, got -1.0"]
