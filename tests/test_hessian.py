"""Hessian-vector products, Lanczos, Hutchinson and SLQ against the explicit Hessian of a tiny CNN."""
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from robust_flat import hessian as H
from robust_flat import linalg, xla
from robust_flat.attacks.common import cross_entropy
from robust_flat.attacks.pgd import PGDConfig
from robust_flat.models import create_model, init_model, make_apply_fn, make_logits_fn

SHAPE = (8, 8, 3)
INIT_KEY = jax.random.key(0, impl="rbg")  # "rbg" keys make Flax init compile ~3x faster on CPU  # 8x8 images: the tiny CNN has 514 kernel weights, small enough for an explicit Hessian


def _data(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(size=(n,) + SHAPE).astype(np.float32), rng.integers(0, 10, n).astype(np.int32)


@pytest.fixture(scope="module")
def tiny():
    model = create_model("small_cnn", channels=(2, 4), hidden=8)
    params, state = init_model(model, INIT_KEY, (1,) + SHAPE)
    x, y = _data(40)
    f = make_logits_fn(model)
    op = H.HessianOperator(f, params, state, x, y, H.HessianConfig(batch_size=40))
    theta, unravel = ravel_pytree(op.selected)

    def loss(t):  # mean CE over all 40 examples as a function of the flat kernel vector
        p = H.merge_params(unravel(t), op.rest)
        return jnp.mean(cross_entropy(f(p, state, jnp.asarray(x)), jnp.asarray(y)))

    hess = np.asarray(xla.jit(jax.jacfwd(jax.grad(loss)))(theta), np.float64)
    hess = 0.5 * (hess + hess.T)
    return types.SimpleNamespace(model=model, f=f, params=params, state=state, x=x, y=y, op=op, hess=hess,
                                 eig=np.linalg.eigvalsh(hess))


def test_default_selection_is_kernels(tiny):
    assert tiny.op.paths == ("conv1/kernel", "conv2/kernel", "conv3/kernel", "conv4/kernel", "fc1/kernel",
                             "logits/kernel")
    assert tiny.op.dim == tiny.hess.shape[0] == 514


def test_hvp_equals_explicit_hessian_times_vector(tiny):
    v = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (tiny.op.dim,)))
    expected = tiny.hess @ v
    scale = np.abs(expected).max()
    np.testing.assert_allclose(np.asarray(tiny.op(v)), expected, atol=1e-5 * scale)
    # Padded, uneven batches (16, 16, 8) with reduction="mean" are the Hessian of the mean over all 40 examples.
    op = H.HessianOperator(tiny.f, tiny.params, tiny.state, tiny.x, tiny.y,
                           H.HessianConfig(batch_size=16, reduction="mean"))
    assert op.num_batches == 3
    np.testing.assert_allclose(np.asarray(op(v)), expected, atol=1e-5 * scale)
    # (The code's "sum" reduction is checked in test_cli_writes_json_and_png.)


def test_hvp_on_a_parameter_subset_is_the_hessian_block(tiny):
    op = H.HessianOperator(tiny.f, tiny.params, tiny.state, tiny.x, tiny.y,
                           H.HessianConfig(select=[r"^conv3/", r"^logits/kernel"], batch_size=40))
    assert op.paths == ("conv3/bias", "conv3/kernel", "logits/kernel")
    # Rows/cols of the explicit (kernel) Hessian for conv3/kernel and logits/kernel; conv3/bias is new.
    sizes = {p: int(np.prod(tiny.op.selected[p].shape)) for p in tiny.op.paths}
    offsets = dict(zip(tiny.op.paths, np.cumsum([0] + [sizes[p] for p in tiny.op.paths])[:-1]))
    idx = np.concatenate([np.arange(offsets[p], offsets[p] + sizes[p]) for p in ("conv3/kernel", "logits/kernel")])
    n_bias = 4
    v = np.array(jax.random.normal(jax.random.PRNGKey(2), (op.dim,)))
    v[:n_bias] = 0.0  # no bias component: the result on the kernels must be the explicit block times v
    hv = np.asarray(op(v))
    np.testing.assert_allclose(hv[n_bias:], tiny.hess[np.ix_(idx, idx)] @ v[n_bias:],
                               atol=1e-5 * np.abs(hv).max())
    with pytest.raises(ValueError, match="matches no parameter"):
        H.split_params(tiny.params, "no_such_layer")


