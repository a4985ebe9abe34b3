"""A small CNN that adversarially trains in minutes on a CPU: conv 32-32-pool-64-64-pool, dense 4096-128-10.

The same network as the PyTorch rows of the CPU performance notes (591,274 parameters for 32x32x3 inputs).
Max-pool is a reshape + max (fast backward on XLA:CPU). Normalization is off by default; ``norm="rebn"``
adds a re-parameterized BN after every conv.
"""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import flax.linen as nn

from robust_flat.models.layers import (Whiten, compute_dtype, conv_init, dense_init, get_activation, make_norm,
                                      max_pool_2x2)


class SmallCNN(nn.Module):
    num_classes: int = 10
    channels: Sequence[int] = (32, 64)
    hidden: int = 128
    width: int = 1
    activation: str = "relu"
    norm: str = "none"
    dropout: float = 0.0
    dtype: str = "float32"  # compute dtype: float32 (paper) | bfloat16 (params stay float32)
    whiten: bool = True

    @nn.compact
    def __call__(self, x, train: bool = False):
        dt = compute_dtype(self.dtype)
        act = get_activation(self.activation)
        if self.whiten:
            x = Whiten(dtype=self.dtype, name="whiten")(x)
        k = 0
        for stage, c in enumerate(self.channels):
            for _ in range(2):
                k += 1
                x = nn.Conv(c * self.width, (3, 3), padding=1, use_bias=True, kernel_init=conv_init,
                            dtype=dt, name=f"conv{k}")(x)
                x = act(make_norm(self.norm, f"norm{k}", self.dtype)(x, train))
            x = max_pool_2x2(x)
        x = x.reshape(x.shape[0], -1)
        x = act(nn.Dense(self.hidden * self.width, kernel_init=dense_init, dtype=dt, name="fc1")(x))
        if self.dropout > 0:
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes, kernel_init=dense_init, dtype=dt, name="logits")(x).astype(jnp.float32)
