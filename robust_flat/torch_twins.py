"""PyTorch twins of robust-flat's models, built from the Flax weights: cross-checks against PyTorch attack code
(tests, benchmarks/autoattack_reference.py) and the benchmarks' PyTorch reference rows. Needs torch (an optional
extra).

* ``small_cnn``: :class:`TorchSmallCNN` (:func:`small_cnn_from_flax`), our small CNN (no published one); the PyTorch
  layout ``small_cnn`` of :mod:`robust_flat.torch_import`. Only ``norm="none"``, ``activation="relu"``, no dropout
  (the SmallCNN defaults).
* ``resnet18``: :class:`TorchResNet18` (:func:`resnet_from_flax`), the same network as
  :class:`robust_flat.models.resnet.ResNet`, with the module names of Stutz et al.'s ``models.ResNet``: clamp +
  whitening (``whiten.bias`` = mean, ``whiten.weight`` = std), 3x3 stem conv with bias (``conv1``), re-parameterized
  BN (scale ``1 + gamma``, ``rebn1``), four stages ``block0``..``block3`` of BasicBlocks [2, 2, 2, 2]
  (64/128/256/512 channels, strides 1/2/2/2), 1x1 shortcut conv with bias + BN where the shape changes
  (``downsample``), global average pool, linear ``logits`` (layout ``resnet18_stutz``).

Layout: Flax convolution kernels are HWIO, PyTorch's OIHW; inputs are NHWC in JAX and NCHW in PyTorch. The Flax
small CNN flattens the last feature map in (h, w, c) order, PyTorch in (c, h, w) order, so the first dense layer's
rows are permuted accordingly (:func:`robust_flat.torch_import.to_torch_state_dict` does the conversion). The input
clamp has ``jnp.clip``'s gradient (half at the box boundary), so input gradients agree too. :func:`twin` returns the
eval-mode twin (float32, NCHW module; ``.to(memory_format=torch.channels_last)`` for the fast layout);
:func:`max_logit_difference` checks a twin against the Flax model.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as tnn
import torch.nn.functional as F


class TorchSmallCNN(tnn.Module):
    """NCHW inputs in [0, 1]; clamps and whitens inside, like the Flax model."""

    def __init__(self, channels, hidden, num_classes, mean, std, spatial=32):
        super().__init__()
        layers, c_in = [], 3
        for c in channels:
            for _ in range(2):
                layers += [tnn.Conv2d(c_in, c, 3, padding=1, bias=True), tnn.ReLU()]
                c_in = c
            layers.append(tnn.MaxPool2d(2, 2))
        self.features = tnn.Sequential(*layers)
        side = spatial // 2 ** len(channels)
        self.fc1 = tnn.Linear(c_in * side * side, hidden)
        self.logits = tnn.Linear(hidden, num_classes)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x):
        # minimum(maximum(.)) rather than clamp: like jnp.clip it passes half the gradient at exactly 0 or 1
        # (torch.clamp passes all of it), and attacks put many pixels exactly on the box boundary
        zero, one = torch.zeros((), dtype=x.dtype), torch.ones((), dtype=x.dtype)
        x = (torch.minimum(torch.maximum(x, zero), one) - self.mean) / self.std
        x = self.features(x).flatten(1)
        return self.logits(torch.relu(self.fc1(x)))


def small_cnn_from_flax(model, params, spatial: int = 32) -> TorchSmallCNN:
    """Build the PyTorch copy of a Flax ``SmallCNN`` (``model``) with weights ``params`` (eval mode, float32)."""
    if model.norm != "none" or model.activation != "relu" or model.dropout > 0 or not model.whiten:
        raise ValueError("the PyTorch port supports only SmallCNN(norm='none', activation='relu', dropout=0, "
                         "whiten=True)")
    from robust_flat.models.layers import CIFAR10_MEAN, CIFAR10_STD
    from robust_flat.torch_import import to_torch_state_dict

    channels = [c * model.width for c in model.channels]
    hidden = model.hidden * model.width
    net = TorchSmallCNN(channels, hidden, model.num_classes, CIFAR10_MEAN, CIFAR10_STD, spatial)
    net.load_state_dict(to_torch_state_dict(model, params, {}, "small_cnn"))
    return net.eval()


class ReBatchNorm2d(tnn.Module):
    """BN with the paper's re-parameterized scale ``1 + weight`` (weight initialized to 0); momentum 0.1, eps 1e-5."""

    def __init__(self, channels: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.weight = tnn.Parameter(torch.zeros(channels))
        self.bias = tnn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self.momentum, self.eps = momentum, eps

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, 1.0 + self.weight, self.bias, self.training,
                            self.momentum, self.eps)


