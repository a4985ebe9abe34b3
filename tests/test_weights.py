"""Layer selection, the relative neighbourhood B_xi(w), random and adversarial weight perturbations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn

from robust_flat.attacks.common import cross_entropy
from robust_flat.attacks.pgd import PGDConfig, pgd
from robust_flat.models import create_model, init_model, make_logits_fn
from robust_flat.weights import (LayerSelection, Neighbourhood, WeightAttackConfig, normalize, perturb, project,
                                 relative_norms, sample, selected_paths, weight_attack, within_ball)
from robust_flat.weights.neighbourhood import norms, radii

from flatness_toy import make_data, random_params, tiny_model


def _bn_params(seed=0):
    """Tiny small-CNN with BN and random (non-zero) weights, biases and BN parameters."""
    model = tiny_model("rebn")
    params, state = random_params(model, seed)
    return model, params, state


def _leaf(params, path):
    for k in path.split("/"):
        params = params[k]
    return params


# ------------------------------------------------------------------------------------------------ selection
def test_resnet18_selection_is_the_papers_26_tensors():
    model = create_model("resnet18")
    params, _ = jax.eval_shape(lambda k: init_model(model, k), jax.random.PRNGKey(0))
    sel = selected_paths(params)
    expected = {"conv1/kernel", "conv1/bias", "logits/kernel", "logits/bias"}
    for stage in range(1, 5):
        for block in range(2):
            for conv in ("conv1", "conv2"):
                expected.add(f"stage{stage}_block{block}/{conv}/kernel")
    for stage in (2, 3, 4):
        expected |= {f"stage{stage}_block0/shortcut_conv/kernel", f"stage{stage}_block0/shortcut_conv/bias"}
    assert len(sel) == 26 and set(sel) == expected
    all_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    assert len(all_paths) - 26 == 2 * (1 + 16 + 3)  # every BN (scale, bias) pair is excluded


class _Custom(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        h = nn.LayerNorm()(nn.Dense(8, name="encoder")(x))
        aux = nn.Dense(3, name="aux_head")(h)
        return nn.Dense(10, name="head")(h), aux


def test_selection_patterns_work_on_any_flax_model():
    shapes = jax.eval_shape(lambda k: _Custom().init(k, jnp.zeros((1, 4))), jax.random.PRNGKey(0))["params"]
    params = jax.tree.map(lambda a: jnp.ones(a.shape, a.dtype), shapes)
    assert set(selected_paths(params)) == {"encoder/kernel", "encoder/bias", "head/kernel", "head/bias"}
    no_bias = LayerSelection(exclude=("norm", "aux", r"(^|/)bias$"))
    assert set(selected_paths(params, no_bias)) == {"encoder/kernel", "head/kernel"}
    only_head = LayerSelection(include=(r"^head/",), exclude=())
    assert set(selected_paths(params, only_head)) == {"head/kernel", "head/bias"}
    everything = LayerSelection(include=(".",), exclude=())
    assert len(selected_paths(params, everything)) == len(jax.tree.leaves(params))
    # a selection is honoured by the samplers: the LayerNorm and the aux head stay at zero
    nb = Neighbourhood(xi=0.5)
    nu = sample(jax.random.PRNGKey(1), params, nb, "sphere")
    assert np.all(np.asarray(nu["LayerNorm_0"]["scale"]) == 0) and np.all(np.asarray(nu["aux_head"]["kernel"]) == 0)
    assert np.any(np.asarray(nu["head"]["kernel"]) != 0)
    with pytest.raises(ValueError):
        LayerSelection(include=("(unclosed",))
    with pytest.raises(ValueError):
        weight_attack(lambda p, s, x: x, params, {}, jnp.zeros((1, 4)), jnp.zeros((1,), jnp.int32),
                      jax.random.PRNGKey(0), WeightAttackConfig(neighbourhood=Neighbourhood(
                          selection=LayerSelection(include=("nothing_matches_this",)))))


# ------------------------------------------------------------------------------------------------ random samples
@pytest.mark.parametrize("granularity,relative,dists", [
    ("layer", True, ("sphere", "ball", "uniform_norm")), ("filter", True, ("sphere", "uniform_norm")),
    ("global", True, ("sphere",)), ("layer", False, ("sphere",))])
def test_random_perturbations_lie_in_the_ball(granularity, relative, dists):
    _, params, _ = _bn_params()
    xi = 0.3
    nb = Neighbourhood(xi=xi, granularity=granularity, relative=relative)
    sel = selected_paths(params)
    assert len(sel) == 12 and not any("norm" in p for p in sel)
    samples = jax.jit(lambda p, k: [sample(jax.random.fold_in(k, i), p, nb, d) for i, d in enumerate(dists)])(
        params, jax.random.PRNGKey(10))
    for dist, nu in zip(dists, samples):
        assert within_ball(nu, params, nb)
        ratios = relative_norms(nu, params, nb)
        assert set(ratios) == set(sel)
        flat = np.concatenate([np.ravel(r) for r in ratios.values()])
        if dist == "sphere":
            np.testing.assert_allclose(flat, 1.0, rtol=1e-5)
        else:
            assert flat.max() <= 1 + 1e-5 and flat.min() < 0.999  # inside, not all on the sphere
        for norm_name in ("norm1", "norm2", "norm3", "norm4"):  # BN untouched
            for leaf in jax.tree.leaves(nu[norm_name]):
                assert np.all(np.asarray(leaf) == 0)
    # the norms are the documented ones, computed here independently
    nu = samples[0]
    k, w = np.asarray(nu["conv3"]["kernel"]), np.asarray(params["conv3"]["kernel"])
    if granularity == "layer":
        expected = xi * np.linalg.norm(w) if relative else xi
        np.testing.assert_allclose(np.linalg.norm(k), expected, rtol=1e-5)
    elif granularity == "filter":  # HWIO: one ball per output filter (last axis)
        np.testing.assert_allclose(np.linalg.norm(k.reshape(-1, k.shape[-1]), axis=0),
                                   xi * np.linalg.norm(w.reshape(-1, w.shape[-1]), axis=0), rtol=1e-5)
        b, wb = np.asarray(nu["fc1"]["kernel"]), np.asarray(params["fc1"]["kernel"])  # dense kernel: one unit
        np.testing.assert_allclose(np.linalg.norm(b), xi * np.linalg.norm(wb), rtol=1e-5)
    else:
        tot = np.sqrt(sum(np.sum(np.asarray(_leaf(nu, p)) ** 2) for p in sel))
        ref = np.sqrt(sum(np.sum(np.asarray(_leaf(params, p)) ** 2) for p in sel))
        np.testing.assert_allclose(tot, xi * ref, rtol=1e-5)


def test_same_key_same_direction_and_radius_from_original_weights():
    _, params, _ = _bn_params()
    a = sample(jax.random.PRNGKey(7), params, Neighbourhood(xi=0.1), "sphere")
    b = sample(jax.random.PRNGKey(7), params, Neighbourhood(xi=0.4), "sphere")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(4 * np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)
    c = sample(jax.random.PRNGKey(8), params, Neighbourhood(xi=0.1), "sphere")
    assert not np.allclose(np.asarray(a["conv2"]["kernel"]), np.asarray(c["conv2"]["kernel"]))


def test_perturb_never_touches_unselected_leaves():
    _, params, _ = _bn_params()
    nb = Neighbourhood(xi=0.5)
    junk = jax.tree.map(lambda a: jnp.full_like(a, 3.0), params)  # non-zero everywhere, BN included
    out = perturb(params, junk, nb)
    for name in ("norm1", "norm2", "norm3", "norm4"):
        for k in ("scale", "bias"):
            assert out[name][k] is params[name][k]
    np.testing.assert_allclose(np.asarray(out["conv1"]["kernel"]), np.asarray(params["conv1"]["kernel"]) + 3.0)
    assert not within_ball(junk, params, nb)  # non-zero on BN leaves is not a valid perturbation


def test_projection_and_gradient_normalization():
    _, params, _ = _bn_params()
    for granularity in ("layer", "filter", "global"):
        nb = Neighbourhood(xi=0.2, granularity=granularity)
        rng = np.random.default_rng(0)
        big = jax.tree.map(lambda a: jnp.asarray(10.0 * rng.normal(size=a.shape).astype(np.float32)), params)
        p = project(big, params, nb)
        assert within_ball(p, params, nb)
        ratios = np.concatenate([np.ravel(r) for r in relative_norms(p, params, nb).values()])
        np.testing.assert_allclose(ratios, 1.0, rtol=1e-5)  # everything was outside: lands on the sphere
        np.testing.assert_allclose(np.asarray(project(p, params, nb)["conv2"]["kernel"]),
                                   np.asarray(p["conv2"]["kernel"]), rtol=1e-6)  # idempotent
        small = jax.tree.map(lambda a: 1e-4 * a, p)
        np.testing.assert_allclose(np.asarray(project(small, params, nb)["fc1"]["kernel"]),
                                   np.asarray(small["fc1"]["kernel"]))  # inside: unchanged
        g = normalize(big, params, nb)
        s = [None if r is None else r / nb.xi for r in radii(params, nb)]
        for n_l, s_l in zip(norms(g, params, nb), s):
            if s_l is not None:
                np.testing.assert_allclose(np.asarray(n_l), np.asarray(s_l), rtol=1e-5)
        zero = normalize(jax.tree.map(jnp.zeros_like, params), params, nb)
        assert all(np.all(np.asarray(z) == 0) for z in jax.tree.leaves(zero))


def test_box_for_clipped_models():
    _, params, _ = _bn_params()
    params = jax.tree.map(lambda a: jnp.clip(a, -0.3, 0.3), params)
    nb = Neighbourhood(xi=0.5, box=0.3)
    nu = sample(jax.random.PRNGKey(0), params, nb, "sphere")
    assert within_ball(nu, params, nb)
    w = perturb(params, nu, nb)
    assert max(float(jnp.abs(w[k]["kernel"]).max()) for k in ("conv1", "conv2", "fc1", "logits")) <= 0.3 + 1e-6


def test_config_errors():
    with pytest.raises(ValueError):
        Neighbourhood(xi=-0.1)
    with pytest.raises(ValueError):
        Neighbourhood(granularity="neuron")
    with pytest.raises(ValueError):
        sample(jax.random.PRNGKey(0), {"a": {"kernel": jnp.ones(3)}}, Neighbourhood(), "gaussian")
    with pytest.raises(ValueError):
        WeightAttackConfig(lr=0.0)
    with pytest.raises(ValueError):
        WeightAttackConfig(init="normal")
    with pytest.raises(ValueError):
        within_ball({"a": jnp.ones(3)}, {"a": {"kernel": jnp.ones(3)}}, Neighbourhood())  # wrong structure


# ------------------------------------------------------------------------------------------------ adversarial
def test_joint_attack_stays_in_both_balls_and_raises_the_loss():
    model, params, state = _bn_params()
    logits_fn = make_logits_fn(model)
    x, y = make_data(16)
    eps = 8 / 255
    nb = Neighbourhood(xi=0.05)
    config = WeightAttackConfig(neighbourhood=nb, lr=0.05, steps=2, restarts=2, best_iterate="best",
                                input_attack=PGDConfig(eps=eps, init="zero"), unroll=False)
    nu, x_adv = weight_attack(logits_fn, params, state, x, y, jax.random.PRNGKey(0), config)
    assert within_ball(nu, params, nb)
    assert np.abs(np.asarray(x_adv) - x).max() <= eps + 1e-6 and 0 <= float(x_adv.min()) <= float(x_adv.max()) <= 1
    for name in ("norm1", "norm2", "norm3", "norm4"):
        assert all(np.all(np.asarray(a) == 0) for a in jax.tree.leaves(nu[name]))
    clean = float(cross_entropy(logits_fn(params, state, x), y).mean())
    attacked = float(cross_entropy(logits_fn(perturb(params, nu, nb), state, x_adv), y).mean())
    assert attacked > clean


def test_joint_attack_with_xi_zero_is_pgd():
    model, params, state = _bn_params(1)
    logits_fn = make_logits_fn(model)
    x, y = make_data(16, seed=3)
    inner = PGDConfig(steps=3, init="zero", best_iterate="last")
    config = WeightAttackConfig(neighbourhood=Neighbourhood(xi=0.0), lr=0.01, steps=3, init="zero",
                                input_attack=inner)
    nu, x_joint = weight_attack(logits_fn, params, state, x, y, jax.random.PRNGKey(0), config)
    assert all(np.all(np.asarray(a) == 0) for a in jax.tree.leaves(nu))
    x_pgd = pgd(lambda v: logits_fn(params, state, v), x, y, jax.random.PRNGKey(5), inner)
    np.testing.assert_allclose(np.asarray(x_joint), np.asarray(x_pgd), atol=1e-6)
    l_joint = cross_entropy(logits_fn(params, state, x_joint), y)
    l_pgd = cross_entropy(logits_fn(params, state, x_pgd), y)
    np.testing.assert_allclose(np.asarray(l_joint), np.asarray(l_pgd), rtol=1e-5, atol=1e-6)
    assert float(l_pgd.mean()) > float(cross_entropy(logits_fn(params, state, x), y).mean())
