"""PreActResNet-18 (He et al. 2016), the robustness benchmarks' standard small model (Rice et al., Wong et al.)."""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import flax.linen as nn

from robust_flat.models.layers import Whiten, compute_dtype, conv_init, dense_init, get_activation, make_norm


class PreActBlock(nn.Module):
    channels: int
    stride: int
    activation: str = "relu"
    norm: str = "rebn"
    dropout: float = 0.0
    dtype: str = "float32"  # compute dtype: float32 (paper) | bfloat16 (params stay float32)

    @nn.compact
    def __call__(self, x, train: bool):
        dt = compute_dtype(self.dtype)
        act = get_activation(self.activation)
        out = act(make_norm(self.norm, "norm1", self.dtype)(x, train))
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.channels:
            shortcut = nn.Conv(self.channels, (1, 1), (self.stride, self.stride), use_bias=False,
                               kernel_init=conv_init, dtype=dt, name="shortcut_conv")(out)
        out = nn.Conv(self.channels, (3, 3), (self.stride, self.stride), padding=1, use_bias=False,
                      kernel_init=conv_init, dtype=dt, name="conv1")(out)
        out = act(make_norm(self.norm, "norm2", self.dtype)(out, train))
        if self.dropout > 0:
            out = nn.Dropout(self.dropout, deterministic=not train)(out)
        out = nn.Conv(self.channels, (3, 3), padding=1, use_bias=False, kernel_init=conv_init, dtype=dt,
                      name="conv2")(out)
        return out + shortcut


class PreActResNet(nn.Module):
    num_classes: int = 10
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    width: int = 64
    activation: str = "relu"
    norm: str = "rebn"
    dropout: float = 0.0
    dtype: str = "float32"  # compute dtype: float32 (paper) | bfloat16 (params stay float32)
    whiten: bool = True

    @nn.compact
    def __call__(self, x, train: bool = False):
        dt = compute_dtype(self.dtype)
        if self.whiten:
            x = Whiten(dtype=self.dtype, name="whiten")(x)
        x = nn.Conv(self.width, (3, 3), padding=1, use_bias=False, kernel_init=conv_init, dtype=dt, name="conv1")(x)
        for i, blocks in enumerate(self.stage_sizes):
            for j in range(blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                x = PreActBlock(self.width * 2 ** i, stride, self.activation, self.norm, self.dropout, self.dtype,
                                name=f"stage{i + 1}_block{j}")(x, train)
        x = get_activation(self.activation)(make_norm(self.norm, "norm_final", self.dtype)(x, train))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, kernel_init=dense_init, dtype=dt, name="logits")(x).astype(jnp.float32)
