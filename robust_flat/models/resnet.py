"""ResNet-18 for CIFAR as in the paper (and the released code's ``ResNet``).

3x3 stem conv (stride 1, with bias) -> norm -> act; four stages of BasicBlocks [2,2,2,2] with 64/128/256/512
channels and strides 1/2/2/2; 1x1 shortcut conv (with bias) + norm when the shape changes; global average pool;
linear ``logits``. No max-pool. Input clamp + whitening inside the model, re-parameterized BN (scale 1 + gamma).

Options for published PyTorch ResNet-18s (:mod:`robust_flat.torch_import`): ``conv_bias=False`` drops the bias of
the stem and shortcut convolutions (the torchvision / RobustBench ``ResNet18``; Stutz et al.'s has them, the
default); ``whiten_mean``/``whiten_std`` replace the CIFAR-10 whitening constants (tuples of 3 floats), and
``whiten=False`` feeds the [0, 1] input to the first conv unchanged (no clamp either).
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax.numpy as jnp
import flax.linen as nn

from robust_flat.models.layers import (compute_dtype, conv_init, get_activation, make_norm, make_whiten,
                                      model_output)


class BasicBlock(nn.Module):
    channels: int
    stride: int
    activation: str = "relu"
    norm: str = "rebn"
    dropout: float = 0.0
    dtype: str = "float32"  # compute dtype: float32 (paper) | bfloat16 (params stay float32)
    conv_bias: bool = True  # bias in the 1x1 shortcut conv (Stutz et al.: yes; torchvision / RobustBench: no)

    @nn.compact
    def __call__(self, x, train: bool):
        dt = compute_dtype(self.dtype)
        act = get_activation(self.activation)
        out = nn.Conv(self.channels, (3, 3), (self.stride, self.stride), padding=1, use_bias=False,
                      kernel_init=conv_init, dtype=dt, name="conv1")(x)
        out = act(make_norm(self.norm, "norm1", self.dtype)(out, train))
        out = nn.Conv(self.channels, (3, 3), padding=1, use_bias=False, kernel_init=conv_init, dtype=dt,
                      name="conv2")(out)
        if self.dropout > 0:
            # Paper/code: Dropout(p=0.1) before the second norm of each block.
            out = nn.Dropout(self.dropout, deterministic=not train)(out)
        out = make_norm(self.norm, "norm2", self.dtype)(out, train)
        if self.stride != 1 or x.shape[-1] != self.channels:
            x = nn.Conv(self.channels, (1, 1), (self.stride, self.stride), use_bias=self.conv_bias,
                        kernel_init=conv_init, dtype=dt, name="shortcut_conv")(x)
            x = make_norm(self.norm, "shortcut_norm", self.dtype)(x, train)
        return act(out + x)


class ResNet(nn.Module):
    num_classes: int = 10
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    width: int = 64
    activation: str = "relu"
    norm: str = "rebn"
    dropout: float = 0.0
    dtype: str = "float32"  # compute dtype: float32 (paper) | bfloat16 (params stay float32)
    whiten: bool = True
    whiten_mean: Optional[Sequence[float]] = None  # None: CIFAR-10's
    whiten_std: Optional[Sequence[float]] = None
    conv_bias: bool = True  # bias in the stem and shortcut convs (Stutz et al.: yes; torchvision / RobustBench: no)
    rotation_head: int = 0  # hidden width of the auxiliary rotation head (0: none; self-supervised AT: 256)

    @nn.compact
    def __call__(self, x, train: bool = False, output: str = "logits"):
        dt = compute_dtype(self.dtype)
        act = get_activation(self.activation)
        if self.whiten:
            x = make_whiten(self.whiten_mean, self.whiten_std, self.dtype)(x)
        x = nn.Conv(self.width, (3, 3), padding=1, use_bias=self.conv_bias, kernel_init=conv_init, dtype=dt,
                    name="conv1")(x)
        x = act(make_norm(self.norm, "norm1", self.dtype)(x, train))
        for i, blocks in enumerate(self.stage_sizes):
            for j in range(blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                x = BasicBlock(self.width * 2 ** i, stride, self.activation, self.norm, self.dropout, self.dtype,
                               self.conv_bias, name=f"stage{i + 1}_block{j}")(x, train)
        return model_output(self, jnp.mean(x, axis=(1, 2)), train, output)
