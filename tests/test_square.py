"""Square Attack: bounds, determinism, monotone accepted loss, the p schedule, window masks, eta pattern, bad inputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from robust_flat.attacks.square import (SquareConfig, _window, eta_pattern, p_schedule, square, square_sizes,
                                        square_trace)
from toy_task import make_data, toy_logits_fn

N = 32
CONFIGS = {"linf": SquareConfig(eps=4 / 255, norm="linf", n_queries=100),
           "l2": SquareConfig(eps=0.3, norm="l2", n_queries=100)}


def _norms(d, norm):
    d = np.asarray(d).reshape(d.shape[0], -1)
    return np.abs(d).max(1) if norm == "linf" else np.sqrt((d ** 2).sum(1))


def _pred(f, x):
    return np.asarray(jnp.argmax(f(jnp.asarray(x)), axis=1))


def _margin(f, x, y):
    z = np.array(f(jnp.asarray(x)))
    z_y = z[np.arange(len(y)), y]
    z[np.arange(len(y)), y] = -np.inf
    return z_y - z.max(1)


@pytest.fixture(scope="module")
def task():
    f = toy_logits_fn()
    x, y = make_data(N, seed=7)
    return f, x, y


@pytest.fixture(scope="module", params=["linf", "l2"])
def run(request, task):
    f, x, y = task
    cfg = CONFIGS[request.param]
    x_adv, trace = square_trace(f, x, y, jax.random.PRNGKey(0), cfg)
    return cfg, np.asarray(x_adv), np.asarray(trace)


def test_bounds_and_unchanged_robust_points(task, run):
    f, x, y = task
    cfg, x_adv, _ = run
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    dist = _norms(x_adv - x, cfg.norm)
    assert dist.max() <= cfg.eps * (1 + 1e-5)
    changed = dist > 0
    pred = _pred(f, x_adv)
    assert 0 < changed.sum() < N  # some points fooled, some not, at this eps and budget
    assert np.all(pred[changed] != y[changed])  # every returned change fools the model; the rest come back as x
    assert not changed[_pred(f, x) != y].any()


def test_accepted_loss_is_monotone_and_matches_the_result(task, run):
    f, x, y = task
    cfg, x_adv, trace = run
    assert trace.shape == (1, cfg.n_queries + 1, N)
    losses = trace[0]
    assert np.all(np.diff(losses, axis=0) <= 0)  # never increases, query after query
    assert np.any(losses[-1] < losses[0] - 1e-3)  # ...and does decrease
    attacked = _pred(f, x) == y
    fooled = _pred(f, x_adv) != y
    assert np.all(losses[-1][attacked & ~fooled] > 0)  # robust points end with a positive margin
    # a fooled point's returned image has the accepted (final) margin loss, <= 0
    np.testing.assert_allclose(_margin(f, x_adv, y)[fooled & attacked], losses[-1][fooled & attacked], atol=1e-4)
    assert np.all(losses[-1][fooled & attacked] <= 0)


def test_same_key_same_output(task, run):
    f, x, y = task
    cfg, x_adv, trace = run
    again, trace_again = square_trace(f, x, y, jax.random.PRNGKey(0), cfg)
    np.testing.assert_array_equal(np.asarray(again), x_adv)
    np.testing.assert_array_equal(np.asarray(trace_again), trace)
    other, _ = square_trace(f, x, y, jax.random.PRNGKey(1), cfg)
    assert not np.array_equal(np.asarray(other), x_adv)


def test_square_equals_its_trace_variant(task):
    f, x, y = task
    cfg = CONFIGS["linf"]  # one norm only: each variant is a separate compilation
    x_trace, _ = square_trace(f, x, y, jax.random.PRNGKey(0), cfg)
    np.testing.assert_array_equal(np.asarray(square(f, x, y, jax.random.PRNGKey(0), cfg)), np.asarray(x_trace))


def test_p_schedule_and_square_sizes():
    # the original's breakpoints on the 10000-query scale, p_init halved after each
    assert [p_schedule(i, 10000, 0.8) for i in (0, 10, 11, 50, 51, 200, 201, 8000, 8001, 9999)] == \
        [0.8, 0.8, 0.4, 0.4, 0.2, 0.2, 0.1, 0.8 / 256, 0.8 / 512, 0.8 / 512]
    assert p_schedule(1, 5000, 0.8) == 0.8 and p_schedule(6, 5000, 0.8) == 0.4  # rescaled: int(6 / 5000 * 1e4) = 12
    assert p_schedule(6, 5000, 0.8, rescale=False) == 0.8
    linf = square_sizes(5000, 0.8, 32, 32, "linf")
    l2 = square_sizes(5000, 0.8, 32, 32, "l2")
    assert linf[0] == 29 and linf[6] == 20 and linf[-1] == 1  # round(sqrt(p * 1024)), at least 1
    assert l2[0] == 29 and l2[6] == 21 and l2[-1] == 3  # odd and at least 3
    assert np.all(np.diff(linf) <= 0) and np.all(l2 % 2 == 1)


def test_window_masks_match_slices():
    rng = np.random.default_rng(0)
    vh, vw = rng.integers(0, 12, 5), rng.integers(0, 12, 5)
    masks = np.asarray(_window(jnp.asarray(vh), jnp.asarray(vw), 5, 16, 16))
    for k in range(5):
        ref = np.zeros((16, 16, 1), bool)
        ref[vh[k]:vh[k] + 5, vw[k]:vw[k] + 5] = True
        np.testing.assert_array_equal(masks[k], ref)


def test_eta_pattern():
    for s in (3, 5, 6, 29):
        eta = eta_pattern(s)
        assert eta.shape == (s, s)
        np.testing.assert_allclose(np.sum(eta ** 2), 1.0, rtol=1e-12)
        assert np.all(eta[:s // 2] > 0) and np.all(eta[s // 2:] < 0)  # positive upper and negative lower lobe
        if s % 2:  # the centre column is s // 2, so odd sizes (all per-query windows) are symmetric left-right
            np.testing.assert_allclose(eta, eta[:, ::-1])


def test_bad_inputs_raise(task):
    f, x, y = task
    with pytest.raises(ValueError):
        SquareConfig(eps=-1.0)
    with pytest.raises(ValueError):
        SquareConfig(norm="l1")
    with pytest.raises(ValueError):
        SquareConfig(loss="dlr")
    with pytest.raises(ValueError):
        SquareConfig(p_init=0.0)
    with pytest.raises(ValueError):
        square(f, x - 0.6, y, jax.random.PRNGKey(0), CONFIGS["linf"])
    with pytest.raises(ValueError):
        square(f, x[:, :, :, 0], y, jax.random.PRNGKey(0), CONFIGS["linf"])
    with pytest.raises(ValueError):
        square(f, x, y[:3], jax.random.PRNGKey(0), CONFIGS["linf"])
