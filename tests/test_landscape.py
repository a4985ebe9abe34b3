"""Robust-loss landscapes: directions, normalization, PGD recomputed per point, files."""
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from robust_flat import landscape as L
from robust_flat.attacks.common import cross_entropy
from robust_flat.attacks.pgd import PGDConfig, pgd
from robust_flat.models import bind, create_model, init_model, make_logits_fn
from robust_flat.weights import LayerSelection, selected_paths

SHAPE = (8, 8, 3)
INIT_KEY = jax.random.key(0, impl="rbg")  # "rbg" keys make Flax init compile ~3x faster on CPU
# One config everywhere: every distinct PGD config recompiles the per-point function.
CFG = L.LandscapeConfig(steps=5, num_directions=2, pgd=PGDConfig(steps=1), adversarial_steps=1,
                        direction_pgd=PGDConfig(steps=1), surface_steps=3, hessian_iters=20)


@pytest.fixture(scope="module")
def tiny():
    model = create_model("small_cnn", channels=(2, 4), hidden=8, norm="bn")  # BN after every conv
    params, state = init_model(model, INIT_KEY, (1,) + SHAPE)
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(16,) + SHAPE).astype(np.float32)
    y = rng.integers(0, 10, 16).astype(np.int32)
    state = {"batch_stats": {name: {"stats": {"mean": jnp.asarray(rng.normal(0, 0.1, st["stats"]["mean"].shape),
                                                                jnp.float32),
                                              "var": jnp.asarray(rng.uniform(0.5, 2, st["stats"]["var"].shape),
                                                                 jnp.float32)}}
                             for name, st in state["batch_stats"].items()}}  # non-trivial running statistics
    return types.SimpleNamespace(model=model, f=make_logits_fn(model), params=params, state=state, x=x, y=y)


def _leaves(tree):
    return dict(zip(["/".join(str(getattr(k, "key", k)) for k in p)
                     for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]], jax.tree.leaves(tree)))


def test_normalizations(tiny):
    raw = jax.tree.map(lambda w: jnp.asarray(np.random.default_rng(1).normal(size=w.shape), w.dtype), tiny.params)
    sel = set(selected_paths(tiny.params, LayerSelection()))
    assert "norm1/scale" not in sel and "conv1/bias" in sel and "logits/kernel" in sel
    w = _leaves(tiny.params)
    for mode, scale in (("layer", 0.5), ("filter", 0.5), ("layer_max", 0.01)):
        d = _leaves(L.normalize_direction(raw, tiny.params, CFG, scale, mode))
        for path, leaf in d.items():
            leaf, wl = np.asarray(leaf), np.asarray(w[path])
            if path not in sel:
                assert not leaf.any(), path  # BN parameters are never perturbed
            elif mode == "layer":
                np.testing.assert_allclose(np.linalg.norm(leaf), scale * np.linalg.norm(wl), rtol=1e-5)
            elif mode == "filter" and leaf.ndim > 2:  # per output filter (HWIO: last axis)
                np.testing.assert_allclose(np.linalg.norm(leaf.reshape(-1, leaf.shape[-1]), axis=0),
                                           scale * np.linalg.norm(wl.reshape(-1, wl.shape[-1]), axis=0), rtol=1e-5)
            elif mode == "layer_max":
                np.testing.assert_allclose(np.abs(leaf).max(), scale * np.abs(wl).max(), rtol=1e-5)
    with pytest.raises(ValueError):
        L.normalize_direction(raw, tiny.params, CFG, 0.5, "nope")


def test_curve_recomputes_pgd_at_every_point_and_passes_through_the_unperturbed_robust_loss(tiny):
    key = jax.random.PRNGKey(3)
    d = L.random_direction(jax.random.PRNGKey(2), tiny.params, CFG)
    curve = L.loss_curve(tiny.f, tiny.params, tiny.state, tiny.x, tiny.y, d, key, CFG)
    assert curve["s"] == pytest.approx([-1, -0.5, 0, 0.5, 1])
    x, y = jnp.asarray(tiny.x), jnp.asarray(tiny.y)

    logits = jax.jit(tiny.f)
    ce = lambda p, inputs: float(jnp.mean(cross_entropy(logits(p, tiny.state, inputs), y)))
    x_adv0 = pgd(bind(tiny.f, tiny.params, tiny.state), x, y, key, CFG.pgd)

    def reference(s):  # RLoss with a fresh PGD at w + s d; clean loss; CE at the s=0 adversarial examples
        p = jax.tree.map(lambda w, dl: w + s * dl, tiny.params, d)
        return ce(p, pgd(bind(tiny.f, p, tiny.state), x, y, key, CFG.pgd)), ce(p, x), ce(p, x_adv0)

    for i, s in ((2, 0.0), (4, 1.0)):  # the unperturbed RLoss at s=0, and a fresh PGD at the perturbed weights
        robust, clean, fixed = reference(s)
        assert curve["robust_loss"][i] == pytest.approx(robust, rel=1e-4)
        assert curve["clean_loss"][i] == pytest.approx(clean, rel=1e-4)
    # Holding the s=0 adversarial examples fixed would give a different (lower) curve away from s=0.
    assert curve["robust_loss"][4] > fixed + 1e-3


