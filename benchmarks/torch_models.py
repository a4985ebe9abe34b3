"""PyTorch twins of robust-flat's models, built from the Flax weights, for the benchmark's PyTorch reference rows.

* ``small_cnn``: :mod:`benchmarks.torch_small_cnn` (``from_flax``), reused as is.
* ``resnet18``: :class:`TorchResNet18` below, the same network as :class:`robust_flat.models.resnet.ResNet`:
  clamp + whitening, 3x3 stem conv with bias, re-parameterized BN (scale ``1 + gamma``), four stages of BasicBlocks
  [2, 2, 2, 2] (64/128/256/512 channels, strides 1/2/2/2), 1x1 shortcut conv with bias + BN where the shape changes,
  global average pool, linear. Flax kernels are HWIO, PyTorch's OIHW; after the global pool the layouts agree, so no
  permutation of the classifier is needed.

:func:`twin` returns the eval-mode twin (float32, NCHW module; call ``.to(memory_format=torch.channels_last)`` for
the fast layout). :func:`max_logit_difference` checks a twin against the Flax model.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as tnn
import torch.nn.functional as F

from benchmarks import torch_small_cnn


class ReBatchNorm2d(tnn.Module):
    """BN with the paper's re-parameterized scale ``1 + weight`` (weight initialized to 0); momentum 0.1, eps 1e-5."""

    def __init__(self, channels: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.weight = tnn.Parameter(torch.zeros(channels))
        self.bias = tnn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.momentum, self.eps = momentum, eps

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, 1.0 + self.weight, self.bias, self.training,
                            self.momentum, self.eps)


class BasicBlock(tnn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = tnn.Conv2d(c_in, c_out, 3, stride, padding=1, bias=False)
        self.norm1 = ReBatchNorm2d(c_out)
        self.conv2 = tnn.Conv2d(c_out, c_out, 3, 1, padding=1, bias=False)
        self.norm2 = ReBatchNorm2d(c_out)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = tnn.Sequential(tnn.Conv2d(c_in, c_out, 1, stride, bias=True), ReBatchNorm2d(c_out))

    def forward(self, x):
        out = torch.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return torch.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class TorchResNet18(tnn.Module):
    """NCHW inputs in [0, 1]; clamps and whitens inside, like the Flax model."""

    def __init__(self, num_classes: int, mean, std, width: int = 64, stage_sizes=(2, 2, 2, 2)):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.conv1 = tnn.Conv2d(3, width, 3, 1, padding=1, bias=True)
        self.norm1 = ReBatchNorm2d(width)
        blocks, c_in = [], width
        for i, n in enumerate(stage_sizes):
            for j in range(n):
                c_out = width * 2 ** i
                blocks.append(BasicBlock(c_in, c_out, 2 if (i > 0 and j == 0) else 1))
                c_in = c_out
        self.blocks = tnn.Sequential(*blocks)
        self.logits = tnn.Linear(c_in, num_classes)

    def forward(self, x):
        # minimum(maximum(.)) like jnp.clip: half the gradient at exactly 0 or 1 (see torch_small_cnn)
        zero, one = torch.zeros((), dtype=x.dtype), torch.ones((), dtype=x.dtype)
        x = (torch.minimum(torch.maximum(x, zero), one) - self.mean) / self.std
        x = torch.relu(self.norm1(self.conv1(x)))
        x = self.blocks(x)
        return self.logits(x.mean(dim=(2, 3)))


def _conv(dst: tnn.Conv2d, p: dict):
    dst.weight.copy_(torch.from_numpy(np.array(p["kernel"], np.float32).transpose(3, 2, 0, 1).copy()))
    if dst.bias is not None:
        dst.bias.copy_(torch.from_numpy(np.array(p["bias"], np.float32)))


def _norm(dst: ReBatchNorm2d, p: dict, stats: dict):
    dst.weight.copy_(torch.from_numpy(np.array(p["scale"], np.float32)))
    dst.bias.copy_(torch.from_numpy(np.array(p["bias"], np.float32)))
    dst.running_mean.copy_(torch.from_numpy(np.array(stats["stats"]["mean"], np.float32)))
    dst.running_var.copy_(torch.from_numpy(np.array(stats["stats"]["var"], np.float32)))


def resnet_from_flax(model, params, model_state) -> TorchResNet18:
    """The PyTorch copy of a Flax ``ResNet`` (default options: ReLU, ``norm="rebn"``, no dropout), eval mode."""
    if (model.activation != "relu" or model.norm != "rebn" or model.dropout > 0 or not model.whiten
            or tuple(model.stage_sizes) != (2, 2, 2, 2)):
        raise ValueError("the PyTorch ResNet twin supports only ResNet-18 with activation='relu', norm='rebn', "
                         "dropout=0, whiten=True")
    from robust_flat.models.layers import CIFAR10_MEAN, CIFAR10_STD

    net = TorchResNet18(model.num_classes, CIFAR10_MEAN, CIFAR10_STD, model.width, model.stage_sizes)
    stats = model_state["batch_stats"]
    with torch.no_grad():
        _conv(net.conv1, params["conv1"])
        _norm(net.norm1, params["norm1"], stats["norm1"])
        k = 0
        for i, n in enumerate(model.stage_sizes):
            for j in range(n):
                name, block = f"stage{i + 1}_block{j}", net.blocks[k]
                k += 1
                p, s = params[name], stats[name]
                _conv(block.conv1, p["conv1"])
                _norm(block.norm1, p["norm1"], s["norm1"])
                _conv(block.conv2, p["conv2"])
                _norm(block.norm2, p["norm2"], s["norm2"])
                if block.shortcut is not None:
                    _conv(block.shortcut[0], p["shortcut_conv"])
                    _norm(block.shortcut[1], p["shortcut_norm"], s["shortcut_norm"])
        net.logits.weight.copy_(torch.from_numpy(np.array(params["logits"]["kernel"], np.float32).T.copy()))
        net.logits.bias.copy_(torch.from_numpy(np.array(params["logits"]["bias"], np.float32)))
    return net.eval()


def twin(name: str, model, params, model_state) -> tnn.Module:
    """The eval-mode PyTorch twin of ``create_model(name)`` with the Flax weights."""
    if name == "small_cnn":
        return torch_small_cnn.from_flax(model, params)
    if name == "resnet18":
        return resnet_from_flax(model, params, model_state)
    raise ValueError(f"no PyTorch twin for model {name!r}; choose small_cnn or resnet18")


def to_nchw(x_nhwc) -> torch.Tensor:
    """NHWC numpy/JAX array -> NCHW float32 tensor in channels_last memory (a view of the NHWC data)."""
    return torch.from_numpy(np.array(x_nhwc, np.float32, copy=True)).permute(0, 3, 1, 2)


def max_logit_difference(net: tnn.Module, logits_fn, x_nhwc) -> float:
    """Largest absolute difference between the twin's and the Flax model's logits on ``x`` (eval mode)."""
    with torch.no_grad():
        t = net(to_nchw(x_nhwc)).numpy()
    return float(np.abs(t - np.asarray(logits_fn(x_nhwc))).max())
