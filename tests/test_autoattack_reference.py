"""Cross-check APGD against the original PyTorch AutoAttack (``pyautoattack``) on a PyTorch copy of the same model.

Skipped when torch or pyautoattack is missing. One APGD run from the same start point must follow the original's
trajectory (same checkpoints, step-size halvings, momentum, best-point bookkeeping); the full attacks must agree in
robust accuracy up to the randomness of their (different) random number generators.
"""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.slow  # ~90 s: PyTorch APGD runs next to ours
torch = pytest.importorskip("torch")
pytest.importorskip("pyautoattack")
from pyautoattack import AutoAttack  # noqa: E402
from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from robust_flat.torch_twins import max_logit_difference, small_cnn_from_flax, to_nchw, to_nhwc  # noqa: E402
from robust_flat.attacks.apgd import APGDConfig, single_run  # noqa: E402
from robust_flat.attacks.autoattack import AutoAttackConfig, autoattack  # noqa: E402
from toy_task import make_data, toy_logits_fn, trained_model  # noqa: E402

SIZE = 16


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    model, params, _ = trained_model(SIZE)
    f = toy_logits_fn(SIZE)
    net = small_cnn_from_flax(model, params, spatial=SIZE)
    x, y = make_data(64, SIZE, seed=7)
    return f, net, x, y


def test_torch_copy_has_the_same_logits(pair):
    f, net, x, _ = pair
    assert max_logit_difference(net, f, x) < 1e-4


@pytest.mark.parametrize("norm,eps,loss,targeted", [
    ("linf", 4 / 255, "ce", False), ("linf", 4 / 255, "dlr", False), ("linf", 4 / 255, "dlr", True),
    ("l2", 0.3, "ce", False),
])
def test_single_run_follows_the_original(pair, norm, eps, loss, targeted):
    """Same start point -> same iterates as ``APGDAttack.attack_single_run(x, y, x_init)``."""
    f, net, _, _ = pair
    x, y = make_data(256, SIZE, seed=8)
    top2 = np.sort(np.asarray(f(x)), axis=1)[:, -2:]
    least_certain = np.argsort(top2[:, 1] - top2[:, 0])[:64]  # informative starts (see below)
    x, y = x[least_certain], y[least_certain]
    n_iter = 20  # checkpoint windows 4, 3, 2, 1, 1, ...: every rule is exercised many times
    rng = np.random.default_rng(0)
    start = np.clip(x + eps * rng.choice([-1.0, 1.0], x.shape) * (1 if norm == "linf" else 0.03), 0, 1)
    start = start.astype(np.float32)
    logits = np.asarray(f(x))
    y_target = np.argsort(logits, axis=1)[:, -2].astype(np.int32)

    cls = APGDAttack_targeted if targeted else APGDAttack
    kw = {} if targeted else {"loss": loss}
    ref = cls(net, n_iter=n_iter, norm={"linf": "Linf", "l2": "L2"}[norm], eps=eps, seed=0, rho=0.75,
              device="cpu", **kw)
    xt = to_nchw(x)
    ref.init_hyperparam(xt)
    if targeted:
        ref.y_target = torch.from_numpy(y_target).long()
    t_best, t_acc, t_loss_best, t_best_adv = ref.attack_single_run(xt, torch.from_numpy(y).long(), to_nchw(start))

    cfg = APGDConfig(eps=eps, norm=norm, n_iter=n_iter, loss=loss, targeted=targeted, unroll=2)
    r = single_run(f, jnp.asarray(x), jnp.asarray(y), jnp.asarray(start), jnp.asarray(y_target),
                   jnp.ones(len(x), bool), cfg)
    # float32 rounding differs between the frameworks. Where the start is nearly certain (CE ~ 1e-5) the gradient is
    # rounding noise and the paths part at once; elsewhere rounding drifts slowly (L2 directions use every gradient
    # entry), which can flip a marginal checkpoint decision. A wrong rule (momentum, checkpoints, halving, reset to
    # the best point, best-point bookkeeping) would part nearly every path within the first windows.
    loss_ok = np.isclose(np.asarray(r["loss_best"]), t_loss_best.numpy(), rtol=1e-3, atol=1e-4)
    x_ok = np.all(np.isclose(np.asarray(r["x_best"]), to_nhwc(t_best), atol=1e-4), axis=(1, 2, 3))
    same = loss_ok & x_ok
    informative = np.asarray(r["trace_loss"])[0] > 1e-4 if loss == "ce" else np.ones(len(x), bool)
    print(f"{norm} {loss} targeted={targeted}: {same.sum()}/{len(same)} points follow the original's path, "
          f"{same[informative].sum()}/{informative.sum()} of those with a non-saturated start")
    assert informative.sum() >= 32 and same[informative].mean() >= 0.85
    np.testing.assert_array_equal((~np.asarray(r["fooled"]))[same], t_acc.numpy()[same])
    fooled = np.asarray(r["fooled"]) & same
    np.testing.assert_allclose(np.asarray(r["x_best_adv"])[fooled], to_nhwc(t_best_adv)[fooled], atol=1e-4)


def test_robust_accuracy_agrees_with_the_original(pair):
    """Full attacks with their own random starts: robust accuracy within 2 of 64 points (APGD-CE, APGD-T)."""
    f, net, x, y = pair
    eps = 4 / 255  # same eps, iterations and batch shape as above: the compiled APGD steps are reused
    cfg = AutoAttackConfig(eps=eps, version="fast", n_iter=20, n_target_classes=3, apgd_unroll=2)
    ours = autoattack(f, x, y, jax.random.key(0), cfg, batch_size=64, shape_buckets=1, log=lambda s: None).accuracy()
    aa = AutoAttack(net, attacks=["apgd-ce", "apgd-t"], version="custom", eps=eps, norm="Linf", seed=0,
                    device="cpu")
    aa.apgd.n_iter = aa.apgd_targeted.n_iter = 20
    aa.apgd.n_restarts = aa.apgd_targeted.n_restarts = 1
    aa.apgd_targeted.n_target_classes = 3
    for a in (aa.apgd, aa.apgd_targeted):  # n_iter changed after construction: recompute the checkpoint schedule
        a.n_iter_2, a.n_iter_min, a.size_decr = max(int(0.22 * 20), 1), max(int(0.06 * 20), 1), max(int(0.03 * 20), 1)
    x_adv, _ = aa.run_standard_evaluation(to_nchw(x), torch.from_numpy(y).long(), batch_size=64)
    with torch.no_grad():
        theirs = float((net(x_adv).argmax(1).numpy() == y).mean())
    assert ours["clean"] == pytest.approx(float((np.asarray(f(x)).argmax(1) == y).mean()))
    assert 0.1 < ours["apgd-t"] < ours["clean"]  # the comparison is informative: some, not all points broken
    assert abs(ours["apgd-t"] - theirs) <= 2 / 64 + 1e-9
