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

import flax.linen as nn

from robust_flat.models.layers import Classifier, compute_dtype, dense_init, layer_partials, max_pool_2x2, model_output


class SmallCNN(Classifier):
    norm: str = "none"
    channels: Sequence[int] = (32, 64)
    hidden: int = 128
    width: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False, output: str = "logits"):
        conv, norm, act = layer_partials(self)
        x = self.whitened(x)
        k = 0
        for stage, c in enumerate(self.channels):
            for _ in range(2):
                k += 1
                x = act(norm(f"norm{k}")(conv(c * self.width, (3, 3), padding=1, use_bias=True, name=f"conv{k}")(x),
                                         train))
            x = max_pool_2x2(x)
        x = x.reshape(x.shape[0], -1)
        x = nn.Dense(self.hidden * self.width, kernel_init=dense_init, dtype=compute_dtype(self.dtype), name="fc1")(x)
        x = act(norm("norm_fc1")(x, train))
        if self.dropout > 0:
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return model_output(self, x, train, output)
