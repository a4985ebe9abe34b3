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

from typing import Sequence

import jax.numpy as jnp
import flax.linen as nn

from robust_flat.models.layers import Block, Classifier, layer_partials, model_output


class BasicBlock(Block):
    conv_bias: bool = True  # bias in the 1x1 shortcut conv (Stutz et al.: yes; torchvision / RobustBench: no)

    @nn.compact
    def __call__(self, x, train: bool):
        conv, norm, act = layer_partials(self)
        strides = (self.stride, self.stride)
        out = act(norm("norm1")(conv(self.channels, (3, 3), strides, padding=1, name="conv1")(x), train))
        out = conv(self.channels, (3, 3), padding=1, name="conv2")(out)
        if self.dropout > 0:
            # Paper/code: Dropout(p=0.1) before the second norm of each block.
            out = nn.Dropout(self.dropout, deterministic=not train)(out)
        out = norm("norm2")(out, train)
        if self.stride != 1 or x.shape[-1] != self.channels:
            x = conv(self.channels, (1, 1), strides, use_bias=self.conv_bias, name="shortcut_conv")(x)
            x = norm("shortcut_norm")(x, train)
        return act(out + x)


class ResNet(Classifier):
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    width: int = 64
    conv_bias: bool = True  # bias in the stem and shortcut convs (Stutz et al.: yes; torchvision / RobustBench: no)

    @nn.compact
    def __call__(self, x, train: bool = False, output: str = "logits"):
        conv, norm, act = layer_partials(self)
        x = conv(self.width, (3, 3), padding=1, use_bias=self.conv_bias, name="conv1")(self.whitened(x))
        x = act(norm("norm1")(x, train))
        for i, blocks in enumerate(self.stage_sizes):
            for j in range(blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                x = BasicBlock(self.width * 2 ** i, stride, self.activation, self.norm, self.dropout, self.dtype,
                               self.conv_bias, name=f"stage{i + 1}_block{j}")(x, train)
        return model_output(self, jnp.mean(x, axis=(1, 2)), train, output)
