"""A PyTorch copy of robust-flat's SmallCNN with the Flax weights, for cross-checks against PyTorch attack code.

Layout: Flax convolution kernels are HWIO, PyTorch's OIHW; inputs are NHWC in JAX and NCHW in PyTorch. The Flax
model flattens the last feature map in (h, w, c) order, PyTorch in (c, h, w) order, so the first dense layer's rows
are permuted accordingly (the PyTorch model keeps a plain ``flatten``); the conversion is the library's
:func:`robust_flat.torch_import.to_torch_state_dict` (layout ``small_cnn``: this module's names). Only
``norm="none"``, ``activation="relu"``, no dropout (the SmallCNN defaults) are supported. :func:`max_logit_difference`
checks the copy. The input clamp has ``jnp.clip``'s gradient (half at the box boundary), so input gradients agree
too.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as tnn


class TorchSmallCNN(tnn.Module):
    """NCHW inputs in [0, 1]; clamps and whitens inside, like the Flax model."""

    def __init__(self, channels, hidden, num_classes, mean, std, spatial=32):
        super().__init__()
        layers, c_in = [], 3
        for c in channels:
            for _ in range(2):
                layers += [tnn.Conv2d(c_in, c, 3, padding=1, bias=True), tnn.ReLU()]
                c_in = c
            layers.append(tnn.MaxPool2d(2, 2))
        self.features = tnn.Sequential(*layers)
        side = spatial // 2 ** len(channels)
        self.fc1 = tnn.Linear(c_in * side * side, hidden)
        self.logits = tnn.Linear(hidden, num_classes)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x):
        # minimum(maximum(.)) rather than clamp: like jnp.clip it passes half the gradient at exactly 0 or 1
        # (torch.clamp passes all of it), and attacks put many pixels exactly on the box boundary
        zero, one = torch.zeros((), dtype=x.dtype), torch.ones((), dtype=x.dtype)
        x = (torch.minimum(torch.maximum(x, zero), one) - self.mean) / self.std
        x = self.features(x).flatten(1)
        return self.logits(torch.relu(self.fc1(x)))


def from_flax(model, params, spatial: int = 32) -> TorchSmallCNN:
    """Build the PyTorch copy of a Flax ``SmallCNN`` (``model``) with weights ``params`` (eval mode, float32)."""
    if model.norm != "none" or model.activation != "relu" or model.dropout > 0 or not model.whiten:
        raise ValueError("the PyTorch port supports only SmallCNN(norm='none', activation='relu', dropout=0, "
                         "whiten=True)")
    from robust_flat.models.layers import CIFAR10_MEAN, CIFAR10_STD
    from robust_flat.torch_import import to_torch_state_dict

    channels = [c * model.width for c in model.channels]
    hidden = model.hidden * model.width
    net = TorchSmallCNN(channels, hidden, model.num_classes, CIFAR10_MEAN, CIFAR10_STD, spatial)
    net.load_state_dict(to_torch_state_dict(model, params, {}, "small_cnn"))
    return net.eval()


def to_nchw(x_nhwc) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x_nhwc, np.float32).transpose(0, 3, 1, 2)))


def to_nhwc(x_nchw: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x_nchw.detach().cpu().numpy().transpose(0, 2, 3, 1))


def max_logit_difference(net: TorchSmallCNN, logits_fn, x_nhwc) -> float:
    """Largest absolute difference between the two models' logits on ``x`` (expect ~1e-5 or less)."""
    with torch.no_grad():
        t = net(to_nchw(x_nhwc)).numpy()
    return float(np.abs(t - np.asarray(logits_fn(x_nhwc))).max())