def test_lanczos_extreme_eigenvalues_match_eigvalsh(tiny):
    res = linalg.extreme_eigenvalues(tiny.op, tiny.op.dim, jax.random.PRNGKey(3), k=3, num_iters=80, vectors=True)
    scale = np.abs(tiny.eig).max()
    np.testing.assert_allclose(res.top, tiny.eig[::-1][:3], atol=1e-4 * scale)
    np.testing.assert_allclose(res.bottom, tiny.eig[:3], atol=1e-4 * scale)
    assert tiny.eig[0] < 0 < tiny.eig[-1]  # the test is not vacuous: both ends are distinct
    v = np.asarray(res.top_vectors[0], np.float64)
    np.testing.assert_allclose(np.linalg.norm(v), 1.0, atol=1e-4)
    np.testing.assert_allclose(tiny.hess @ v, res.top[0] * v, atol=1e-3 * scale)


def test_hutchinson_trace_converges_to_exact_trace(tiny):
    exact = np.trace(tiny.hess)
    probes = 100
    # Rademacher probes: Var(z^T H z) = 2 * sum_{j != k} H_jk^2.
    sd = np.sqrt(2 * (np.sum(tiny.hess ** 2) - np.sum(np.diag(tiny.hess) ** 2)))
    res = linalg.hutchinson_trace(tiny.op, tiny.op.dim, jax.random.PRNGKey(4), num_probes=probes)
    assert abs(res.trace - exact) < 4 * sd / np.sqrt(probes)
    assert 0.5 * sd / np.sqrt(probes) < res.stderr < 2 * sd / np.sqrt(probes)
    again = linalg.hutchinson_trace(tiny.op, tiny.op.dim, jax.random.PRNGKey(4), num_probes=probes)
    assert again.trace == res.trace  # same key, same probes


def test_slq_density_integrates_to_one_where_the_eigenvalues_are(tiny):
    dens = linalg.spectral_density(tiny.op, tiny.op.dim, jax.random.PRNGKey(5), num_probes=10, num_iters=40)
    dx = dens.grid[1] - dens.grid[0]
    assert abs(np.sum(dens.density) * dx - 1.0) < 1e-3
    np.testing.assert_allclose(np.nansum(dens.weights, axis=1), 1.0, atol=1e-4)
    n = len(tiny.eig)
    exact = linalg.gaussian_density(dens.grid, tiny.eig[None], np.full((1, n), 1.0 / n), dens.sigma)
    l1 = np.sum(np.abs(exact - dens.density)) * dx
    shifted = linalg.gaussian_density(dens.grid, tiny.eig[None] + 5 * dens.sigma, np.full((1, n), 1.0 / n), dens.sigma)
    assert l1 < 0.2 < np.sum(np.abs(shifted - dens.density)) * dx
    for t in (0.5 * tiny.eig[-1], 0.5 * tiny.eig[0]):  # mass in the tails: above/below a threshold
        frac = np.mean(tiny.eig > t) if t > 0 else np.mean(tiny.eig < t)
        mass = np.sum(dens.density[dens.grid > t]) * dx if t > 0 else np.sum(dens.density[dens.grid < t]) * dx
        assert abs(mass - frac) < 0.05
    assert abs(dens.mean() - np.mean(tiny.eig)) < 0.2 * np.std(tiny.eig)


def _scale_convs(params, state, alpha):
    """Multiply every conv's kernel and bias by alpha and its BN running mean/var by alpha/alpha^2."""
    params = jax.tree_util.tree_map(lambda a: a, params)
    state = jax.tree_util.tree_map(lambda a: a, state)
    for i in range(1, 5):
        params[f"conv{i}"] = {k: alpha * v for k, v in params[f"conv{i}"].items()}
        st = state["batch_stats"][f"norm{i}"]["stats"]
        state["batch_stats"][f"norm{i}"]["stats"] = {"mean": alpha * st["mean"], "var": alpha ** 2 * st["var"]}
    return params, state


