"""WideResNet-depth-k (Zagoruyko & Komodakis), as used by RobustBench: WRN-28-10 and WRN-34-10.

``whiten_mean``/``whiten_std``: whitening constants (default CIFAR-10's); ``whiten=False``: none (RobustBench's
WideResNet takes [0, 1] inputs as they are; see :mod:`robust_flat.torch_import`).
"""
from __future__ import annotations

import jax.numpy as jnp
import flax.linen as nn

from robust_flat.models.layers import Classifier, layer_partials, model_output
from robust_flat.models.preact_resnet import PreActBlock  # the same pre-activation basic block


class WideResNet(Classifier):
    depth: int = 28
    widen_factor: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False, output: str = "logits"):
        conv, norm, act = layer_partials(self)
        if (self.depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {self.depth}")
        n = (self.depth - 4) // 6
        widths = [16 * self.widen_factor, 32 * self.widen_factor, 64 * self.widen_factor]
        x = conv(16, (3, 3), padding=1, name="conv1")(self.whitened(x))
        for i, width in enumerate(widths):
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                x = PreActBlock(width, stride, self.activation, self.norm, self.dropout, self.dtype,
                                name=f"stage{i + 1}_block{j}")(x, train)
        x = act(norm("norm_final")(x, train))
        return model_output(self, jnp.mean(x, axis=(1, 2)), train, output)
