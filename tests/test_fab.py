"""FAB / FAB-T: bounds, determinism, targets, minimal norms versus PGD, the projection sub-problem, bad inputs."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import brentq, linprog

from robust_flat.attacks.fab import FABConfig, _random_start, fab, project_hyperplane_box
from robust_flat.attacks.pgd import PGDConfig, pgd
from toy_task import make_data, toy_logits_fn

N = 32
project = jax.jit(project_hyperplane_box, static_argnames="norm")
EPS = {"linf": 6 / 255, "l2": 0.45}


def _norms(d, norm):
    d = np.asarray(d).reshape(d.shape[0], -1)
    return np.abs(d).max(1) if norm == "linf" else np.sqrt((d ** 2).sum(1))


def _pred(f, x):
    return np.asarray(jnp.argmax(f(jnp.asarray(x)), axis=1))


@pytest.fixture(scope="module")
def task():
    f = toy_logits_fn()
    x, y = make_data(N, seed=7)
    return f, x, y


@pytest.fixture(scope="module", params=["linf", "l2"])
def fab_t(request, task):
    """FAB-T with one target (the runner-up class), 20 iterations, on the toy model."""
    f, x, y = task
    norm = request.param
    cfg = FABConfig(eps=EPS[norm], norm=norm, n_iter=20, n_target_classes=1, unroll=1)  # unroll 1: short compile
    return norm, cfg, np.asarray(fab(f, x, y, jax.random.PRNGKey(0), cfg))


def test_bounds_and_unchanged_points(task, fab_t):
    f, x, y = task
    norm, cfg, x_adv = fab_t
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    dist = _norms(x_adv - x, norm)
    assert dist.max() <= cfg.eps * (1 + 1e-5)
    changed = dist > 0
    pred = _pred(f, x_adv)
    assert 0 < changed.sum() < N  # the toy model is neither fully robust nor fully broken at this eps
    assert np.all(pred[changed] != y[changed])  # every returned change is a success
    assert not changed[_pred(f, x) != y].any()  # points misclassified from the start come back unchanged


def test_successful_targeted_points_hit_their_target(task, fab_t):
    f, x, y = task
    norm, _, x_adv = fab_t
    runner_up = np.argsort(-np.asarray(f(jnp.asarray(x))), axis=1)[:, 1]
    changed = _norms(x_adv - x, norm) > 0
    assert changed.any()
    np.testing.assert_array_equal(_pred(f, x_adv)[changed], runner_up[changed])


def test_minimal_norm_smaller_than_pgd(task, fab_t):
    f, x, y = task
    norm, cfg, x_adv = fab_t
    eps = cfg.eps
    pgd_cfg = PGDConfig(eps=eps, norm=norm, step_size=eps / 4, steps=10, init="zero", unroll=False)
    x_pgd = np.asarray(pgd(f, x, y, jax.random.PRNGKey(0), pgd_cfg))
    both = (_pred(f, x_adv) != y) & (_pred(f, x_pgd) != y) & (_pred(f, x) == y)
    assert both.sum() >= 5
    fab_norm, pgd_norm = _norms(x_adv - x, norm)[both], _norms(x_pgd - x, norm)[both]
    assert np.all(pgd_norm > 0.95 * eps)  # PGD ends on the sphere of the ball...
    assert fab_norm.mean() < 0.8 * pgd_norm.mean()  # ...FAB near the decision boundary
    assert np.median(fab_norm / pgd_norm) < 0.8


def test_same_key_same_output_and_loops_agree(task):
    f, x, y = task
    cfg = FABConfig(eps=EPS["linf"], norm="linf", targeted=False, n_iter=3, n_restarts=2, loop="host", unroll=1)
    a = np.asarray(fab(f, x, y, jax.random.PRNGKey(3), cfg))
    b = np.asarray(fab(f, x, y, jax.random.PRNGKey(3), cfg))
    np.testing.assert_array_equal(a, b)
    # the traceable version (while_loop over runs, fori_loop over iterations) gives the same points
    c = np.asarray(fab(f, x, y, jax.random.PRNGKey(3), dataclasses.replace(cfg, loop="device")))
    np.testing.assert_allclose(c, a, atol=1e-5)
    assert _norms(a - x, "linf").max() <= cfg.eps * (1 + 1e-5) and a.min() >= 0 and a.max() <= 1
    assert (_pred(f, a) != y).sum() > (_pred(f, x) != y).sum()  # untargeted FAB breaks points too


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_start_is_half_eps_away_and_keyed(norm):
    x = jnp.full((4, 8, 8, 3), 0.5)
    a = np.asarray(_random_start(jax.random.PRNGKey(0), x, 0.2, norm))
    b = np.asarray(_random_start(jax.random.PRNGKey(0), x, 0.2, norm))
    c = np.asarray(_random_start(jax.random.PRNGKey(1), x, 0.2, norm))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    np.testing.assert_allclose(_norms(a - 0.5, norm), 0.1, rtol=1e-5)  # the original's eps / 2, inside the box here


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_projection_matches_an_independent_solver(norm):
    rng = np.random.default_rng(0)
    rows, dim = 12, 6
    t = rng.uniform(0, 1, (rows, dim)).astype(np.float32)
    t[:, 0] = rng.integers(0, 2, rows)  # some coordinates on the box faces
    w = rng.normal(size=(rows, dim)).astype(np.float32)
    w[::3, 1] = 0.0
    # targets reachable inside the box: w . z for a random box point z
    b = (w * rng.uniform(0, 1, (rows, dim))).sum(1).astype(np.float32)
    d = np.asarray(project(t, w, b, norm=norm))
    np.testing.assert_allclose((w * (t + d)).sum(1), b, atol=1e-4)
    assert (t + d).min() >= -1e-6 and (t + d).max() <= 1 + 1e-6
    for i in range(rows):
        if norm == "linf":  # LP: min s  s.t. |d_j| <= s, -t <= d <= 1 - t, w . d = b - w . t
            a_ub = np.block([[np.eye(dim), -np.ones((dim, 1))], [-np.eye(dim), -np.ones((dim, 1))]])
            res = linprog(np.r_[np.zeros(dim), 1.0], A_ub=a_ub, b_ub=np.zeros(2 * dim),
                          A_eq=np.r_[w[i], 0.0][None], b_eq=[b[i] - w[i] @ t[i]],
                          bounds=[(-t[i, j], 1 - t[i, j]) for j in range(dim)] + [(0, None)])
            assert res.status == 0
            np.testing.assert_allclose(np.abs(d[i]).max(), res.fun, rtol=1e-4, atol=1e-6)
        else:  # KKT: d(mu) = clip(-mu w, -t, 1 - t), with mu found by root finding on the constraint
            t64, w64 = t[i].astype(np.float64), w[i].astype(np.float64)
            target = b[i] - w64 @ t64
            d_of = lambda mu: np.clip(-mu * w64, -t64, 1 - t64)
            mu = brentq(lambda mu: w64 @ d_of(mu) - target, -1e6, 1e6, xtol=1e-14)
            np.testing.assert_allclose(d[i], d_of(mu), atol=2e-5)


def test_projection_infeasible_goes_to_the_closest_corner():
    t = np.full((12, 6), 0.5, np.float32)  # the shapes of the test above: no new compilation
    w = np.tile(np.asarray([[1.0, -2.0, 0.0, 3.0, 0.5, -0.5]], np.float32), (12, 1))
    for norm in ("linf", "l2"):  # w . z <= 4.5 on the box: both end in the corner that gets closest to 100
        d = np.asarray(project(t, w, np.full((12,), 100.0, np.float32), norm=norm))
        np.testing.assert_allclose(d, np.tile([[0.5, -0.5, 0.0, 0.5, 0.5, -0.5]], (12, 1)))


def test_bad_inputs_raise(task):
    f, x, y = task
    with pytest.raises(ValueError):
        FABConfig(eps=0.0)
    with pytest.raises(ValueError):
        FABConfig(norm="l1")
    with pytest.raises(ValueError):
        FABConfig(n_iter=0)
    with pytest.raises(ValueError):
        FABConfig(beta=1.5)
    with pytest.raises(ValueError):
        FABConfig(loop="gpu")
    with pytest.raises(ValueError):
        fab(f, x + 1.0, y, jax.random.PRNGKey(0), FABConfig(n_iter=1))
    with pytest.raises(ValueError):
        fab(f, x, y[:-1], jax.random.PRNGKey(0), FABConfig(n_iter=1))
    with pytest.raises(ValueError):
        fab(f, x, y.astype(np.float32), jax.random.PRNGKey(0), FABConfig(n_iter=1))
    with pytest.raises(ValueError):
        project_hyperplane_box(jnp.zeros((1, 2)), jnp.ones((1, 2)), jnp.zeros(1), "l1")
