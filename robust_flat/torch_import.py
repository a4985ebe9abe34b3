"""Published PyTorch models in robust-flat, and robust-flat models in PyTorch: state-dict conversion both ways.

Most robust models people measure are PyTorch checkpoints. This module maps a PyTorch ``state_dict`` onto the
parameters and batch statistics of the equivalent model of :mod:`robust_flat.models` (and back), so the attacks and
flatness measures of this package run on them unchanged (``python -m experiments.import_torch`` writes a run
directory from a checkpoint file).

PyTorch is an optional dependency: this module imports without it and converts dicts of numpy arrays; only
:func:`read_checkpoint` (``torch.load``) and :func:`to_torch_state_dict` (unless ``numpy=True``) import torch.

Architectures (``arch`` of :func:`import_torch`) and their PyTorch layouts (``layout`` of the low-level functions):

==================  ================  ===========================================================================
arch                layout            PyTorch model (state-dict names)
==================  ================  ===========================================================================
``resnet18_stutz``  resnet18_stutz    Stutz et al.'s ``models.ResNet`` (the paper's code): ``whiten.weight/bias``,
                                      ``conv1`` (with bias), ``rebn1`` (or ``bn1``), ``block{0-3}.{j}.conv1/norm1/
                                      conv2/norm2/downsample.0/downsample.1`` (1x1 conv with bias + norm),
                                      ``logits``. Re-parameterized BN (scale ``1 + weight``) as ours (``rebn``).
``resnet18``        resnet18          RobustBench / kuangliu ``ResNet18``: ``conv1`` (no bias), ``bn1``,
                                      ``layer{1-4}.{j}.conv1/bn1/conv2/bn2/shortcut.0/shortcut.1``, ``linear``.
``preact_resnet18`` preact_resnet18   RobustBench ``PreActResNet``: ``conv1``, ``layer{1-4}.{j}.bn1/conv1/bn2/
                                      conv2/shortcut.0``, ``bn`` (only with ``bn_before_fc``), ``linear``.
``wrn28_10``,       wrn               RobustBench ``WideResNet``: ``conv1``, ``block{1-3}.layer.{j}.bn1/conv1/bn2/
``wrn34_10``                          conv2/convShortcut``, ``bn1``, ``fc`` (``sub_block1.*`` is unused by its
                                      forward pass and ignored).
(export/import)     small_cnn         ``robust_flat.torch_twins.TorchSmallCNN`` (our small CNN; no published one)
==================  ================  ===========================================================================

Layouts: conv kernels OIHW (PyTorch) <-> HWIO (Flax), linear ``(out, in)`` <-> ``(in, out)``, BN ``weight``/``bias``
<-> ``scale``/``bias`` (plus 1 or minus 1 where one side is re-parameterized, ``1 + gamma``, and the other is not),
``running_mean``/``running_var`` <-> ``batch_stats`` (eps 1e-5 on both sides). ``num_batches_tracked`` carries no
information for eval-mode BN and is ignored (export writes 0).

Input normalization: robust-flat models take images in [0, 1] and normalize inside (``whiten``: clamp to [0, 1],
then ``(x - mean) / std`` per channel). RobustBench's plain architectures take [0, 1] inputs as they are; some
zoo entries wrap them with ``mu``/``sigma`` buffers (in the state dict), a few normalize in code (Hendrycks2019Using:
``2x - 1``, i.e. mean 0.5, std 0.5: pass it explicitly). Stutz et al.'s models clamp, then whiten with the frozen
``whiten.bias`` (mean) / ``whiten.weight`` (std) parameters when built with ``whiten=True`` (clamp only otherwise).
:func:`import_torch` takes the constants from the state dict (``whiten="auto"``) or as an explicit argument
(``"cifar10"``, ``"none"``, ``"M,M,M/S,S,S"`` or ``(mean, std)``); constants in the state dict that differ from the
chosen ones are an error. Our whitening clamps to [0, 1] first; a RobustBench model with ``mu``/``sigma`` does not,
which changes nothing for inputs in [0, 1] (every attack and measure here stays in the box).

Architecture details that state dicts cannot tell (ours differ from PyTorch there): RobustBench's ``PreActBlock``
feeds the raw block input to the 1x1 shortcut conv, ``PreActBlockV2`` (and the WideResNet) the activated one; our
PreActResNet has ``shortcut_from="input"|"activation"`` for it, :func:`import_torch` infers it from the zoo's
pairing (``bn`` present: V2, as Rice2020OverfittingNetL2 and Kireev2021; absent: V1, as Wong2020Fast and
Andriushchenko2020) unless told. The activation is not stored either (``activation``, default ReLU).

Every mismatch is an error naming the keys: missing, unexpected (beyond the ignored ones above) and wrongly shaped
entries, with a guess of what the checkpoint holds. Nothing loads partially.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import os
import re
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

ARCHS = {  # arch -> (robust_flat model name, layout)
    "resnet18_stutz": ("resnet18", "resnet18_stutz"),
    "resnet18": ("resnet18", "resnet18"),
    "preact_resnet18": ("preact_resnet18", "preact_resnet18"),
    "wrn28_10": ("wrn28_10", "wrn"),
    "wrn34_10": ("wrn34_10", "wrn"),
}
LAYOUTS = ("resnet18_stutz", "resnet18", "preact_resnet18", "wrn", "small_cnn")
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "state")
STRIPPED_PREFIXES = ("module.", "_orig_mod.", "model.")
BN_EPS = 1e-5  # PyTorch's BatchNorm2d default, and ours (robust_flat.models.layers.ReBatchNorm)


class TorchImportError(ValueError):
    """A checkpoint cannot be read or does not match the model. The message is one line naming the keys."""


# ----------------------------------------------------------------------------------------------- key layouts
_BLOCK_RE = re.compile(r"stage(\d+)_block(\d+)")
_BLOCK_NAME = {"resnet18_stutz": "block{i0}.{j}", "resnet18": "layer{i}.{j}", "preact_resnet18": "layer{i}.{j}",
               "wrn": "block{i}.layer.{j}"}
_IN_BLOCK = {
    "resnet18_stutz": {"conv1": "conv1", "norm1": "norm1", "conv2": "conv2", "norm2": "norm2",
                       "shortcut_conv": "downsample.0", "shortcut_norm": "downsample.1"},
    "resnet18": {"conv1": "conv1", "norm1": "bn1", "conv2": "conv2", "norm2": "bn2", "shortcut_conv": "shortcut.0",
                 "shortcut_norm": "shortcut.1"},
    "preact_resnet18": {"norm1": "bn1", "conv1": "conv1", "norm2": "bn2", "conv2": "conv2",
                        "shortcut_conv": "shortcut.0"},
    "wrn": {"norm1": "bn1", "conv1": "conv1", "norm2": "bn2", "conv2": "conv2", "shortcut_conv": "convShortcut"},
}
_TOP = {
    "resnet18_stutz": {"conv1": "conv1", "logits": "logits"},  # the stem norm is rebn1 / bn1 by kind
    "resnet18": {"conv1": "conv1", "norm1": "bn1", "logits": "linear"},
    "preact_resnet18": {"conv1": "conv1", "norm_final": "bn", "logits": "linear"},
    "wrn": {"conv1": "conv1", "norm_final": "bn1", "logits": "fc"},
    "small_cnn": {"fc1": "fc1", "logits": "logits"},
}
# whitening constants in the state dict: (mean key, std key, stored shape)
_WHITEN_KEYS = {"resnet18_stutz": ("whiten.bias", "whiten.weight", (3,)), "small_cnn": ("mean", "std", (1, 3, 1, 1))}
_WHITEN_DEFAULT = ("mu", "sigma", (1, 3, 1, 1))  # RobustBench's zoo wrappers
_IGNORED = {"wrn": ("sub_block1.",)}  # in the state dict, unused by the forward pass


def _whiten_keys(layout: str):
    return _WHITEN_KEYS.get(layout, _WHITEN_DEFAULT)


def _model_kind(model) -> str:
    from robust_flat.models import PreActResNet, ResNet, SmallCNN, WideResNet

    for cls, kind in ((ResNet, "resnet"), (PreActResNet, "preact"), (WideResNet, "wrn"), (SmallCNN, "small_cnn")):
        if isinstance(model, cls):
            return kind
    raise TorchImportError(f"no PyTorch layout for {type(model).__name__}; supported: ResNet, PreActResNet, "
                           "WideResNet, SmallCNN")


def default_layout(model) -> str:
    """The layout a model exports to by default: Stutz et al.'s for our ResNet (RobustBench's without conv biases),
    RobustBench's for the PreActResNet and WideResNet, robust_flat.torch_twins's for the small CNN."""
    kind = _model_kind(model)
    if kind == "resnet":
        return "resnet18_stutz" if model.conv_bias else "resnet18"
    return {"preact": "preact_resnet18", "wrn": "wrn", "small_cnn": "small_cnn"}[kind]


def _check_layout(model, layout: str) -> None:
    if layout not in LAYOUTS:
        raise TorchImportError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    kind = _model_kind(model)
    need = {"resnet18_stutz": "resnet", "resnet18": "resnet", "preact_resnet18": "preact", "wrn": "wrn",
            "small_cnn": "small_cnn"}[layout]
    if kind != need:
        raise TorchImportError(f"layout {layout} is for a {need} model, not {type(model).__name__}")
    if layout == "resnet18_stutz" and not model.conv_bias:
        raise TorchImportError("layout resnet18_stutz has biases in the stem and shortcut convs: use "
                               "ResNet(conv_bias=True)")
    if layout == "resnet18" and model.conv_bias:
        raise TorchImportError("layout resnet18 (torchvision / RobustBench) has no conv biases: use "
                               "ResNet(conv_bias=False)")
    if layout == "small_cnn" and model.norm not in (None, "none"):
        raise TorchImportError("layout small_cnn (robust_flat.torch_twins) has no normalization: use "
                               "SmallCNN(norm='none')")


def _layout_norm(model, layout: str) -> Optional[str]:
    """The BN kind of the PyTorch side: Stutz et al.'s follows the model (rebn or bn), RobustBench's is plain BN."""
    if layout == "resnet18_stutz":
        return model.norm
    if layout == "small_cnn":
        return None
    return "bn"


def _scale_offset(model, layout: str) -> float:
    """PyTorch BN weight = Flax scale + offset: 1 where ours is re-parameterized (1 + gamma) and theirs is plain."""
    return 1.0 if (model.norm == "rebn" and _layout_norm(model, layout) == "bn") else 0.0


def _torch_prefix(layout: str, mpath: tuple, model) -> str:
    """The PyTorch module name of a Flax module path (``("stage2_block0", "conv1")`` -> ``"layer2.0.conv1"``)."""
    head, rest = mpath[0], mpath[1:]
    m = _BLOCK_RE.fullmatch(head)
    if m and layout in _IN_BLOCK and len(rest) == 1 and rest[0] in _IN_BLOCK[layout]:
        i, j = int(m.group(1)), int(m.group(2))
        return _BLOCK_NAME[layout].format(i=i, i0=i - 1, j=j) + "." + _IN_BLOCK[layout][rest[0]]
    if not rest:
        if head in _TOP[layout]:
            return _TOP[layout][head]
        if layout == "resnet18_stutz" and head == "norm1":
            return ("rebn" if model.norm == "rebn" else "bn") + "1"
        k = re.fullmatch(r"conv(\d+)", head)
        if layout == "small_cnn" and k:  # features = [conv, relu, conv, relu, pool] per stage
            k = int(k.group(1)) - 1
            return f"features.{(k // 2) * 5 + (k % 2) * 2}"
    raise TorchImportError(f"no PyTorch name for the Flax module {'/'.join(mpath)} in layout {layout}")


@dataclasses.dataclass(frozen=True)
class _Entry:
    collection: str  # "params" | "batch_stats"
    path: tuple  # Flax path, leaf name included
    key: str  # PyTorch state-dict key
    kind: str  # conv | dense | dense_flat | vector | scale
    shape: tuple  # Flax shape


def _leaves(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _leaves(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _entries(model, layout: str, params, batch_stats) -> list[_Entry]:
    out = []
    for path, leaf in _leaves(params):
        prefix, name, shape = _torch_prefix(layout, path[:-1], model), path[-1], tuple(leaf.shape)
        if name == "kernel":
            kind = "conv" if len(shape) == 4 else ("dense_flat" if layout == "small_cnn" and path[0] == "fc1"
                                                   else "dense")
            out.append(_Entry("params", path, prefix + ".weight", kind, shape))
        elif name == "bias":
            out.append(_Entry("params", path, prefix + ".bias", "vector", shape))
        elif name == "scale":
            out.append(_Entry("params", path, prefix + ".weight", "scale", shape))
        else:
            raise TorchImportError(f"no PyTorch name for the Flax parameter {'/'.join(path)}")
    for path, leaf in _leaves(batch_stats or {}):
        mpath = path[:-2] if len(path) >= 2 and path[-2] == "stats" else path[:-1]
        name = {"mean": "running_mean", "var": "running_var"}.get(path[-1])
        if name is None:
            raise TorchImportError(f"no PyTorch name for the batch statistic {'/'.join(path)}")
        out.append(_Entry("batch_stats", path, _torch_prefix(layout, mpath, model) + "." + name, "vector",
                          tuple(leaf.shape)))
    return out


def _torch_shape(e: _Entry) -> tuple:
    s = e.shape
    if e.kind == "conv":
        return (s[3], s[2], s[0], s[1])
    if e.kind in ("dense", "dense_flat"):
        return (s[1], s[0])
    return s


def _flat_side(e: _Entry, c_last: int) -> int:
    side = math.isqrt(e.shape[0] // c_last)
    if side * side * c_last != e.shape[0]:
        raise TorchImportError(f"fc1 has {e.shape[0]} inputs, not a square map of {c_last} channels")
    return side


def _axes(e: _Entry, c_last: int) -> Optional[tuple[tuple, tuple]]:
    """``(view, perm)``: the entry's Flax array, reshaped to ``view``, becomes PyTorch's by ``transpose(perm)`` and a
    reshape to :func:`_torch_shape`; ``None`` for entries stored alike (a scale's offset aside)."""
    if e.kind == "conv":  # HWIO -> OIHW
        return e.shape, (3, 2, 0, 1)
    if e.kind == "dense":
        return e.shape, (1, 0)
    if e.kind == "dense_flat":  # Flax flattens (h, w, c), PyTorch (c, h, w): a conv kernel the size of the map
        side = _flat_side(e, c_last)
        return (side, side, c_last, e.shape[1]), (3, 2, 0, 1)
    return None


def _convert(e: _Entry, a: np.ndarray, offset: float, c_last: int, to_torch: bool) -> np.ndarray:
    """Entry ``e``'s array from Flax's layout to PyTorch's (``to_torch``) or back (the inverse, from the same
    :func:`_axes`)."""
    if e.kind == "scale":
        return a + np.float32(offset) if to_torch else a - np.float32(offset)
    axes = _axes(e, c_last)
    if axes is None:
        return a
    view, perm = axes
    if to_torch:
        return a.reshape(view).transpose(perm).reshape(_torch_shape(e))
    return a.reshape([view[p] for p in perm]).transpose(np.argsort(perm)).reshape(e.shape)


def _c_last(model, params) -> int:
    """Channels of the small CNN's last conv (the fc1 permutation); 0 for the other models."""
    convs = sorted((int(k[4:]), k) for k in params if re.fullmatch(r"conv\d+", k))
    return int(params[convs[-1][1]]["kernel"].shape[-1]) if convs and _model_kind(model) == "small_cnn" else 0


def _whitening(model) -> Optional[tuple[np.ndarray, np.ndarray]]:
    if not getattr(model, "whiten", False):
        return None
    from robust_flat.models.layers import CIFAR10_MEAN, CIFAR10_STD

    mean = getattr(model, "whiten_mean", None)
    std = getattr(model, "whiten_std", None)
    return (np.asarray(CIFAR10_MEAN if mean is None else mean, np.float32),
            np.asarray(CIFAR10_STD if std is None else std, np.float32))


def _as_numpy(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    out = {}
    for k, v in state_dict.items():
        if hasattr(v, "detach"):  # a torch tensor
            v = v.detach().cpu()
            v = (v.float() if v.is_floating_point() else v).numpy()
        out[str(k)] = np.asarray(v)
    return out


# -------------------------------------------------------------------------------------------------- export
def to_torch_state_dict(model, params, model_state=None, layout: Optional[str] = None, *, numpy: bool = False):
    """Our Flax model's weights as a PyTorch state dict (``OrderedDict`` of CPU float32 tensors, or numpy arrays
    with ``numpy=True``, which needs no torch) in ``layout`` (default :func:`default_layout`).

    Loads with ``load_state_dict(strict=True)`` into the matching PyTorch model: Stutz et al.'s ``ResNet`` (with
    ``whiten=True`` when our model whitens), RobustBench's ``ResNet18`` / ``PreActResNet`` / ``WideResNet`` (our
    whitening, if any, as ``mu``/``sigma`` buffers of shape (1, 3, 1, 1), as RobustBench's zoo wrappers hold it;
    ``PreActResNet(bn_before_fc=...)`` as our ``final_norm``), or ``robust_flat.torch_twins.TorchSmallCNN``.
    """
    import jax

    layout = layout or default_layout(model)
    _check_layout(model, layout)
    params = jax.device_get(params)
    batch_stats = jax.device_get((model_state or {}).get("batch_stats", {}))
    offset, c_last = _scale_offset(model, layout), _c_last(model, params)
    sd: dict[str, np.ndarray] = collections.OrderedDict()
    w = _whitening(model)
    if w is not None:
        mean_key, std_key, shape = _whiten_keys(layout)
        sd[mean_key], sd[std_key] = w[0].reshape(shape), w[1].reshape(shape)
    trees = {"params": params, "batch_stats": batch_stats}
    for e in _entries(model, layout, params, batch_stats):
        leaf = trees[e.collection]
        for p in e.path:
            leaf = leaf[p]
        sd[e.key] = np.ascontiguousarray(_convert(e, np.asarray(leaf, np.float32), offset, c_last, to_torch=True))
        if e.key.endswith(".running_var"):
            sd[e.key[:-len("running_var")] + "num_batches_tracked"] = np.zeros((), np.int64)
    if numpy:
        return sd
    import torch

    return collections.OrderedDict((k, torch.from_numpy(v.copy())) for k, v in sd.items())


# -------------------------------------------------------------------------------------------------- import
def _short(keys: Sequence[str], n: int = 6) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def describe_state_dict(state_dict: Mapping[str, Any]) -> str:
    """A guess of the architecture behind a state dict, for error messages."""
    keys = set(state_dict)

    def shape(k):
        return tuple(np.shape(state_dict[k])) if k in keys else None

    def count(pattern):
        return len({m.group(1) for k in keys for m in [re.match(pattern, k)] if m})

    if "block1.layer.0.conv1.weight" in keys:
        n = count(r"block1\.layer\.(\d+)\.")
        k = (shape("block1.layer.0.conv1.weight") or (0,))[0] // 16
        arch = {(28, 10): " (arch wrn28_10)", (34, 10): " (arch wrn34_10)"}.get((6 * n + 4, k), "")
        return f"a RobustBench WideResNet-{6 * n + 4}-{k}{arch}"
    if "block0.0.conv1.weight" in keys:
        stages = [count(rf"block{i}\.(\d+)\.") for i in range(count(r"block(\d+)\."))]
        return (f"Stutz et al.'s ResNet with blocks {stages}, width {(shape('conv1.weight') or (0,))[0]}"
                + (" (arch resnet18_stutz)" if stages == [2, 2, 2, 2] else ""))
    if "layer1.0.conv1.weight" in keys:
        stages = [count(rf"layer{i}\.(\d+)\.") for i in range(1, 5)]
        width = (shape("conv1.weight") or (0,))[0]
        if "bn1.weight" in keys:
            return (f"a ResNet (post-activation) with blocks {stages}, width {width}"
                    + (" (arch resnet18)" if stages == [2, 2, 2, 2] and "layer1.0.bn2.weight" in keys else ""))
        return (f"a PreActResNet with blocks {stages}, width {width}, {'with' if 'bn.weight' in keys else 'without'} "
                "a final bn" + (" (arch preact_resnet18)" if stages == [2, 2, 2, 2] else ""))
    if "features.0.weight" in keys and "fc1.weight" in keys:
        return "robust-flat's small CNN (layout small_cnn)"
    return f"an unknown architecture (keys {_short(sorted(keys), 4)})"


def from_torch_state_dict(state_dict: Mapping[str, Any], model, layout: Optional[str] = None, *,
                          input_shape: Optional[Sequence[int]] = None):
    """``(params, model_state)`` of the Flax ``model`` from a PyTorch state dict (tensors or numpy arrays).

    Strict: a missing key, a key the model has no place for (beyond ``num_batches_tracked`` and, for the
    WideResNet, RobustBench's unused ``sub_block1.*``), a shape mismatch, or whitening constants in the state dict
    that differ from the model's raise :class:`TorchImportError` naming the keys. Whitening constants absent from
    the state dict are the caller's choice (the model's ``whiten`` options).
    """
    import jax
    import jax.numpy as jnp

    from robust_flat.models import init_model

    sd = _as_numpy(state_dict)
    layout = layout or default_layout(model)
    _check_layout(model, layout)
    if input_shape is None:
        input_shape = (32, 32, 3)
        if layout == "small_cnn" and "fc1.weight" in sd and sd["fc1.weight"].ndim == 2:
            c_last = model.channels[-1] * model.width
            side = math.isqrt(sd["fc1.weight"].shape[1] // c_last)
            input_shape = (side * 2 ** len(model.channels),) * 2 + (3,)
    params_shape, state_shape = jax.eval_shape(
        lambda: init_model(model, jax.random.key(0), (1,) + tuple(input_shape)))
    batch_stats_shape = state_shape.get("batch_stats", {})
    offset, c_last = _scale_offset(model, layout), _c_last(model, params_shape)
    entries = _entries(model, layout, params_shape, batch_stats_shape)

    used, missing, mismatched, problems = set(), [], [], []
    out: dict[str, dict] = {"params": {}, "batch_stats": {}}
    for e in entries:
        if e.key not in sd:
            missing.append(e.key)
            continue
        used.add(e.key)
        a, want = sd[e.key], _torch_shape(e)
        if tuple(a.shape) != want:
            mismatched.append(f"{e.key} {tuple(a.shape)} (model: {want})")
            continue
        node = out[e.collection]
        for p in e.path[:-1]:
            node = node.setdefault(p, {})
        node[e.path[-1]] = jnp.asarray(_convert(e, a.astype(np.float32), offset, c_last, to_torch=False))

    mean_key, std_key, wshape = _whiten_keys(layout)
    present = [k for k in (mean_key, std_key) if k in sd]
    if present:
        used.update(present)
        w = _whitening(model)
        if len(present) == 1:
            missing.append(({mean_key, std_key} - set(present)).pop())
        elif w is None:
            problems.append(f"the checkpoint normalizes inputs ({mean_key} {_fmt(sd[mean_key])}, {std_key} "
                            f"{_fmt(sd[std_key])}) but the model does not whiten")
        elif not (np.allclose(sd[mean_key].reshape(-1), w[0], rtol=0, atol=1e-6)
                  and np.allclose(sd[std_key].reshape(-1), w[1], rtol=0, atol=1e-6)):
            problems.append(f"whitening constants differ: checkpoint {mean_key} {_fmt(sd[mean_key])}, {std_key} "
                            f"{_fmt(sd[std_key])}; model mean {_fmt(w[0])}, std {_fmt(w[1])}")
    ignored = _IGNORED.get(layout, ())
    unexpected = sorted(k for k in sd if k not in used and not k.endswith(".num_batches_tracked")
                        and not k.startswith(ignored))
    if missing or unexpected or mismatched or problems:
        parts = [f"{len(missing)} missing: {_short(missing)}" if missing else "",
                 f"{len(unexpected)} unexpected: {_short(unexpected)}" if unexpected else "",
                 f"{len(mismatched)} with another shape: {_short(mismatched, 4)}" if mismatched else ""] + problems
        raise TorchImportError(f"the state dict does not fit layout {layout} ({type(model).__name__}): "
                               + "; ".join(p for p in parts if p)
                               + f"; the keys look like {describe_state_dict(sd)}")
    model_state = {"batch_stats": out["batch_stats"]} if "batch_stats" in state_shape else {}
    return out["params"], model_state


def _fmt(a) -> str:
    return "[" + ", ".join(f"{x:.4g}" for x in np.asarray(a).reshape(-1)) + "]"


# -------------------------------------------------------------------------------------- whitening, high level
def parse_whiten(spec: Union[str, tuple, None]):
    """``"auto"`` -> ``"auto"``; ``"none"`` -> ``None``; ``"cifar10"`` -> CIFAR-10's constants;
    ``"M,M,M/S,S,S"`` or ``(mean, std)`` -> those. Returns ``"auto"``, ``None`` or ``(mean, std)`` tuples."""
    from robust_flat.models.layers import CIFAR10_MEAN, CIFAR10_STD

    if spec is None or (isinstance(spec, str) and spec.lower() == "none"):
        return None
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s == "auto":
            return "auto"
        if s == "cifar10":
            return tuple(CIFAR10_MEAN), tuple(CIFAR10_STD)
        parts = s.split("/")
        try:
            if len(parts) != 2:
                raise ValueError
            mean, std = (tuple(float(v) for v in p.split(",")) for p in parts)
        except ValueError:
            raise TorchImportError(f"--whiten {spec!r}: use auto, cifar10, none or MEAN/STD as "
                                   "'0.5,0.5,0.5/0.5,0.5,0.5'") from None
    else:
        mean, std = (tuple(float(v) for v in p) for p in spec)
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise TorchImportError(f"whitening needs 3 means and 3 positive stds, got {mean} / {std}")
    return mean, std


@dataclasses.dataclass
class ImportedModel:
    model: Any  # the Flax module
    params: Any
    model_state: Any
    arch: str
    layout: str
    model_config: dict  # name, num_classes and options: create_model(**model_config) rebuilds ``model``
    notes: list  # what was inferred or ignored, one sentence each


def import_torch(state_dict: Mapping[str, Any], arch: str, *, width: Optional[int] = None,
                 whiten: Union[str, tuple, None] = "auto", activation: str = "relu",
                 preact_shortcut: str = "auto", num_classes: Optional[int] = None) -> ImportedModel:
    """Build the robust-flat model of ``arch`` (see the table above) for a PyTorch state dict and load it.

    ``width`` (ResNets; default: read from ``conv1.weight``), ``num_classes`` (default: from the classifier),
    ``whiten`` (``"auto"``: the constants the state dict holds; else none for RobustBench's models and a clamp to
    [0, 1] alone for Stutz et al.'s, as their ``Classifier`` does; or ``"cifar10"``, ``"none"``, ``"M,M,M/S,S,S"``,
    ``(mean, std)``), ``activation`` (not stored in state dicts), ``preact_shortcut`` (``"auto"``, ``"input"``,
    ``"activation"``; see the module docstring).
    """
    from robust_flat.models import create_model

    if arch not in ARCHS:
        raise TorchImportError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    name, layout = ARCHS[arch]
    sd = _as_numpy(state_dict)
    notes = []
    classifier = {"resnet18_stutz": "logits", "resnet18": "linear", "preact_resnet18": "linear", "wrn": "fc"}[layout]
    if num_classes is None:
        w = sd.get(classifier + ".weight")
        if w is None or w.ndim != 2:
            raise TorchImportError(f"no classifier {classifier}.weight in the state dict for arch {arch}; the keys "
                                   f"look like {describe_state_dict(sd)}")
        num_classes = int(w.shape[0])
    cfg: dict[str, Any] = {"name": name, "num_classes": num_classes, "activation": activation, "dropout": 0.0,
                           "dtype": "float32"}
    if layout != "wrn":
        if width is None:
            c = sd.get("conv1.weight")
            if c is None or c.ndim != 4:
                raise TorchImportError(f"no conv1.weight in the state dict for arch {arch}; the keys look like "
                                       f"{describe_state_dict(sd)}")
            width = int(c.shape[0])
        cfg["width"] = int(width)
    elif width is not None:
        raise TorchImportError(f"--width applies to the ResNets; {arch} has a fixed widen factor")
    if layout == "resnet18_stutz":
        cfg["norm"] = "rebn" if "rebn1.weight" in sd else ("bn" if "bn1.weight" in sd else "none")
        notes.append(f"normalization {cfg['norm']} (from the stem's "
                     f"{'rebn1' if cfg['norm'] == 'rebn' else 'bn1' if cfg['norm'] == 'bn' else 'missing'} keys)")
        cfg["conv_bias"] = True
    else:
        cfg["norm"] = "bn"
    if layout == "resnet18":
        cfg["conv_bias"] = False
    if layout == "preact_resnet18":
        cfg["final_norm"] = "bn.weight" in sd
        if preact_shortcut == "auto":
            cfg["shortcut_from"] = "activation" if cfg["final_norm"] else "input"
            zoo = ("PreActBlockV2 goes with bn_before_fc" if cfg["final_norm"]
                   else "PreActBlock goes without bn_before_fc")
            notes.append(f"shortcut conv on the block {cfg['shortcut_from']} (inferred: in RobustBench's zoo {zoo}; "
                         "override with preact_shortcut)")
        elif preact_shortcut in ("input", "activation"):
            cfg["shortcut_from"] = preact_shortcut
        else:
            raise TorchImportError(f"preact_shortcut {preact_shortcut!r}: use auto, input or activation")
    elif preact_shortcut not in ("auto", None):
        raise TorchImportError("preact_shortcut applies to arch preact_resnet18 only")

    w = parse_whiten(whiten)
    mean_key, std_key, _ = _whiten_keys(layout)
    if w == "auto":
        if mean_key in sd and std_key in sd:
            w = (tuple(float(v) for v in sd[mean_key].reshape(-1)), tuple(float(v) for v in sd[std_key].reshape(-1)))
            notes.append(f"whitening from the checkpoint's {mean_key}/{std_key}: mean {_fmt(w[0])}, std {_fmt(w[1])}")
        elif layout == "resnet18_stutz":
            w = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
            notes.append("no whiten.* in the checkpoint: clamp to [0, 1] only, as the original Classifier")
        else:
            w = None
            notes.append("no mu/sigma in the checkpoint: inputs in [0, 1] go to conv1 unchanged (pass whiten if the "
                         "published model normalizes in its forward)")
    if w is None:
        cfg["whiten"] = False
    else:
        cfg.update(whiten=True, whiten_mean=tuple(w[0]), whiten_std=tuple(w[1]))
    opts = {k: v for k, v in cfg.items() if k not in ("name", "num_classes")}
    model = create_model(name, num_classes, **opts)
    params, model_state = from_torch_state_dict(sd, model, layout)
    ignored = sorted(k for k in sd if k.startswith(_IGNORED.get(layout, ())))
    if ignored:
        notes.append(f"ignored {len(ignored)} keys unused by the forward pass: {_short(ignored, 2)}")
    return ImportedModel(model, params, model_state, arch, layout, cfg, notes)


# ---------------------------------------------------------------------------------------------- checkpoints
def _is_tensor(v) -> bool:
    return hasattr(v, "detach") and hasattr(v, "shape")


def _find_state_dict(obj, meta: dict, depth: int = 0):
    if hasattr(obj, "state_dict") and callable(obj.state_dict) and not isinstance(obj, Mapping):
        meta["wrapper"] = meta.get("wrapper", []) + [type(obj).__name__ + ".state_dict()"]
        return obj.state_dict()
    if not isinstance(obj, Mapping) or depth > 3:
        return None
    if obj and all(_is_tensor(v) for v in obj.values()):
        return obj
    for key in WRAPPER_KEYS:
        if key in obj:
            found = _find_state_dict(obj[key], meta, depth + 1)
            if found is not None:
                meta["wrapper"] = [key] + meta.get("wrapper", [])
                if depth == 0 and isinstance(obj.get("arguments"), Mapping):  # Stutz et al.'s common.state.State
                    meta["arguments"] = dict(obj["arguments"])
                return found
    return None


def read_checkpoint(path: str, allow_pickle: bool = False) -> tuple[dict[str, np.ndarray], dict]:
    """Read a PyTorch checkpoint file into ``(state_dict as numpy arrays, meta)``.

    Unwraps ``{"state_dict": ...}``, ``{"model_state_dict": ...}``, ``{"model": ...}`` (Stutz et al.'s
    ``common.state.State`` files: ``meta["arguments"]`` holds their model arguments), ``{"net": ...}``, a pickled
    ``nn.Module``, and ``module.`` / ``_orig_mod.`` / ``model.`` prefixes on every key (DataParallel,
    ``torch.compile``, wrappers). ``torch.load`` runs with ``weights_only=True`` unless ``allow_pickle`` (which runs
    the file's pickled code: only for files you trust). Raises :class:`TorchImportError` with a one-line reason.
    """
    if not os.path.isfile(path):
        raise TorchImportError(f"{path}: no such file")
    try:
        import torch
    except ImportError:
        raise TorchImportError("reading a PyTorch checkpoint needs PyTorch: pip install torch "
                               "(or pip install robust-flat[reference])") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a file that is not a checkpoint
        text = str(e)
        unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if not allow_pickle and unsafe:
            raise TorchImportError(f"{path} holds pickled Python objects besides tensors ({unsafe.group(1)}, which "
                                   "torch.load(weights_only=True) refuses); if you trust the file, rerun with "
                                   "--allow-pickle (allow_pickle=True)") from None
        reason = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
        first = (reason.group(1) if reason else (text.strip().splitlines() or ["empty file"])[0])[:160]
        raise TorchImportError(f"{path} is not a PyTorch checkpoint ({type(e).__name__}: {first})") from None
    meta: dict[str, Any] = {}
    sd = _find_state_dict(obj, meta)
    if not sd:
        top = _short(sorted(map(str, obj)), 6) if isinstance(obj, Mapping) else type(obj).__name__
        raise TorchImportError(f"{path} holds no state dict of tensors (found {top})")
    sd = {str(k): v for k, v in sd.items() if _is_tensor(v)}
    stripped = []
    changed = True
    while changed:
        changed = False
        for p in STRIPPED_PREFIXES:
            if sd and all(k.startswith(p) for k in sd):
                sd = {k[len(p):]: v for k, v in sd.items()}
                stripped.append(p)
                changed = True
    meta["stripped_prefixes"] = stripped
    return _as_numpy(sd), meta


__all__ = ["ARCHS", "LAYOUTS", "TorchImportError", "ImportedModel", "import_torch", "from_torch_state_dict",
           "to_torch_state_dict", "read_checkpoint", "describe_state_dict", "default_layout", "parse_whiten"]
