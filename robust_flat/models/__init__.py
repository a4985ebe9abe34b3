"""Models and the pure functions that everything else in robust-flat is written against.

Two pure views of a Flax model, both hashable so they can be static arguments of ``jax.jit``:

* :class:`ApplyFn` ``(params, model_state, x, *, train, rng=None) -> (logits, new_model_state)`` for training;
* :class:`LogitsFn` ``(params, model_state, x) -> logits`` with the batch-norm mode fixed at construction
  (``train=False``: running statistics, the mode every attack and flatness measure of the paper uses).

``model_state`` is the dict of non-parameter collections (``{"batch_stats": ...}``, or ``{}``). Attacks take an
``x -> logits`` callable; :func:`bind` makes one whose params are pytree leaves (a ``jax.tree_util.Partial``), so
passing new weights to a jitted attack does not recompile it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from robust_flat.models.preact_resnet import PreActResNet
from robust_flat.models.resnet import ResNet
from robust_flat.models.small_cnn import SmallCNN
from robust_flat.models.wide_resnet import WideResNet

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": lambda **kw: ResNet(stage_sizes=(2, 2, 2, 2), **kw),
    "preact_resnet18": lambda **kw: PreActResNet(stage_sizes=(2, 2, 2, 2), **kw),
    "wrn28_10": lambda **kw: WideResNet(depth=28, widen_factor=10, **kw),
    "wrn34_10": lambda **kw: WideResNet(depth=34, widen_factor=10, **kw),
    "small_cnn": lambda **kw: SmallCNN(**kw),
}


def create_model(name: str, num_classes: int = 10, **options: Any) -> nn.Module:
    """A model by name, with the options the paper varies (``activation``, ``width``, ``norm``, ``dropout``).

    ``width`` is the base channel count for the ResNets (64 in the paper) and a multiplier for the small CNN;
    WideResNets take ``widen_factor`` instead.
    """
    try:
        factory = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}") from None
    # lists (a config read back from JSON) become tuples: module attributes must be hashable (jit static args)
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items() if v is not None}
    try:
        return factory(num_classes=num_classes, **options)
    except TypeError as e:
        raise ValueError(f"model {name!r} does not take these options {sorted(options)}: {e}") from None


def init_model(model: nn.Module, key: jax.Array, input_shape=(1, 32, 32, 3)):
    """Initialize; returns ``(params, model_state)``."""
    variables = model.init({"params": key, "dropout": key}, jnp.zeros(input_shape, jnp.float32), train=False)
    variables = dict(variables)
    params = variables.pop("params")
    return params, variables


@dataclasses.dataclass(frozen=True)
class ApplyFn:
    """``(params, model_state, x, *, train, rng=None) -> (logits, new_model_state)``.

    ``output`` (default ``"logits"``, the classifier) selects what the models of this package return instead:
    ``"features"`` (the pooled features the classifier layer reads) or ``"rotation"`` (the auxiliary rotation
    head's logits, a model created with ``rotation_head``; :mod:`robust_flat.training.ssl_rotation`). Only a
    non-default ``output`` is passed on to the module, so any Flax classifier works with the default.
    """

    module: nn.Module
    output: str = "logits"

    def __call__(self, params, model_state, x, *, train: bool, rng: Optional[jax.Array] = None):
        variables = {"params": params, **model_state}
        rngs = {"dropout": rng} if rng is not None else {}
        kwargs = {} if self.output == "logits" else {"output": self.output}
        if train and model_state:
            logits, updates = self.module.apply(variables, x, train=True, rngs=rngs, mutable=list(model_state),
                                                **kwargs)
            return logits, {**model_state, **updates}
        return self.module.apply(variables, x, train=train, rngs=rngs, **kwargs), model_state


@dataclasses.dataclass(frozen=True)
class LogitsFn:
    """``(params, model_state, x) -> logits`` with the batch-norm mode fixed (``train=False``: running stats).

    With ``train=True`` the forward uses batch statistics and the updated running statistics are discarded.
    Dropout is never applied here (it needs an RNG; use :class:`ApplyFn` for that).
    """

    module: nn.Module
    train: bool = False

    def __call__(self, params, model_state, x):
        variables = {"params": params, **model_state}
        if self.train and model_state:
            logits, _ = self.module.apply(variables, x, train=True, mutable=list(model_state))
            return logits
        return self.module.apply(variables, x, train=False)


def make_apply_fn(model: nn.Module) -> ApplyFn:
    return ApplyFn(model)


def make_logits_fn(model: nn.Module, train: bool = False) -> LogitsFn:
    return LogitsFn(model, train)


def bind(logits_fn: Callable, params, model_state) -> jax.tree_util.Partial:
    """``x -> logits`` with ``params``/``model_state`` as pytree leaves (no recompiles when they change)."""
    return jax.tree_util.Partial(logits_fn, params, model_state)


def count_params(params) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))


__all__ = ["MODELS", "create_model", "init_model", "ApplyFn", "LogitsFn", "make_apply_fn", "make_logits_fn",
           "bind", "count_params", "ResNet", "PreActResNet", "WideResNet", "SmallCNN"]
