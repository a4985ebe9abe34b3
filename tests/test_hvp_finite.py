"""Derivatives through the max-pool stay finite when XLA rounds one expression differently in two kernels.

XLA may compute an elementwise expression (a conv output through batch norm and ReLU) once in the kernel that takes
a window's maximum and again in a kernel that looks for that maximum, and XLA:CPU does not always round the two
alike: at ``--xla_backend_optimization_level=0`` (the level this test session compiles at, tests/conftest.py) LLVM
fuses ``y * scale + bias`` into one FMA in some kernels and not in others. A derivative that finds the maximum by
comparing the recomputed values with the max (``x == max(x)``, as ``lax.reduce_max``'s JVP does before dividing by
the number of matches) then finds none: the max-pool's forward-over-reverse derivative was 0/0, and every
Hessian-vector product of the quickstart notebook's model (a small CNN with re-parameterized BN) was NaN. At XLA's
default level every kernel fuses alike and these tests pass either way; they can fail only where the kernels differ.
"""
import jax
import jax.numpy as jnp
import numpy as np

from robust_flat import hessian as H
from robust_flat.models import create_model, init_model, make_logits_fn
from robust_flat.models.layers import max_pool_2x2

SHAPE = (8, 8, 3)


def test_hvp_through_the_pool_of_an_affine_map_equals_its_closed_form():
    # loss(s) = sum sin(maxpool(x * s + c)), s one scale per channel (what BN does): with no ties each window
    # contributes sin(x_k s + c) of its maximum x_k s + c, so the Hessian is diagonal, H_cc = -sum sin(m) x_k^2 over
    # channel c's windows. The kernel taking the max and the ones differentiating it each compute x * s + c.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 16, 16, 8)).astype(np.float32)
    s = rng.uniform(0.5, 2.0, 8).astype(np.float32)
    c = rng.normal(size=8).astype(np.float32)
    loss = lambda s_: jnp.sum(jnp.sin(max_pool_2x2(jnp.asarray(x) * s_ + jnp.asarray(c))))
    hvp = jax.jit(lambda s_, v: jax.jvp(jax.grad(loss), (s_,), (v,))[1])
    got = np.asarray(hvp(jnp.asarray(s), jnp.ones(8, jnp.float32)), np.float64)
    z = (x.astype(np.float64) * s + c).reshape(4, 8, 2, 8, 2, 8).transpose(0, 1, 3, 5, 2, 4).reshape(4, 8, 8, 8, 4)
    xw = x.astype(np.float64).reshape(4, 8, 2, 8, 2, 8).transpose(0, 1, 3, 5, 2, 4).reshape(4, 8, 8, 8, 4)
    k = np.argmax(z, axis=-1)[..., None]
    m, xk = np.take_along_axis(z, k, -1)[..., 0], np.take_along_axis(xw, k, -1)[..., 0]
    expected = np.sum(-np.sin(m) * xk ** 2, axis=(0, 1, 2))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3)


def _bn_cnn():
    """A small CNN with re-parameterized BN whose scales, biases and running statistics are not the init's (1, 0, 0,
    1 make the BN affine map exact in float32, so no rounding can differ), and a batch of images."""
    model = create_model("small_cnn", channels=(4, 8), hidden=16, norm="rebn")
    params, state = jax.jit(lambda k: init_model(model, k, (1,) + SHAPE))(jax.random.key(0, impl="rbg"))
    rng = np.random.default_rng(1)

    def perturb(path, leaf):
        name = jax.tree_util.keystr(path)
        if "var" in name:
            return jnp.asarray(rng.uniform(0.3, 3.0, leaf.shape), leaf.dtype)
        if "norm" in name or "mean" in name or "bias" in name:
            return jnp.asarray(rng.normal(0.0, 0.3, leaf.shape), leaf.dtype)
        return leaf

    params = jax.tree_util.tree_map_with_path(perturb, params)
    state = jax.tree_util.tree_map_with_path(perturb, state)
    x = rng.uniform(size=(16,) + SHAPE).astype(np.float32)
    y = rng.integers(0, 10, 16).astype(np.int32)
    return make_logits_fn(model), params, state, x, y


def test_hessian_vector_products_of_a_bn_cnn_are_finite_and_symmetric():
    logits_fn, params, state, x, y = _bn_cnn()
    op = H.HessianOperator(logits_fn, params, state, x, y, H.HessianConfig(batch_size=16))
    u, v = (jax.random.normal(jax.random.key(i), (op.dim,)) for i in (1, 2))
    hu, hv = np.asarray(op(u), np.float64), np.asarray(op(v), np.float64)
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    assert np.isfinite(hu).all() and np.isfinite(hv).all(), f"{np.sum(~np.isfinite(hv))} of {op.dim} not finite"
    assert np.linalg.norm(hv) > 0
    # the defining symmetry of a Hessian: u.Hv = v.Hu (float32 HVPs)
    np.testing.assert_allclose(u @ hv, v @ hu, rtol=1e-3, atol=1e-5 * np.linalg.norm(hu) * np.linalg.norm(u))