class Whiten(tnn.Module):
    """Stutz et al.'s ``common.torch.Normalize``: ``(x - bias) / weight`` with frozen per-channel constants."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("weight", torch.tensor(std, dtype=torch.float32))
        self.register_buffer("bias", torch.tensor(mean, dtype=torch.float32))

    def forward(self, x):
        return (x - self.bias.view(1, -1, 1, 1)) / self.weight.view(1, -1, 1, 1)


class BasicBlock(tnn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = tnn.Conv2d(c_in, c_out, 3, stride, padding=1, bias=False)
        self.norm1 = ReBatchNorm2d(c_out)
        self.conv2 = tnn.Conv2d(c_out, c_out, 3, 1, padding=1, bias=False)
        self.norm2 = ReBatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = tnn.Sequential(tnn.Conv2d(c_in, c_out, 1, stride, bias=True), ReBatchNorm2d(c_out))

    def forward(self, x):
        out = torch.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class TorchResNet18(tnn.Module):
    """NCHW inputs in [0, 1]; clamps and whitens inside, like the Flax model."""

    def __init__(self, num_classes: int, mean, std, width: int = 64, stage_sizes=(2, 2, 2, 2)):
        super().__init__()
        self.whiten = Whiten(mean, std)
        self.conv1 = tnn.Conv2d(3, width, 3, 1, padding=1, bias=True)
        self.rebn1 = ReBatchNorm2d(width)
        c_in = width
        self.stages = len(stage_sizes)
        for i, n in enumerate(stage_sizes):
            blocks = []
            for j in range(n):
                c_out = width * 2 ** i
                blocks.append(BasicBlock(c_in, c_out, 2 if (i > 0 and j == 0) else 1))
                c_in = c_out
            setattr(self, f"block{i}", tnn.Sequential(*blocks))
        self.logits = tnn.Linear(c_in, num_classes)

    def forward(self, x):
        # minimum(maximum(.)) like jnp.clip: half the gradient at exactly 0 or 1 (see TorchSmallCNN)
        zero, one = torch.zeros((), dtype=x.dtype), torch.ones((), dtype=x.dtype)
        x = self.whiten(torch.minimum(torch.maximum(x, zero), one))
        x = torch.relu(self.rebn1(self.conv1(x)))
        for i in range(self.stages):
            x = getattr(self, f"block{i}")(x)
        return self.logits(x.mean(dim=(2, 3)))


def resnet_from_flax(model, params, model_state) -> TorchResNet18:
    """The PyTorch copy of a Flax ``ResNet`` (default options: ReLU, ``norm="rebn"``, no dropout), eval mode."""
    if (model.activation != "relu" or model.norm != "rebn" or model.dropout > 0 or not model.whiten
            or tuple(model.stage_sizes) != (2, 2, 2, 2) or not model.conv_bias):
        raise ValueError("the PyTorch ResNet twin supports only ResNet-18 with activation='relu', norm='rebn', "
                         "dropout=0, whiten=True, conv_bias=True")
    from robust_flat.torch_import import to_torch_state_dict

    sd = to_torch_state_dict(model, params, model_state, "resnet18_stutz")
    net = TorchResNet18(model.num_classes, sd["whiten.bias"].tolist(), sd["whiten.weight"].tolist(), model.width,
                        model.stage_sizes)
    net.load_state_dict(sd)
    return net.eval()


def twin(name: str, model, params, model_state=None, spatial: int = 32) -> tnn.Module:
    """The eval-mode PyTorch twin of ``create_model(name)`` with the Flax weights (``spatial``: the input side, for
    the small CNN's dense layer)."""
    if name == "small_cnn":
        return small_cnn_from_flax(model, params, spatial)
    if name == "resnet18":
        return resnet_from_flax(model, params, model_state)
    raise ValueError(f"no PyTorch twin for model {name!r}; choose small_cnn or resnet18")


def to_nchw(x_nhwc) -> torch.Tensor:
    """NHWC numpy/JAX array -> contiguous NCHW float32 tensor."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x_nhwc, np.float32).transpose(0, 3, 1, 2)))


def to_nhwc(x_nchw: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x_nchw.detach().cpu().numpy().transpose(0, 2, 3, 1))


def max_logit_difference(net: tnn.Module, logits_fn, x_nhwc) -> float:
    """Largest absolute difference between the twin's and the Flax model's logits on ``x`` (eval mode; expect ~1e-5
    or less)."""
    with torch.no_grad():
        t = net(to_nchw(x_nhwc)).numpy()
    return float(np.abs(t - np.asarray(logits_fn(x_nhwc))).max())
