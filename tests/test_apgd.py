"""APGD / APGD-T: threat-model bounds, the best-loss bookkeeping, determinism, targeting, the checkpoint schedule.

Compiles are the cost here (each config is one XLA compile of a scan over forward+backward passes), so the tests
share a few configs. Exact agreement with the original PyTorch code is in ``test_autoattack_reference.py``.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from robust_flat.attacks.apgd import APGDConfig, apgd_with_trace, checkpoint_schedule, targeted_dlr_loss
from robust_flat.attacks.common import dlr_loss
from toy_task import make_data, toy_logits_fn

N, SIZE = 16, 16
# unroll=2: the compiled chunk holds 2 iterations (compile time grows with it; results do not depend on it)
LINF = APGDConfig(eps=3 / 255, n_iter=10, unroll=2)
L2 = APGDConfig(eps=0.3, norm="l2", n_iter=10, loss="dlr", unroll=2)
TARGETED = APGDConfig(eps=3 / 255, n_iter=10, loss="dlr", targeted=True, n_target_classes=2, unroll=2)


@pytest.fixture(scope="module")
def setup():
    f = toy_logits_fn(SIZE)
    x, y = make_data(N, SIZE, seed=3)
    return f, jnp.asarray(x), jnp.asarray(y)


@pytest.fixture(scope="module")
def results(setup):
    f, x, y = setup
    return {name: [np.asarray(a) for a in apgd_with_trace(f, x, y, jax.random.key(3), cfg)]
            for name, cfg in (("linf", LINF), ("l2", L2), ("targeted", TARGETED))}


@pytest.mark.parametrize("name,cfg", [("linf", LINF), ("l2", L2), ("targeted", TARGETED)])
def test_ball_box_trace_and_outcome(setup, results, name, cfg):
    f, x, y = setup
    x_adv, best, loss = results[name]
    flat = (x_adv - np.asarray(x)).reshape(N, -1)
    size = np.abs(flat).max(1) if cfg.norm == "linf" else np.sqrt((flat.astype(np.float64) ** 2).sum(1))
    assert size.max() <= cfg.eps * (1 + 1e-5) + 1e-7
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    assert best.shape == (cfg.n_runs, cfg.n_iter + 1, N)
    # the best loss never decreases, and is exactly the running maximum of the iterates' losses
    ran = np.any(best != 0, axis=(1, 2))  # runs skipped because nothing was left to attack are all zeros
    assert ran[0]
    assert np.all(np.diff(best[ran], axis=1) >= 0)
    np.testing.assert_array_equal(best[ran], np.maximum.accumulate(loss[ran], axis=1))
    # fooled points are misclassified; all others come back unchanged (clean-misclassified ones included)
    pred = np.asarray(jnp.argmax(f(jnp.asarray(x_adv)), axis=1))
    clean_ok = np.asarray(jnp.argmax(f(x), axis=1)) == np.asarray(y)
    changed = np.any(x_adv != np.asarray(x), axis=(1, 2, 3))
    np.testing.assert_array_equal(changed, clean_ok & (pred != np.asarray(y)))
    assert 0 < changed.sum() < clean_ok.sum()  # informative: some but not all points are broken


def test_same_key_same_result_and_key_matters(setup, results):
    f, x, y = setup
    again = np.asarray(apgd_with_trace(f, x, y, jax.random.key(3), LINF)[0])
    other = np.asarray(apgd_with_trace(f, x, y, jax.random.key(4), LINF)[0])
    np.testing.assert_array_equal(results["linf"][0], again)
    assert not np.array_equal(results["linf"][0], other)


def test_scan_version_matches_host_loop(setup, results):
    """``loop="scan"`` (one traceable program, rolled) and the host loop over chunks give the same attack."""
    f, x, y = setup
    rolled = apgd_with_trace(f, x, y, jax.random.key(3), APGDConfig(eps=3 / 255, n_iter=10, unroll=1, loop="scan"))
    np.testing.assert_allclose(np.asarray(rolled[0]), results["linf"][0], atol=1e-6)
    np.testing.assert_allclose(np.asarray(rolled[1]), results["linf"][1], rtol=1e-5, atol=1e-6)


def test_targeted_success_reaches_target(setup, results):
    """APGD-T's targets are the runner-up and third clean classes here; the points it fools land on one of them."""
    f, x, y = setup
    x_adv = results["targeted"][0]
    order = np.argsort(np.asarray(f(x)), axis=1)
    pred = np.asarray(jnp.argmax(f(jnp.asarray(x_adv)), axis=1))
    fooled = pred != np.asarray(y)
    assert fooled.sum() >= 4
    on_target = (pred == order[:, -2]) | (pred == order[:, -3])
    np.testing.assert_array_equal(on_target[fooled], True)


