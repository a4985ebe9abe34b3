import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from robust_flat import models as M


def _init_params(m):
    """``init_model`` as one jitted program with an "rbg" key: ~3x faster on CPU than eager threefry init, whose every
    op is a compile of its own."""
    return jax.jit(lambda k: M.init_model(m, k))(jax.random.key(0, impl="rbg"))


def _init(name, **kw):
    return _init_cached(name, tuple(sorted(kw.items())))


@functools.lru_cache(maxsize=None)
def _init_cached(name, kw):  # tests with the same model share one init (arrays are immutable)
    m = M.create_model(name, **dict(kw))
    p, s = _init_params(m)
    return m, p, s


def test_resnet18_parameter_count_and_shapes():
    m = M.create_model("resnet18")
    p, s = jax.eval_shape(lambda: M.init_model(m, jax.random.PRNGKey(0)))  # shapes only: no 11M random draws
    # torchvision-style CIFAR ResNet-18 has 11,173,962; the paper's adds a stem-conv bias (64) and shortcut-conv
    # biases (128 + 256 + 512).
    assert M.count_params(p) == 11_173_962 + 64 + 896
    assert p["conv1"]["kernel"].shape == (3, 3, 3, 64) and p["conv1"]["bias"].shape == (64,)
    assert p["stage4_block0"]["shortcut_conv"]["kernel"].shape == (1, 1, 256, 512)
    assert p["logits"]["kernel"].shape == (512, 10)
    # re-parameterized BN: gamma starts at 0, effective scale 1 + gamma (the values of a narrow ResNet-18: the same
    # initializers)
    assert np.all(np.asarray(_init("resnet18", width=8)[1]["norm1"]["scale"]) == 0)
    out = jax.eval_shape(M.make_logits_fn(m), p, s, jnp.zeros((3, 32, 32, 3)))  # traced through, not compiled
    assert out.shape == (3, 10)


@pytest.mark.parametrize("name,count", [("small_cnn", 591_274), ("preact_resnet18", None), ("wrn28_10", None)])
def test_models_build_and_output_shape(name, count):
    m = M.create_model(name, num_classes=7)
    shapes = jax.eval_shape(lambda: M.init_model(m, jax.random.PRNGKey(0)))
    params, state = shapes
    if count is not None:
        assert M.count_params(_init_params(M.create_model(name))[0]) == count
    out = jax.eval_shape(M.make_logits_fn(m), params, state, jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
    assert out.shape == (2, 7)


def test_wrn34_10_depth():
    m = M.create_model("wrn34_10")
    params, _ = jax.eval_shape(lambda: M.init_model(m, jax.random.PRNGKey(0)))
    assert len([k for k in params if k.startswith("stage")]) == 3 * 5
    with pytest.raises(ValueError):
        M.init_model(M.WideResNet(depth=27), jax.random.PRNGKey(0))


@pytest.mark.parametrize("activation", ["relu", "silu", "mish", "gelu", "gelu_erf"])
def test_activations_and_options(activation):
    m, p, s = _init("small_cnn", activation=activation, channels=(4, 8), hidden=8, norm="rebn", dropout=0.1)
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 32, 32, 3))
    out = M.make_logits_fn(m)(p, s, x)
    assert out.shape == (2, 10) and np.all(np.isfinite(out))


def test_inputs_are_clamped_and_whitened_inside():
    m, p, s = _init("small_cnn", channels=(4, 8), hidden=8)
    f = M.make_logits_fn(m)
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 32, 32, 3))
    # the clamp makes values outside [0, 1] equivalent to the box boundary
    np.testing.assert_allclose(f(p, s, x + 2.0), f(p, s, jnp.ones_like(x)), rtol=1e-6)


def test_train_mode_updates_batch_stats_and_eval_mode_does_not():
    m, p, s = _init("resnet18", width=8)
    x = jax.random.uniform(jax.random.PRNGKey(1), (4, 32, 32, 3))
    apply = M.make_apply_fn(m)
    _, s_eval = apply(p, s, x, train=False)
    _, s_train = apply(p, s, x, train=True)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), s_eval, s))
    assert not jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), s_train, s))


def test_normalization_off_has_no_batch_stats():
    m = M.create_model("resnet18", width=8, norm="none")
    p, s = jax.eval_shape(lambda k: M.init_model(m, k), jax.random.PRNGKey(0))  # the structure is what is checked
    assert s == {}
    assert not any("norm" in "/".join(map(str, k)) for k, _ in jax.tree_util.tree_flatten_with_path(p)[0])


def test_logits_fns_are_hashable_and_bind_is_traceable():
    m, p, s = _init("small_cnn", channels=(4, 8), hidden=8)
    assert hash(M.make_logits_fn(m)) == hash(M.make_logits_fn(M.create_model("small_cnn", channels=(4, 8), hidden=8)))
    f = M.bind(M.make_logits_fn(m), p, s)
    x = jnp.zeros((1, 32, 32, 3))
    np.testing.assert_allclose(jax.jit(lambda g, x: g(x))(f, x), f(x), rtol=1e-6)