def test_layerwise_normalized_landscape_is_invariant_to_bn_conv_rescaling(tiny):
    """The paper's point: per-layer normalized directions make the visualization scale invariant."""
    alpha = 3.0
    params = jax.tree.map(lambda a: a, tiny.params)
    state = jax.tree.map(lambda a: a, tiny.state)
    for i in range(1, 5):
        params[f"conv{i}"] = {k: alpha * v for k, v in params[f"conv{i}"].items()}
        st = state["batch_stats"][f"norm{i}"]["stats"]
        state["batch_stats"][f"norm{i}"]["stats"] = {"mean": alpha * st["mean"], "var": alpha ** 2 * st["var"]}
    key = jax.random.PRNGKey(4)
    curves = []
    for p, s in ((tiny.params, tiny.state), (params, state)):
        d = L.random_direction(jax.random.PRNGKey(5), p, CFG)
        curves.append(L.loss_curve(tiny.f, p, s, tiny.x, tiny.y, d, key, CFG))
    for m in ("robust_loss", "clean_loss"):
        np.testing.assert_allclose(curves[1][m], curves[0][m], rtol=1e-3)
    assert np.ptp(curves[0]["clean_loss"]) > 0.05  # the curve is not flat: the check has teeth
    # With unnormalized ("none") directions the same Gaussian draw gives a different landscape.
    raw = L.normalize_direction(L.random_direction(jax.random.PRNGKey(5), tiny.params, CFG), tiny.params, CFG, 1.0,
                                "none")
    scaled_curve = L.loss_curve(tiny.f, params, state, tiny.x, tiny.y, raw, key, CFG)
    assert np.abs(np.asarray(scaled_curve["clean_loss"]) - curves[0]["clean_loss"]).max() > 1e-2


def test_landscape_1d_aggregates_and_adversarial_directions_ascend(tiny):
    res = L.landscape_1d(tiny.f, tiny.params, tiny.state, tiny.x, tiny.y, jax.random.PRNGKey(6), CFG,
                         ("random", "adversarial"))
    u = res["unperturbed"]["robust_loss"]
    for kind, reduce in (("random", np.mean), ("adversarial", np.max)):
        r = res["kinds"][kind]
        curves = np.asarray([c["robust_loss"] for c in r["curves"]])
        assert curves.shape == (2, 5)
        np.testing.assert_allclose(r["aggregate"]["robust_loss"], reduce(curves, axis=0))
        np.testing.assert_allclose(curves[:, 2], u, rtol=1e-5)  # every curve passes through the unperturbed RLoss
    adv = np.asarray([c["robust_loss"] for c in res["kinds"]["adversarial"]["curves"]])
    assert np.all(adv[:, 4] > u) and np.all(adv[:, 4] > adv[:, 0])  # +s is the ascent direction
    # Direction lengths: 0.5 resp. 0.025 times the norm of the selected weights (layer-wise normalization).
    w_norm = np.sqrt(sum(float(jnp.sum(v ** 2)) for p, v in _leaves(tiny.params).items()
                         if p in set(selected_paths(tiny.params, LayerSelection()))))
    np.testing.assert_allclose(res["kinds"]["random"]["direction_norms"], 0.5 * w_norm, rtol=1e-4)
    np.testing.assert_allclose(res["kinds"]["adversarial"]["direction_norms"], 0.025 * w_norm, rtol=1e-4)


def test_cli_writes_json_npz_and_png(tiny, tmp_path):
    from experiments import flatness, landscape

    assert landscape.KINDS == L.KINDS and landscape.NORMALIZATIONS == L.NORMALIZATIONS  # the parser's choices
    run = types.SimpleNamespace(model=tiny.model, params=tiny.params, model_state=tiny.state, ema_params=None,
                                epoch=7, step=70, config=None)
    x = np.concatenate([tiny.x, tiny.x[:4]])  # 20 examples; the CLI uses the first --n-examples
    y = np.concatenate([tiny.y, tiny.y[:4]])
    result = flatness.main(["--run-dir", str(tmp_path), "--snapshot", "7", "--measure", "landscape", "--directions",
                            "random,hessian", "--num-directions", "2", "--steps", "5", "--pgd-steps", "1",
                            "--n-examples", "16", "--surface", "random,random", "--surface-steps", "3",
                            "--lanczos-iters", "20", "--no-progress"],
                           load_run=lambda run_dir, snapshot: run, load_eval_set=lambda cfg, subset, data_dir: (x, y))
    out = tmp_path / "flatness"
    saved = json.loads((out / "landscape_ep7.json").read_text())
    assert saved["num_examples"] == 16 and saved["epoch"] == 7 and set(saved["kinds"]) == {"random", "hessian"}
    assert saved["kinds"]["hessian"]["lambda_max"] > 0 and len(saved["kinds"]["hessian"]["curves"]) == 1
    assert saved["kinds"]["random"]["aggregate"]["robust_loss"] == pytest.approx(
        result["kinds"]["random"]["aggregate"]["robust_loss"])
    surf = np.load(out / "landscape_ep7_surface.npz")
    assert surf["robust_loss"].shape == (3, 3)
    assert np.isfinite(surf["robust_loss"]).all() and np.ptp(surf["clean_loss"]) > 0
    for name in ("landscape_ep7.png", "landscape_ep7_surface.png"):
        assert (out / name).stat().st_size > 1000


def test_bad_config_raises():
    with pytest.raises(ValueError):
        L.LandscapeConfig(normalization="global")
    with pytest.raises(ValueError):
        L.LandscapeConfig(steps=0)
    with pytest.raises(ValueError):
        L.LandscapeConfig(random_scale=0)
