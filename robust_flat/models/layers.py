"""Building blocks shared by the models: input whitening, re-parameterized BN, activations, pooling.

Every normalization module carries ``norm`` in its name, so the default layer filter of
:mod:`robust_flat.weights` (which excludes BN parameters from the weight neighbourhood, as the paper does)
works on all models of this package by name alone.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from robust_flat.data import PIXEL_STATS

# Per-channel mean/std of the CIFAR-10 training pixels (the paper's frozen whitening, as in the released code): the
# models' default constants.
CIFAR10_MEAN, CIFAR10_STD = PIXEL_STATS["cifar10"]
WHITENINGS = (*PIXEL_STATS, "none")  # the values of the model.whitening config option (whitening_options)


# Compute dtypes of the ``dtype`` model option. Parameters, optimizer state and batch statistics stay float32 in
# every case, and logits are returned as float32; "bfloat16" (an option for GPU/TPU runs, off by default because
# the paper's numbers are float32) runs convolutions, matmuls and activations in bfloat16.
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def compute_dtype(name: str):
    try:
        return COMPUTE_DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown compute dtype {name!r}; choose one of {', '.join(COMPUTE_DTYPES)}") from None


class Whiten(nn.Module):
    """Clamp the input to [0, 1], then subtract a fixed per-channel mean and divide by a fixed std.

    The constants are module attributes, not parameters: they are never trained, perturbed or decayed.
    """

    mean: Sequence[float] = CIFAR10_MEAN
    std: Sequence[float] = CIFAR10_STD
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x):
        x = jnp.clip(x, 0.0, 1.0)
        mean = jnp.asarray(self.mean, x.dtype)
        std = jnp.asarray(self.std, x.dtype)
        return ((x - mean) / std).astype(compute_dtype(self.dtype))


def make_whiten(mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                dtype: str = "float32") -> Whiten:
    """The models' ``whiten`` layer with per-channel constants (``None``: the CIFAR-10 ones, the default)."""
    return Whiten(mean=CIFAR10_MEAN if mean is None else tuple(mean), std=CIFAR10_STD if std is None else tuple(std),
                  dtype=dtype, name="whiten")


def whitening_options(whitening: str) -> dict:
    """The model options of a ``model.whitening`` name (:data:`WHITENINGS`): none for ``"cifar10"`` (the models'
    default constants), ``whiten_mean``/``whiten_std`` for another dataset's (``robust_flat.data.PIXEL_STATS``),
    ``whiten=False`` for ``"none"`` (the input goes to the first layer as it is, not clamped either)."""
    if whitening not in WHITENINGS:
        raise ValueError(f"unknown whitening {whitening!r}; choose one of {', '.join(WHITENINGS)}")
    if whitening == "none":
        return {"whiten": False}
    if whitening == "cifar10":
        return {}
    mean, std = PIXEL_STATS[whitening]
    return {"whiten_mean": mean, "whiten_std": std}


class ReBatchNorm(nn.Module):
    """Batch normalization with the paper's re-parameterized scale ``1 + gamma`` (gamma initialized to 0).

    As the released code's ``ReparameterizedBatchNorm2d``: weight decay therefore pulls the effective scale
    towards 1, not 0. PyTorch momentum 0.1 corresponds to ``momentum=0.9`` here; eps 1e-5 as in PyTorch.
    """

    momentum: float = 0.9
    epsilon: float = 1e-5
    reparameterized: bool = True
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x, train: bool):
        # Statistics are reduced in float32 whatever the compute dtype (flax's force_float32_reductions).
        y = nn.BatchNorm(use_running_average=not train, momentum=self.momentum, epsilon=self.epsilon,
                         use_scale=False, use_bias=False, dtype=compute_dtype(self.dtype), name="stats")(x)
        features = x.shape[-1]
        if self.reparameterized:
            gamma = self.param("scale", nn.initializers.zeros, (features,))
            scale = 1.0 + gamma
        else:
            scale = self.param("scale", nn.initializers.ones, (features,))
        beta = self.param("bias", nn.initializers.zeros, (features,))
        return y * scale.astype(y.dtype) + beta.astype(y.dtype)


