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

from typing import Optional, Sequence

import jax.numpy as jnp
import flax.linen as nn

from robust_flat.models.layers import (compute_dtype, conv_init, get_activation, make_norm, make_whiten,
                                      model_output)

SHORTCUT_FROM = ("activation", "input")


class PreActBlock(nn.Module):
    channels: int
    stride: int
    activation: str = "relu"
    norm: str = "rebn"
    dropout: float = 0.0
    dtype: str = "float32"  # compute dtype: float32 (paper) | bfloat16 (params stay float32)
    shortcut_from: str = "activation"  # input of the 1x1 shortcut conv: "activation" (norm1 + act) | "input"

    @nn.compact
    def __call__(self, x, train: bool):
        dt = compute_dtype(self.dtype)
        act = get_activation(self.activation)
        if self.shortcut_from not in SHORTCUT_FROM:
            raise ValueError(f"unknown shortcut_from {self.shortcut_from!r}; choose one of {', '.join(SHORTCUT_FROM)}")
        out = act(make_norm(self.norm, "norm1", self.dtype)(x, train))
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.channels:
            shortcut = nn.Conv(self.channels, (1, 1), (self.stride, self.stride), use_bias=False,
                               kernel_init=conv_init, dtype=dt,
                               name="shortcut_conv")(out if self.shortcut_from == "activation" else x)
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
    whiten_mean: Optional[Sequence[float]] = None  # None: CIFAR-10's
    whiten_std: Optional[Sequence[float]] = None
    shortcut_from: str = "activation"  # "activation" (default, PreActBlockV2) | "input" (RobustBench PreActBlock)
    final_norm: bool = True  # norm + act before the pooling (RobustBench: bn_before_fc)
    rotation_head: int = 0  # hidden width of the auxiliary rotation head (0: none; self-supervised AT: 256)

    @nn.compact
    def __call__(self, x, train: bool = False, output: str = "logits"):
        dt = compute_dtype(self.dtype)
        if self.whiten:
            x = make_whiten(self.whiten_mean, self.whiten_std, self.dtype)(x)
        x = nn.Conv(self.width, (3, 3), padding=1, use_bias=False, kernel_init=conv_init, dtype=dt, name="conv1")(x)
        for i, blocks in enumerate(self.stage_sizes):
            for j in range(blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                x = PreActBlock(self.width * 2 ** i, stride, self.activation, self.norm, self.dropout, self.dtype,
                                self.shortcut_from, name=f"stage{i + 1}_block{j}")(x, train)
        if self.final_norm:
            x = get_activation(self.activation)(make_norm(self.norm, "norm_final", self.dtype)(x, train))
        return model_output(self, jnp.mean(x, axis=(1, 2)), train, output)