def test_unknown_model_or_option_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model"):
        M.create_model("resnet1000")
    with pytest.raises(ValueError, match="does not take"):
        M.create_model("wrn28_10", channels=(1, 2))
    with pytest.raises(ValueError, match="unknown activation"):
        _init("small_cnn", activation="swishy")


@pytest.mark.parametrize("name,opts", [("small_cnn", dict(channels=(8, 16), hidden=32, norm="rebn")),
                                       ("resnet18", dict(width=8))])
def test_bfloat16_compute_keeps_float32_params_stats_and_logits(name, opts):
    x = jax.random.uniform(jax.random.PRNGKey(1), (4, 32, 32, 3))
    m32 = M.create_model(name, **opts)
    m16 = M.create_model(name, dtype="bfloat16", **opts)
    params, state = _init_params(m32)
    params16, state16 = _init_params(m16)
    # same parameter tree, all float32: checkpoints of either dtype are interchangeable
    assert jax.tree.structure(params) == jax.tree.structure(params16)
    assert {a.dtype for a in jax.tree.leaves((params16, state16))} == {jnp.dtype(jnp.float32)}
    apply16 = M.make_apply_fn(m16)
    logits16, new_state = apply16(params, state, x, train=True)
    assert logits16.dtype == jnp.float32
    assert {a.dtype for a in jax.tree.leaves(new_state)} <= {jnp.dtype(jnp.float32)}
    # the convolutions really run in bfloat16
    jaxpr = str(jax.make_jaxpr(M.make_logits_fn(m16))(params, state, x))
    assert "conv_general_dilated" in jaxpr and "bf16[4,32,32,8]" in jaxpr
    logits32 = M.make_logits_fn(m32)(params, state, x)
    logits16 = M.make_logits_fn(m16)(params, state, x)
    scale = float(jnp.max(jnp.abs(logits32)))
    err = float(jnp.max(jnp.abs(logits32 - logits16)))
    assert 0 < err < 0.1 * scale


def test_unknown_compute_dtype_is_a_clear_error():
    model = M.create_model("small_cnn", dtype="float8")
    with pytest.raises(ValueError, match="compute dtype"):
        M.init_model(model, jax.random.PRNGKey(0))


def _pool_reference(x):
    """2x2 max-pool and its gradient routed to the first maximum of each window (row-major), in numpy loops."""
    n, h, w, c = x.shape
    out, route = np.zeros((n, h // 2, w // 2, c)), np.zeros((n, h // 2, w // 2, c, 2), int)
    for b, i, j, k in np.ndindex(n, h // 2, w // 2, c):
        win = [(x[b, 2 * i + di, 2 * j + dj, k], di, dj) for di in (0, 1) for dj in (0, 1)]
        best = max(v for v, _, _ in win)
        _, di, dj = next(t for t in win if t[0] == best)  # first maximum
        out[b, i, j, k], route[b, i, j, k] = best, (2 * i + di, 2 * j + dj)
    return out, route


def test_max_pool_values_and_first_maximum_gradient_with_ties():
    from robust_flat.models.layers import max_pool_2x2
    rng = np.random.default_rng(0)
    x = np.round(rng.normal(size=(2, 6, 8, 3))).astype(np.float32)  # integers: many tied windows
    g = rng.normal(size=(2, 3, 4, 3)).astype(np.float32)
    out, route = _pool_reference(x)
    assert (np.sum(x.reshape(2, 3, 2, 4, 2, 3) == out[:, :, None, :, None].astype(np.float32), axis=(2, 4)) > 1).any()
    np.testing.assert_array_equal(max_pool_2x2(jnp.asarray(x)), out)
    grad = np.asarray(jax.vjp(max_pool_2x2, jnp.asarray(x))[1](jnp.asarray(g))[0])
    expected = np.zeros_like(x)
    for b, i, j, k in np.ndindex(*g.shape):
        r, s = route[b, i, j, k]
        expected[b, r, s, k] += g[b, i, j, k]
    np.testing.assert_array_equal(grad, expected)  # every window's gradient once, at its first maximum
    with pytest.raises(ValueError, match="even spatial"):
        max_pool_2x2(jnp.zeros((1, 5, 4, 1)))


def test_max_pool_forward_mode_and_hvp_match_plain_autodiff_without_ties():
    from robust_flat.models.layers import max_pool_2x2
    plain = lambda x: x.reshape(x.shape[0], x.shape[1] // 2, 2, x.shape[2] // 2, 2, x.shape[3]).max(axis=(2, 4))
    x = jax.random.normal(jax.random.key(0), (2, 4, 6, 3))
    v = jax.random.normal(jax.random.key(1), x.shape)
    np.testing.assert_array_equal(jax.jvp(max_pool_2x2, (x,), (v,))[1], jax.jvp(plain, (x,), (v,))[1])
    loss = lambda pool: (lambda z: jnp.sum(jnp.sin(pool(z)) ** 2))
    hvp = lambda pool: jax.jvp(jax.grad(loss(pool)), (x,), (v,))[1]
    np.testing.assert_allclose(hvp(max_pool_2x2), hvp(plain), rtol=1e-6, atol=1e-6)