class Identity(nn.Module):
    """Stand-in for a normalization layer when normalization is switched off."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        return x


def make_norm(kind: Optional[str], name: str, dtype: str = "float32") -> nn.Module:
    """A normalization layer by name: ``rebn`` (paper), ``bn`` (plain BN, scale init 1) or ``none``."""
    if kind in (None, "none"):
        return Identity(name=name)
    if kind == "rebn":
        return ReBatchNorm(reparameterized=True, dtype=dtype, name=name)
    if kind == "bn":
        return ReBatchNorm(reparameterized=False, dtype=dtype, name=name)
    raise ValueError(f"unknown normalization {kind!r}; choose one of rebn, bn, none")


def mish(x):
    return x * jnp.tanh(jax.nn.softplus(x))


def gelu_sigmoid(x):
    """GELU as the paper writes it, x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[Any], Any]] = {
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "mish": mish,
    # Paper: x * sigmoid(1.702 x). The released code uses the exact erf GELU: activation "gelu_erf"
    # (docs/paper-vs-code.md#gelu).
    "gelu": gelu_sigmoid,
    "gelu_erf": lambda x: jax.nn.gelu(x, approximate=False),
}


def get_activation(name: str) -> Callable[[Any], Any]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}") from None


def max_pool_2x2(x):
    """2x2/stride-2 max-pool as reshape + max, with a gradient that goes to the first maximum of each window.

    XLA:CPU's reduce_window backward costs 40-80 ms per pooling layer; reshape + max costs 5-15 ms and gives the
    same values (measured). Autodiff of that max still spends a reduction per window on the
    tie count (JAX splits the gradient evenly among tied maxima); the custom JVP below routes each window's tangent
    to its first maximum in row-major order instead, as PyTorch's ``max_pool2d`` and cuDNN do, using elementwise
    ops only (2.5x faster backward on XLA:CPU). Ties are common in real images (flat regions give equal conv outputs
    in neighbouring pixels), so the routing is exact rather than "every tied input gets the full gradient".
    Being a custom JVP, it works in forward mode, reverse mode and forward-over-reverse (HVPs). Requires even
    spatial sizes.
    """
    n, h, w, c = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"max_pool_2x2 needs even spatial sizes, got {h}x{w}")
    return _max_pool_2x2(x)


def _windows(x):
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c)


@jax.custom_jvp
def _max_pool_2x2(x):
    return _windows(x).max(axis=(2, 4))


def _first_max_mask(x6):
    """Boolean (n, h/2, 2, w/2, 2, c): True at the first maximum of every 2x2 window (row-major), else False.

    The window's four elements are compared with each other, never with a maximum computed elsewhere: XLA may
    compute ``x6`` in two kernels that round it differently (XLA:CPU at ``--xla_backend_optimization_level=0`` fuses
    a multiply-add into an FMA in some kernels only), and ``x6 == max`` then matched no element of a window. So
    every window has exactly one True, whatever the rounding (with a NaN in the window: one of its elements).
    """
    a, b, c, d = x6[:, :, 0, :, 0], x6[:, :, 0, :, 1], x6[:, :, 1, :, 0], x6[:, :, 1, :, 1]
    first = (a >= b) & (a >= c) & (a >= d)
    second = ~first & (b >= c) & (b >= d)
    third = ~(first | second) & (c >= d)
    fourth = ~(first | second | third)
    return jnp.stack([jnp.stack([first, second], axis=3), jnp.stack([third, fourth], axis=3)], axis=2)


@_max_pool_2x2.defjvp
def _max_pool_2x2_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    mask = _first_max_mask(_windows(x))
    # The primal output through this custom JVP again: the derivative of this rule (forward-over-reverse, HVPs) is
    # then this rule, not lax.reduce_max's JVP, which finds the maximum by x6 == max and divides by the number found
    # (0/0 when the two were rounded differently, see _first_max_mask).
    return _max_pool_2x2(x), jnp.sum(jnp.where(mask, _windows(t), jnp.zeros((), t.dtype)), axis=(2, 4))


# Kaiming normal with gain sqrt(2): fan_out for convs, fan_in for the classifier (as the released code).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
dense_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


# What a model's ``__call__`` returns (its ``output`` argument): the classifier's logits (default; what every attack,
# flatness measure and evaluation sees), the pooled features the classifier layer reads, or the logits of the
# auxiliary rotation head (self-supervised training, robust_flat/training/ssl_rotation.py).
OUTPUTS = ("logits", "features", "rotation")
ROTATIONS = 4  # classes of the rotation head: 0, 90, 180, 270 degrees
AUX_HEAD_NAME = "aux_rotation_head"  # "aux": outside the weight neighbourhood (robust_flat.weights DEFAULT_EXCLUDE)


