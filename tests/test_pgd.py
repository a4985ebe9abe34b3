import jax
import jax.numpy as jnp
import numpy as np
import pytest

from robust_flat import models as M
from robust_flat.attacks.common import cross_entropy
from robust_flat.attacks.pgd import PGDConfig, pgd


@pytest.fixture(scope="module")
def setup():
    m = M.create_model("small_cnn", channels=(4, 8), hidden=16)
    p, s = M.init_model(m, jax.random.key(0, impl="rbg"))  # "rbg": Flax's init compiles ~3x faster on CPU
    f = M.bind(M.make_logits_fn(m), p, s)
    x = jax.random.uniform(jax.random.PRNGKey(1), (16, 32, 32, 3))
    y = jnp.argmax(f(x), -1)  # attack the predicted labels: every point starts "correct"
    return f, x, y


def _ball_config(norm, eps):
    return PGDConfig(eps=eps, step_size=eps / 4, steps=5, norm=norm, restarts=2)


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_pgd_stays_in_ball_and_box(setup, norm, eps):
    f, x, y = setup
    cfg = _ball_config(norm, eps)
    x_adv = pgd(f, x, y, jax.random.PRNGKey(2), cfg)
    d = (x_adv - x).reshape(len(x), -1)
    n = jnp.max(jnp.abs(d), 1) if norm == "linf" else jnp.linalg.norm(d, axis=1)
    assert float(n.max()) <= eps * (1 + 1e-5)
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0


def test_pgd_increases_loss_and_is_deterministic(setup):
    f, x, y = setup
    cfg = _ball_config("linf", 8 / 255)  # the program compiled for the test above
    a = pgd(f, x, y, jax.random.PRNGKey(3), cfg)
    b = pgd(f, x, y, jax.random.PRNGKey(3), cfg)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(jnp.mean(cross_entropy(f(a), y))) > float(jnp.mean(cross_entropy(f(x), y)))


def test_best_iterate_never_worse_than_the_start_or_the_last_iterate(setup):
    f, x, y = setup
    zero = PGDConfig(steps=6, init="zero")
    best = cross_entropy(f(pgd(f, x, y, jax.random.PRNGKey(4), zero)), y)
    assert np.all(np.asarray(best) >= np.asarray(cross_entropy(f(x), y)) - 1e-6)
    last = cross_entropy(f(pgd(f, x, y, jax.random.PRNGKey(4),
                               PGDConfig(steps=6, init="zero", best_iterate="last"))), y)
    assert np.all(np.asarray(best) >= np.asarray(last) - 1e-5)


def test_single_step_equals_a_manual_signed_gradient_step(setup):
    f, x, y = setup
    cfg = PGDConfig(steps=1, init="zero", step_size=0.01, best_iterate="last")

    @jax.jit  # one program instead of one compile per eager op
    def manual_step(x):
        g = jax.grad(lambda xx: jnp.sum(cross_entropy(f(xx), y)))(x)
        manual = jnp.clip(x + 0.01 * jnp.sign(g), 0, 1)
        return x + jnp.clip(manual - x, -cfg.eps, cfg.eps)

    manual = manual_step(x)
    np.testing.assert_allclose(np.asarray(pgd(f, x, y, jax.random.PRNGKey(0), cfg)), np.asarray(manual), atol=1e-6)


def test_restarts_keep_the_per_example_worst_case(setup):
    from robust_flat.attacks.pgd import _one_run

    f, x, y = setup
    cfg = PGDConfig(steps=3, restarts=3)
    key = jax.random.PRNGKey(5)
    combined = cross_entropy(f(pgd(f, x, y, key, cfg)), y)
    one_run = jax.jit(lambda k: _one_run(f, x, y, k, cfg)[0])  # one compile for the 3 keys
    runs = [cross_entropy(f(x + one_run(k)), y) for k in jax.random.split(key, 3)]
    np.testing.assert_allclose(np.asarray(combined), np.max(np.stack(runs), 0), rtol=1e-5, atol=1e-6)


def test_rolled_and_unrolled_loops_agree(setup):
    f, x, y = setup
    a = pgd(f, x, y, jax.random.PRNGKey(6), PGDConfig(steps=4, unroll=True))
    b = pgd(f, x, y, jax.random.PRNGKey(6), PGDConfig(steps=4, unroll=False))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_bad_inputs_raise(setup):
    f, x, y = setup
    with pytest.raises(ValueError, match="eps"):
        PGDConfig(eps=0.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pgd(f, x * 255.0, y, jax.random.PRNGKey(0), PGDConfig())
    with pytest.raises(ValueError, match="norm"):
        PGDConfig(norm="l3")
