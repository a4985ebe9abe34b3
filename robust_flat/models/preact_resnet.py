"""PreActResNet-18 (He et al. 2016), the robustness benchmarks' standard small model (Rice et al., Wong et al.).

Options for published PyTorch PreActResNet-18s (:mod:`robust_flat.torch_import`), defaults unchanged:

* ``shortcut_from``: what the 1x1 shortcut conv of a block that changes the shape sees. ``"activation"`` (default):
  the block's first norm + activation output (kuangliu's PreActBlock, RobustBench's ``PreActBlockV2``, and the
  WideResNet); ``"input"``: the raw block input (RobustBench's ``PreActBlock``: Wong2020Fast,
  Andriushchenko2020Understanding).
* ``final_norm``: norm + activation before the pooling (default; RobustBench's ``bn_before_fc=True``); ``False``
  pools the last block's output directly (RobustBench's default ``PreActResNet18()``).
* ``whiten_mean``/``whiten_std``: whitening constants (default CIFAR-10's); ``whiten=False``: none.
"""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import flax.linen as nn

from robust_flat.models.layers import Block, Classifier, layer_partials, model_output

SHORTCUT_FROM = ("activation", "input")


class PreActBlock(Block):
    shortcut_from: str = "activation"  # input of the 1x1 shortcut conv: "activation" (norm1 + act) | "input"

    @nn.compact
    def __call__(self, x, train: bool):
        conv, norm, act = layer_partials(self)
        strides = (self.stride, self.stride)
        if self.shortcut_from not in SHORTCUT_FROM:
            raise ValueError(f"unknown shortcut_from {self.shortcut_from!r}; choose one of {', '.join(SHORTCUT_FROM)}")
        out = act(norm("norm1")(x, train))
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.channels:
            shortcut = conv(self.channels, (1, 1), strides,
                            name="shortcut_conv")(out if self.shortcut_from == "activation" else x)
        out = conv(self.channels, (3, 3), strides, padding=1, name="conv1")(out)
        out = act(norm("norm2")(out, train))
        if self.dropout > 0:
            out = nn.Dropout(self.dropout, deterministic=not train)(out)
        out = conv(self.channels, (3, 3), padding=1, name="conv2")(out)
        return out + shortcut


class PreActResNet(Classifier):
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    width: int = 64
    shortcut_from: str = "activation"  # "activation" (default, PreActBlockV2) | "input" (RobustBench PreActBlock)
    final_norm: bool = True  # norm + act before the pooling (RobustBench: bn_before_fc)

    @nn.compact
    def __call__(self, x, train: bool = False, output: str = "logits"):
        conv, norm, act = layer_partials(self)
        x = conv(self.width, (3, 3), padding=1, name="conv1")(self.whitened(x))
        for i, blocks in enumerate(self.stage_sizes):
            for j in range(blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                x = PreActBlock(self.width * 2 ** i, stride, self.activation, self.norm, self.dropout, self.dtype,
                                self.shortcut_from, name=f"stage{i + 1}_block{j}")(x, train)
        if self.final_norm:
            x = act(norm("norm_final")(x, train))
        return model_output(self, jnp.mean(x, axis=(1, 2)), train, output)