class RotationHead(nn.Module):
    """The auxiliary rotation classifier of self-supervised AT on a model's pooled features: dense ``hidden`` ->
    norm -> activation -> dense 4 (the released code's MLP 512 -> 256 -> 4 with ReLU and BN on ResNet-18)."""

    hidden: int = 256
    activation: str = "relu"
    norm: str = "rebn"
    dtype: str = "float32"

    @nn.compact
    def __call__(self, features, train: bool):
        dt = compute_dtype(self.dtype)
        h = nn.Dense(self.hidden, kernel_init=dense_init, dtype=dt, name="dense1")(features)
        h = get_activation(self.activation)(make_norm(self.norm, "norm1", self.dtype)(h, train))
        return nn.Dense(ROTATIONS, kernel_init=dense_init, dtype=dt, name="dense2")(h).astype(jnp.float32)


def layer_partials(module: nn.Module):
    """``(conv, norm, act)``: the layers a model or a block is built from, configured by its ``dtype``, ``norm`` and
    ``activation`` fields once (as the flax examples' ``conv = partial(nn.Conv, use_bias=False, dtype=...)``).

    ``conv(features, kernel_size, strides, padding=..., name=...)`` is an ``nn.Conv`` without bias (pass
    ``use_bias=True`` for one) with the Kaiming fan-out init and the compute dtype; ``norm(name)`` the normalization
    layer of ``module.norm`` (called as ``norm(name)(x, train)``); ``act`` the activation function.
    """
    conv = partial(nn.Conv, use_bias=False, kernel_init=conv_init, dtype=compute_dtype(module.dtype))
    norm = partial(make_norm, module.norm, dtype=module.dtype)
    return conv, norm, get_activation(module.activation)


class Block(nn.Module):
    """The fields of the residual blocks (constructed positionally by their models, in this order); a block adds
    its own after them."""

    channels: int
    stride: int
    activation: str = "relu"
    norm: str = "rebn"
    dropout: float = 0.0
    dtype: str = "float32"  # compute dtype: float32 (paper) | bfloat16 (params stay float32)


class Classifier(nn.Module):
    """The fields every model of this package has, and its input end (:meth:`whitened`); the output end is
    :func:`model_output`. The models add their own architecture fields after these (construct them by keyword).

    ``whiten`` (default True): clamp the input to [0, 1] and whiten it with ``whiten_mean``/``whiten_std`` (``None``,
    the default: CIFAR-10's constants, the paper's; a run's config picks a dataset's with ``model.whitening``:
    :func:`whitening_options`); ``whiten=False`` feeds the input to the first layer unchanged.
    ``rotation_head``: hidden width of the auxiliary rotation head (0, the default: none; self-supervised AT: 256).
    """

    num_classes: int = 10
    activation: str = "relu"
    norm: str = "rebn"
    dropout: float = 0.0
    dtype: str = "float32"  # compute dtype: float32 (paper) | bfloat16 (params stay float32)
    whiten: bool = True
    whiten_mean: Optional[Sequence[float]] = None  # None: CIFAR-10's
    whiten_std: Optional[Sequence[float]] = None
    rotation_head: int = 0

    def whitened(self, x):
        """The input clamped and whitened by the model's ``whiten`` layer, or ``x`` itself with ``whiten=False``."""
        return make_whiten(self.whiten_mean, self.whiten_std, self.dtype)(x) if self.whiten else x


def model_output(model: nn.Module, features, train: bool, output: str):
    """The end every model shares, from its pooled ``features``: ``output="logits"`` the linear ``logits`` layer,
    ``"features"`` the features themselves, ``"rotation"`` the rotation head's logits. Call it inside the model's
    compact ``__call__``; the model's ``rotation_head`` attribute is the head's hidden width (0, the default: no
    head, and no head parameters). A model with a head creates its parameters at initialization (under
    ``aux_rotation_head``, next to the classifier's, never read by ``output="logits"``)."""
    if output not in OUTPUTS:
        raise ValueError(f"unknown model output {output!r}; choose one of {', '.join(OUTPUTS)}")
    if output == "features":
        return features
    head = (RotationHead(model.rotation_head, model.activation, model.norm, model.dtype, name=AUX_HEAD_NAME)
            if model.rotation_head else None)
    if output == "rotation":
        if head is None:
            raise ValueError("this model has no rotation head (create it with rotation_head=HIDDEN_WIDTH)")
        return head(features, train)
    logits = nn.Dense(model.num_classes, kernel_init=dense_init, dtype=compute_dtype(model.dtype),
                      name="logits")(features).astype(jnp.float32)
    if head is not None and model.is_initializing():
        head(features, train)
    return logits
