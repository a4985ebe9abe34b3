"""WideResNet-depth-k (Zagoruyko & Komodakis), as used by RobustBench: WRN-28-10 and WRN-34-10.

``whiten_mean``/``whiten_std``: whitening constants (default CIFAR-10's); ``whiten=False``: none (RobustBench's
WideResNet takes [0, 1] inputs as they are; see :mod:`robust_flat.torch_import`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax.numpy as jnp
import flax.linen as nn

from robust_flat.models.layers import (compute_dtype, conv_init, get_activation, make_norm, make_whiten,
                                      model_output)
from robust_flat.models.preact_resnet import PreActBlock  # the same pre-activation basic block


class WideResNet(nn.Module):
    num_classes: int = 10
    depth: int = 28
    widen_factor: int = 10
    activation: str = "relu"
    norm: str = "rebn"
    dropout: float = 0.0
    dtype: str = "float32"  # compute dtype: float32 (paper) | bfloat16 (params stay float32)
    whiten: bool = True
    whiten_mean: Optional[Sequence[float]] = None  # None: CIFAR-10's
    whiten_std: Optional[Sequence[float]] = None
    rotation_head: int = 0  # hidden width of the auxiliary rotation head (0: none; self-supervised AT: 256)

    @nn.compact
    def __call__(self, x, train: bool = False, output: str = "logits"):
        dt = compute_dtype(self.dtype)
        if (self.depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {self.depth}")
        n = (self.depth - 4) // 6
        widths = [16 * self.widen_factor, 32 * self.widen_factor, 64 * self.widen_factor]
        if self.whiten:
            x = make_whiten(self.whiten_mean, self.whiten_std, self.dtype)(x)
        x = nn.Conv(16, (3, 3), padding=1, use_bias=False, kernel_init=conv_init, dtype=dt, name="conv1")(x)
        for i, width in enumerate(widths):
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                x = PreActBlock(width, stride, self.activation, self.norm, self.dropout, self.dtype,
                                name=f"stage{i + 1}_block{j}")(x, train)
        x = get_activation(self.activation)(make_norm(self.norm, "norm_final", self.dtype)(x, train))
        return model_output(self, jnp.mean(x, axis=(1, 2)), train, output)