def test_top_eigenvalue_scales_as_one_over_alpha_squared_under_bn_invariant_rescaling():
    model = create_model("small_cnn", channels=(2, 4), hidden=8, norm="bn")
    params, state = init_model(model, jax.random.key(6, impl="rbg"), (1,) + SHAPE)
    x, y = _data(32, seed=1)
    _, state = make_apply_fn(model)(params, state, jnp.asarray(x), train=True)  # non-trivial running stats
    f = make_logits_fn(model)
    config = H.HessianConfig(select=r"^conv\d/kernel$", batch_size=32)
    alpha = 2.0
    scaled_params, scaled_state = _scale_convs(params, state, alpha)
    logits = jax.jit(f)
    np.testing.assert_allclose(logits(scaled_params, scaled_state, x), logits(params, state, x), rtol=1e-4, atol=1e-4)
    lam = []
    for p, s in ((params, state), (scaled_params, scaled_state)):
        op = H.HessianOperator(f, p, s, x, y, config)
        lam.append(linalg.extreme_eigenvalues(op, op.dim, jax.random.PRNGKey(7), k=1, num_iters=60))
    np.testing.assert_allclose(lam[1].max, lam[0].max / alpha ** 2, rtol=2e-3)
    np.testing.assert_allclose(lam[1].min, lam[0].min / alpha ** 2, rtol=2e-3, atol=1e-4 * abs(lam[0].max))


def test_robust_hessian_is_the_hessian_at_fixed_adversarial_examples(tiny):
    config = H.HessianConfig(loss="robust", batch_size=16, reduction="mean", pgd=PGDConfig(steps=1))
    op = H.HessianOperator(tiny.f, tiny.params, tiny.state, tiny.x, tiny.y, config, key=jax.random.PRNGKey(8))
    x_adv = op.x_used
    assert np.abs(x_adv - tiny.x).max() <= 8 / 255 + 1e-6 and np.abs(x_adv - tiny.x).max() > 1e-3
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    assert op.loss() > tiny.op.loss()  # the attack increased the CE
    clean_at_adv = H.HessianOperator(tiny.f, tiny.params, tiny.state, x_adv, tiny.y,
                                     H.HessianConfig(batch_size=40, reduction="mean"))
    v = jax.random.normal(jax.random.PRNGKey(9), (op.dim,))
    ref = np.asarray(clean_at_adv(v))
    np.testing.assert_allclose(np.asarray(op(v)), ref, atol=1e-5 * np.abs(ref).max())
    again = H.HessianOperator(tiny.f, tiny.params, tiny.state, tiny.x, tiny.y, config, key=jax.random.PRNGKey(8))
    np.testing.assert_array_equal(again.x_used, x_adv)
    with pytest.raises(ValueError, match="key"):
        H.HessianOperator(tiny.f, tiny.params, tiny.state, tiny.x, tiny.y, config)


def test_bad_inputs_raise(tiny):
    with pytest.raises(ValueError):
        H.HessianConfig(loss="nope")
    with pytest.raises(ValueError):
        H.HessianConfig(reduction="max")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        H.HessianOperator(tiny.f, tiny.params, tiny.state, tiny.x + 2.0, tiny.y)
    with pytest.raises(ValueError):
        H.HessianOperator(tiny.f, tiny.params, tiny.state, tiny.x, tiny.y[:3])


def test_cli_writes_json_and_png(tiny, tmp_path):
    from experiments import flatness

    run = types.SimpleNamespace(model=tiny.model, params=tiny.params, model_state=tiny.state, ema_params=None,
                                epoch=3, step=30, config=None)
    x, y = tiny.x[:32], tiny.y[:32]
    summary = flatness.main(["--run-dir", str(tmp_path), "--snapshot", "3", "--measure", "hessian", "--k", "2",
                             "--lanczos-iters", "30", "--batch-size", "16", "--trace-probes", "5",
                             "--density-probes", "2", "--no-progress"],
                            load_run=lambda run_dir, snapshot: run, load_eval_set=lambda cfg, subset, data_dir: (x, y))
    out = tmp_path / "flatness"
    saved = json.loads((out / "hessian_ep3.json").read_text())
    assert (out / "hessian_ep3_density.png").stat().st_size > 1000
    assert saved["lambda_max"] == pytest.approx(summary["lambda_max"])
    assert saved["num_batches"] == 2 and saved["dim"] == 514 and len(saved["top_eigenvalues"]) == 2
    assert len(saved["density"]["grid"]) == len(saved["density"]["density"])
    # The code's "sum" reduction over two equal batches is twice the Hessian of the mean loss.
    mean_op = H.HessianOperator(tiny.f, tiny.params, tiny.state, x, y, H.HessianConfig(batch_size=16,
                                                                                         reduction="mean"))
    lam = linalg.extreme_eigenvalues(mean_op, mean_op.dim, jax.random.PRNGKey(10), k=1, num_iters=30).max
    assert saved["lambda_max"] == pytest.approx(2 * lam, rel=1e-3)