def test_checkpoint_schedule_matches_original():
    # p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06): windows 22, 19, 16, 13, 10, 7, 6, 6
    assert checkpoint_schedule(100) == [(21, 22), (40, 19), (56, 16), (69, 13), (79, 10), (86, 7), (92, 6), (98, 6)]
    assert checkpoint_schedule(10)[:2] == [(1, 2), (2, 1)]


def test_dlr_losses_match_formula():
    z = np.array([[3.0, 1.0, 2.0, 0.5, -1.0], [0.1, 0.4, 0.3, 0.2, 0.0]], np.float32)
    y = np.array([0, 0])
    t = np.array([2, 3])
    s = np.sort(z, axis=1)
    # untargeted: point 0 correct (other = 2nd largest), point 1 wrong (other = largest)
    want = np.array([-(3.0 - 2.0) / (s[0, -1] - s[0, -3]), -(0.1 - 0.4) / (s[1, -1] - s[1, -3])])
    np.testing.assert_allclose(np.asarray(dlr_loss(jnp.asarray(z), jnp.asarray(y))), want, rtol=1e-5)
    want_t = -(z[[0, 1], y] - z[[0, 1], t]) / (s[:, -1] - 0.5 * (s[:, -3] + s[:, -4]))
    np.testing.assert_allclose(np.asarray(targeted_dlr_loss(jnp.asarray(z), jnp.asarray(y), jnp.asarray(t))),
                               want_t, rtol=1e-5)


def test_bad_inputs(setup):
    f, x, y = setup
    with pytest.raises(ValueError, match="eps"):
        APGDConfig(eps=0.0)
    with pytest.raises(ValueError, match="eps"):
        APGDConfig(eps=-0.1)
    with pytest.raises(ValueError, match="loss"):
        APGDConfig(loss="hinge")
    with pytest.raises(ValueError, match="dlr"):
        APGDConfig(targeted=True)  # APGD-T is defined with the targeted DLR loss only
    with pytest.raises(ValueError, match="norm"):
        APGDConfig(norm="l1")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        apgd_with_trace(f, x * 2.0, y, jax.random.key(0), LINF)
    with pytest.raises(ValueError, match="target classes"):
        apgd_with_trace(f, x, y, jax.random.key(0), APGDConfig(n_iter=2, loss="dlr", targeted=True,
                                                                n_target_classes=10))


def test_robust_point_subsets_match_the_full_batch(setup):
    """The host loop attacks only the points still robust, gathered into a smaller bucket (as the original
    subsets its batch); results equal the full-batch run, clean-misclassified points included."""
    f, x, y = setup
    y = np.asarray(y).copy()
    y[::2] = (np.asarray(jnp.argmax(f(x), axis=1))[::2] + 1) % 10  # half the points start misclassified
    cfg = APGDConfig(eps=3 / 255, n_iter=10, unroll=2, n_restarts=2, loop="host")
    sub = apgd_with_trace(f, x, y, jax.random.key(5), cfg)
    full = apgd_with_trace(f, x, y, jax.random.key(5), dataclasses.replace(cfg, shape_buckets=1))
    np.testing.assert_allclose(np.asarray(sub[0]), np.asarray(full[0]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(sub[1]), np.asarray(full[1]), rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(sub[1])[:, :, ::2] == 0)  # never attacked: zero traces, as a skipped run
    changed = np.any(np.asarray(sub[0]) != np.asarray(x), axis=(1, 2, 3))
    assert changed.any() and not changed[::2].any()
