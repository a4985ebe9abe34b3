"""A small CNN that adversarially trains in minutes on a CPU: conv 32-32-pool-64-64-pool, dense 4096-128-10.

Without normalization it is the network of the PyTorch benchmark rows (591,274 parameters for 32x32x3 inputs).
Max-pool is a reshape + max (fast backward on XLA:CPU). Normalization is off by default; ``norm="rebn"`` (the
presets') adds a re-parameterized BN after every conv **and after the hidden dense layer**.

Why the hidden layer is normalized too: ``fc1`` sees 4,096 unnormalized, all-positive features (ReLU after BN,
then max-pooled). With the paper's recipe (SGD lr 0.05, Nesterov momentum 0.9) its first updates are so large
that the batch loss jumps (4.6 -> 6.8 -> 13.2 -> 14.0 on CIFAR-10) and almost every hidden ReLU dies: after 160
PGD-AT steps 1 of the 128 hidden units was still active on any of 512 training images, and the network sat at
ln 10 for good. With the hidden layer normalized all 128 stay active and the robust loss falls from the first
steps (tests/test_training.py checks that the preset learns). Without normalization (``norm="none"``), use a
smaller learning rate (0.01) on real data.
"""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import flax.linen as nn

from robust_flat.models.layers import (Whiten, compute_dtype, conv_init, dense_init, get_activation, make_norm,
                                      max_pool_2x2, model_output)


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
    rotation_head: int = 0  # hidden width of the auxiliary rotation head (0: none; self-supervised AT: 256)

    @nn.compact
    def __call__(self, x, train: bool = False, output: str = "logits"):
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
        x = nn.Dense(self.hidden * self.width, kernel_init=dense_init, dtype=dt, name="fc1")(x)
        x = act(make_norm(self.norm, "norm_fc1", self.dtype)(x, train))
        if self.dropout > 0:
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return model_output(self, x, train, output)
