"""Benchmark suite: robust-flat's JAX paths against equivalent PyTorch references on the same work.

``python -m benchmarks.run [--rows pgd_step,train_step,apgd_ce,flatness_avg,hvp] [--models small_cnn,resnet18]
[--repeats 5 | --repeats small_cnn=5,resnet18=2] [--batch-size 128] [--out benchmarks/results/latest.json]
[--no-torch] [--torch-threads N] [--skip resnet18:apgd_ce,...] [--switch-off small_cnn:pgd_step,...]
[--torch-device auto|cpu|cuda] [--min-time S] [--bf16]``

On a GPU (JAX's default backend) PyTorch runs on CUDA too (``--torch-device auto``) with cuDNN autotuning and TF32
as XLA's default precision, each timing sample averages back-to-back calls filling ``--min-time`` (0.5 s), % peak
is against a JAX matmul on the device, and per-row device memory peaks are recorded. ``--bf16`` adds a bfloat16
variant of the JAX AT step.

Rows (batch B of random images in [0, 1], float32, see benchmarks/README.md):

* ``pgd_step``: one L-inf PGD iteration (forward + backward w.r.t. the input, eval-mode BN, best-iterate tracking,
  sign step, projection);
* ``train_step``: one PGD-7 adversarial-training step (uint8 batch -> crop/flip -> PGD-7 in eval mode -> train-mode
  forward/backward -> SGD lr 0.05, momentum 0.9, Nesterov, weight decay 5e-4); JAX: ``training.pgd_at.train_step``
  in one jit with the state donated, as the trainer runs it;
* ``apgd_ce``: APGD-CE, 100 iterations, 1 restart (JAX: ``attacks.apgd``; PyTorch: pyautoattack's ``APGDAttack``).
  Labels are the model's clean predictions, so every point is attacked by both (pyautoattack skips misclassified
  points, ours iterates on fixed shapes);
* ``flatness_avg``: average-case flatness on one batch: K = 10 layer-wise relative perturbations on the sphere
  (xi = 0.5) x PGD-20 + the perturbed loss (JAX: ``flatness.average_case`` without the reference loss; PyTorch: a loop
  written here with the same algorithm);
* ``hvp``: one Hessian-vector product of the clean CE w.r.t. all kernels (>= 2-dim tensors), eval mode (JAX:
  ``hessian.HessianOperator.matvec``, forward-over-reverse; PyTorch: double backprop with ``create_graph``).

Variants of a row are timed interleaved in one process (JAX, PyTorch, [JAX with the XLA:CPU switch off], JAX,
PyTorch, ...) after untimed warm-up calls (``--light-warmup``: APGD and flatness warm up on 10 iterations / 1 weight
sample, which compile the same programs; for ResNet-18 on a CPU). Every row records the XLA compiles of its warm-up
and of its timed calls (``xla_compiles_timed``: 0 when nothing recompiles). PyTorch uses channels_last, frozen
parameters and eval mode during attacks, ``no_grad`` for forward-only parts. Timing assertions never belong in
tests; this script only reports.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import functools
import gc
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import time
import types
from typing import Any, Callable, Optional

import numpy as np

from robust_flat.io import atomic_write_json

ROWS = ("pgd_step", "train_step", "apgd_ce", "flatness_avg", "hvp")
MODELS = ("small_cnn", "resnet18")
# Work per image in units of F = one forward pass (2 x the model's conv+dense MACs), counted analytically.
WORK_F = {
    "pgd_step": 2,       # forward + input backward (no weight gradients)
    "train_step": 18,    # PGD-7 with best-iterate check: 8 forwards + 7 input backwards (15F), then fwd+bwd (3F)
    "apgd_ce": 203,      # clean forward (1F) + start point fwd+bwd (2F) + 100 x fwd+bwd (200F)
    "flatness_avg": 420,  # K = 10 x (PGD-20: 21 forwards + 20 backwards, + the perturbed loss forward) = 10 x 42F
    "hvp": 9,            # forward-over-reverse: a gradient is 3F, its tangent doubles every bilinear op -> ~9F
}
DEFAULT_SKIP = "resnet18:apgd_ce,resnet18:flatness_avg"
DEFAULT_SWITCH_OFF = "small_cnn:pgd_step,small_cnn:train_step,resnet18:pgd_step"
EPS, PGD_STEP = 8 / 255, 0.007
FLATNESS_K, FLATNESS_XI = 10, 0.5


# ------------------------------------------------------------------------------------------------ machine
def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"^Model name:\s*(.+)$", out, re.M)
        if m:
            return m.group(1).strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def matmul_gflops(n: int, repeats: int) -> dict:
    """numpy float32 n x n matmul GFLOP/s: one warm-up, then ``repeats`` timed calls."""
    rng = np.random.default_rng(0)
    a, b = rng.random((n, n), np.float32), rng.random((n, n), np.float32)
    a @ b
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        rates.append(2 * n ** 3 / (time.perf_counter() - t) / 1e9)
    return {"n": n, "median_gflops": float(np.median(rates)), "min_gflops": float(min(rates)),
            "max_gflops": float(max(rates)), "samples": [float(r) for r in rates]}


def device_matmul_gflops(n: int, repeats: int, inner: int = 10) -> dict:
    """JAX float32 n x n matmul GFLOP/s on the default (accelerator) device, default precision (XLA may use TF32
    on a GPU, as it does for the convolutions timed here): one warm-up, then ``repeats`` samples of ``inner`` calls."""
    import jax
    import jax.numpy as jnp
    ka, kb = jax.random.split(jax.random.key(0))
    a, b = jax.random.uniform(ka, (n, n), jnp.float32), jax.random.uniform(kb, (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            c = dot(a, b)
        c.block_until_ready()
        rates.append(2 * n ** 3 * inner / (time.perf_counter() - t) / 1e9)
    return {"n": n, "median_gflops": float(np.median(rates)), "min_gflops": float(min(rates)),
            "max_gflops": float(max(rates)), "samples": [float(r) for r in rates],
            "what": f"jax.jit(jnp.dot) float32 on {jax.devices()[0].device_kind}, default precision"}


def device_memory(torch_device: str) -> dict:
    """Accelerator memory: JAX's allocator peak over the process so far (it cannot be reset) and PyTorch's peak
    since the last ``torch.cuda.reset_peak_memory_stats()`` (reset at the start of each row)."""
    import jax
    out = {}
    stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
        out["jax_peak_gb_process_so_far"] = stats["peak_bytes_in_use"] / 2 ** 30
    if torch_device != "cpu":
        import torch
        out["torch_peak_gb_row"] = torch.cuda.max_memory_allocated() / 2 ** 30
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def forward_macs(logits_fn, params, model_state) -> int:
    """Conv + dense multiply-accumulates of one forward pass for one 32x32x3 image (analytic, from the jaxpr)."""
    import jax

    def subjaxprs(eqn):
        for v in eqn.params.values():
            for item in (v if isinstance(v, (list, tuple)) else [v]):
                if hasattr(item, "jaxpr") and hasattr(item, "consts"):
                    yield item.jaxpr
                elif hasattr(item, "eqns"):
                    yield item

    def count(jaxpr) -> int:
        total = 0
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                out, rhs = eqn.outvars[0].aval.shape, eqn.invars[1].aval.shape
                total += int(np.prod(out)) * int(np.prod(rhs)) // rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
            elif eqn.primitive.name == "dot_general":
                (contract, _), _ = eqn.params["dimension_numbers"]
                lhs = eqn.invars[0].aval.shape
                total += int(np.prod(eqn.outvars[0].aval.shape)) * int(np.prod([lhs[i] for i in contract]))
            for sub in subjaxprs(eqn):
                total += count(sub)
        return total

    jaxpr = jax.make_jaxpr(logits_fn)(params, model_state, np.zeros((1, 32, 32, 3), np.float32))
    return count(jaxpr.jaxpr)


def ynn_convolutions(hlo_text: str) -> dict:
    """How many convolutions of a compiled XLA:CPU program run inside YNNPACK fusions (the switch's target)."""
    bodies, current = {}, None
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if header and not line.startswith(" "):
            current = header.group(1)
            bodies[current] = []
        elif line.startswith("}"):
            current = None
        elif current is not None:
            bodies[current].append(line)
    ynn_called = set()
    for lines in bodies.values():
        for line in lines:
            if "ynn_fusion" in line and "calls=" in line:
                ynn_called.update(re.findall(r"calls=%?([\w.\-]+)", line))
    total = sum(sum("convolution(" in l for l in lines) for lines in bodies.values())
    in_ynn = sum(sum("convolution(" in l for l in bodies.get(name, [])) for name in ynn_called)
    return {"convolutions": int(total), "in_ynnpack": int(in_ynn)}


# ------------------------------------------------------------------------------------------------ variants
@dataclasses.dataclass
class Variant:
    """One implementation of a row. ``call()`` runs it once and returns when the result is ready."""

    name: str
    call: Callable[[], Any]
    lower_s: Optional[float] = None
    compile_s: Optional[float] = None
    compile_method: str = ""
    first_call_s: Optional[float] = None
    times: list = dataclasses.field(default_factory=list)
    info: dict = dataclasses.field(default_factory=dict)
    # A cheaper call that compiles everything ``call`` needs (same shapes, fewer iterations or samples); used as the
    # warm-up with ``--light-warmup``, for rows that take tens of minutes per call on a CPU.
    warm: Optional[Callable[[], Any]] = None


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _block(out):
    import jax
    return jax.block_until_ready(out)


def _compile(jitted, *args):
    """``(compiled, lower_s, compile_s, ynn)`` via ``jitted.lower(*args).compile()``."""
    t = time.perf_counter()
    lowered = jitted.lower(*args)
    lower_s = time.perf_counter() - t
    t = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t
    try:
        ynn = ynn_convolutions(compiled.as_text())
    except Exception as e:  # noqa: BLE001 -- diagnostics only
        ynn = {"error": repr(e)}
    return compiled, lower_s, compile_s, ynn


class fast_conv:
    """Context: the XLA:CPU switch (``robust_flat.xla``) forced on/off for jits created inside; restored after."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __enter__(self):
        from robust_flat import xla
        self.prev = xla.fast_cpu_conv_enabled()
        xla.set_fast_cpu_conv(self.enabled)

    def __exit__(self, *exc):
        from robust_flat import xla
        xla.set_fast_cpu_conv(self.prev)


# ------------------------------------------------------------------------------------------------ PyTorch side
class frozen:
    """Context: all parameters of ``net`` with ``requires_grad=False`` (attacks need input gradients only)."""

    def __init__(self, net, keep=()):
        self.net, self.keep = net, {id(p) for p in keep}

    def __enter__(self):
        self.prev = [(p, p.requires_grad) for p in self.net.parameters()]
        for p in self.net.parameters():
            p.requires_grad_(id(p) in self.keep)

    def __exit__(self, *exc):
        for p, r in self.prev:
            p.requires_grad_(r)


def torch_project(delta, x, eps):
    import torch
    return torch.minimum(torch.maximum(delta, -x), 1.0 - x).clamp(-eps, eps)


def torch_pgd_step(net, x, y, delta, best_delta, best_loss, eps=EPS, step_size=PGD_STEP):
    """One iteration as ``robust_flat.attacks.pgd``: loss + input gradient, best-iterate update, sign step, projection."""
    import torch
    import torch.nn.functional as F
    delta = delta.detach().requires_grad_(True)
    losses = F.cross_entropy(net(x + delta), y, reduction="none")
    (g,) = torch.autograd.grad(losses.sum(), delta)
    with torch.no_grad():
        losses = losses.detach()
        better = losses > best_loss
        best_delta = torch.where(better[:, None, None, None], delta.detach(), best_delta)
        best_loss = torch.where(better, losses, best_loss)
        delta = torch_project(delta.detach() + step_size * g.sign(), x, eps)
    return delta, best_delta, best_loss


def torch_pgd(net, x, y, steps, gen, eps=EPS, step_size=PGD_STEP):
    """PGD as ``robust_flat.attacks.pgd`` with the paper's defaults (uniform-norm start, per-example best iterate)."""
    import torch
    import torch.nn.functional as F
    n, dev = x.shape[0], x.device
    g = torch.randn(x.shape, generator=gen, device=dev).contiguous(memory_format=torch.channels_last)
    g = g / g.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
    u = torch.rand(n, generator=gen, device=dev).view(-1, 1, 1, 1)
    delta = torch_project(eps * u * g, x, eps)
    best_delta, best_loss = delta, torch.full((n,), -float("inf"), device=dev)
    for _ in range(steps):
        delta, best_delta, best_loss = torch_pgd_step(net, x, y, delta, best_delta, best_loss, eps, step_size)
    with torch.no_grad():
        losses = F.cross_entropy(net(x + delta), y, reduction="none")
        best_delta = torch.where((losses > best_loss)[:, None, None, None], delta, best_delta)
    return (x + best_delta).detach()


def torch_images(images_u8):
    """uint8 NHWC numpy array or tensor (on any device) -> float NCHW (channels_last memory) in [0, 1], on the
    tensor's device."""
    import torch
    if isinstance(images_u8, np.ndarray):
        images_u8 = torch.from_numpy(np.array(images_u8, copy=True))
    x = images_u8.permute(0, 3, 1, 2).float() / 255.0
    return x.contiguous(memory_format=torch.channels_last)


def torch_augment(x, gen, pad: int = 4):
    """Random crop after zero padding by ``pad`` pixels and horizontal flip, per example (as ``data.augment``)."""
    import torch
    import torch.nn.functional as F
    n, c, h, w = x.shape
    dev = x.device
    padded = F.pad(x, (pad, pad, pad, pad)).permute(0, 2, 3, 1)
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=dev)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=dev)
    rows = (oy[:, None] + torch.arange(h, device=dev))[:, :, None]
    cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, :]
    out = padded[torch.arange(n, device=dev)[:, None, None], rows, cols]  # [n, h, w, c]
    flip = (torch.rand(n, generator=gen, device=dev) < 0.5)[:, None, None, None]
    out = torch.where(flip, out.flip(2), out)
    return out.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


def torch_flatness(net, x, y, gen, samples=FLATNESS_K, xi=FLATNESS_XI, steps=20):
    """Average-case flatness units as ``flatness.average_case`` (sphere, layer-wise relative, conv/linear weights and
    biases): for each sample, w + xi ||w_l|| g_l / ||g_l||, PGD-20 in eval mode, CE at the adversarial inputs."""
    import torch
    import torch.nn as tnn
    import torch.nn.functional as F
    layers = [p for m in net.modules() if isinstance(m, (tnn.Conv2d, tnn.Linear))
              for p in (m.weight, m.bias) if p is not None]
    originals = [p.detach().clone() for p in layers]
    means = []
    try:
        for _ in range(samples):
            with torch.no_grad():
                for p, w in zip(layers, originals):
                    g = torch.randn(w.shape, generator=gen, device=w.device)
                    p.copy_(w + (xi * w.norm() / g.norm()) * g)
            x_adv = torch_pgd(net, x, y, steps, gen)
            with torch.no_grad():
                means.append(F.cross_entropy(net(x_adv), y))
    finally:
        with torch.no_grad():
            for p, w in zip(layers, originals):
                p.copy_(w)
    return torch.stack(means)


def torch_hvp(net, x, y, params, v):
    import torch
    import torch.nn.functional as F
    loss = F.cross_entropy(net(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    dot = sum((g * t).sum() for g, t in zip(grads, v))
    return torch.autograd.grad(dot, params)


# ------------------------------------------------------------------------------------------------ setup
def torch_device(spec: str, jax_backend: str) -> str:
    """``auto``: PyTorch on CUDA when JAX runs on a GPU and PyTorch sees one, else on the CPU."""
    import torch
    if spec == "auto":
        return "cuda" if jax_backend == "gpu" and torch.cuda.is_available() else "cpu"
    if spec == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--torch-device cuda: this PyTorch build sees no CUDA device")
    return spec


def torch_synced(fn, device: str):
    """``fn`` that returns only when its CUDA work is done (JAX calls block on their results likewise)."""
    if device == "cpu":
        return fn

    def call():
        import torch
        out = fn()
        torch.cuda.synchronize()
        return out
    return call


class Setup:
    """Model, weights, data and the PyTorch twin (on ``torch_device``) for one model name (shared by its rows)."""

    def __init__(self, name: str, batch_size: int, with_torch: bool, torch_device: str = "cpu", bf16: bool = False):
        import jax
        from robust_flat.models import bind, create_model, init_model, make_apply_fn, make_logits_fn

        self.name, self.batch_size, self.bf16 = name, batch_size, bf16
        self.model = create_model(name)
        params, model_state = init_model(self.model, jax.random.key(0))
        if model_state:  # non-trivial BN statistics, so eval and train mode differ as in a trained model
            model_state = jax.tree.map(lambda a: a + 0.1 * jax.random.uniform(jax.random.key(1), a.shape), model_state)
        self.params, self.model_state = params, model_state
        self.logits_fn, self.apply_fn = make_logits_fn(self.model), make_apply_fn(self.model)
        self.f = bind(self.logits_fn, params, model_state)
        rng = np.random.default_rng(0)
        self.images_u8 = rng.integers(0, 256, (batch_size, 32, 32, 3), dtype=np.uint8)
        self.x = (self.images_u8.astype(np.float32) / 255.0)
        self.y = rng.integers(0, 10, batch_size).astype(np.int32)
        self.y_pred = np.asarray(jax.numpy.argmax(self.f(self.x), -1), np.int32)
        self.macs = forward_macs(self.logits_fn, params, model_state)
        self.net, self.twin_check, self.tdev = None, None, torch_device
        if with_torch:
            import torch
            from benchmarks import torch_models
            self.net = torch_models.twin(name, self.model, params, model_state).to(memory_format=torch.channels_last)
            self.twin_check = torch_models.max_logit_difference(self.net, self.f, self.x[:16])  # on the CPU
            self.net = self.net.to(torch_device)
            self.tu8 = torch.from_numpy(self.images_u8.copy()).to(torch_device)
            self.tx = torch_images(self.tu8)
            self.ty = torch.from_numpy(self.y.astype(np.int64)).to(torch_device)
            self.ty_pred = torch.from_numpy(self.y_pred.astype(np.int64)).to(torch_device)

    def generator(self):
        import torch
        return torch.Generator(device=self.tdev).manual_seed(0)


# ------------------------------------------------------------------------------------------------ rows
def row_pgd_step(s: Setup, with_torch: bool, switch_off: bool) -> list[Variant]:
    import jax
    import jax.numpy as jnp
    from robust_flat import xla
    from robust_flat.attacks.common import cross_entropy, normalize_gradient, project

    def step(params, model_state, x, y, delta, best_delta, best_loss):
        def objective(d):
            losses = cross_entropy(s.logits_fn(params, model_state, x + d), y)
            return jnp.sum(losses), losses
        (_, losses), g = jax.value_and_grad(objective, has_aux=True)(delta)
        better = losses > best_loss
        best_delta = jnp.where(better[:, None, None, None], delta, best_delta)
        best_loss = jnp.where(better, losses, best_loss)
        delta = project(delta + PGD_STEP * normalize_gradient(g, "linf"), x, EPS, "linf")
        return delta, best_delta, best_loss

    n = s.batch_size
    delta = jnp.asarray(np.random.default_rng(1).uniform(-EPS, EPS, s.x.shape).astype(np.float32))
    args = (s.params, s.model_state, jnp.asarray(s.x), jnp.asarray(s.y), delta, delta,
            jnp.full((n,), -jnp.inf, jnp.float32))
    variants = []
    for name, on in [("jax", True)] + ([("jax_switch_off", False)] if switch_off else []):
        with fast_conv(on):
            compiled, lo, co, ynn = _compile(xla.jit(step), *args)
        variants.append(Variant(name, functools.partial(lambda c: _block(c(*args)), compiled), lo, co,
                                "lower()+compile()", info={"ynn": ynn}))
    if with_torch:
        import torch
        net, x, y = s.net, s.tx, s.ty
        t_delta = torch.from_numpy(np.array(delta)).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
        t_delta = t_delta.to(s.tdev)
        t_best = torch.full((n,), -float("inf"), device=s.tdev)

        def torch_call():
            with frozen(net):
                return torch_pgd_step(net, x, y, t_delta, t_delta, t_best)
        # same work: the new iterate of both implementations (sign steps agree except at gradient ties)
        d_jax = np.asarray(variants[0].call()[0])
        d_torch = torch_call()[0].permute(0, 2, 3, 1).cpu().numpy()
        variants[0].info["same_iterate_as_torch"] = float(np.mean(np.abs(d_jax - d_torch) < 1e-6))
        variants.insert(1, Variant("torch", torch_synced(torch_call, s.tdev)))
    return variants


def row_train_step(s: Setup, with_torch: bool, switch_off: bool) -> list[Variant]:
    import jax
    from robust_flat import xla
    from robust_flat.attacks.pgd import PGDConfig
    from robust_flat.training.optim import make_optimizer
    from robust_flat.training.pgd_at import train_step
    from robust_flat.training.state import create_train_state

    opt_cfg = types.SimpleNamespace(name="sgd", lr=0.05, schedule="constant", weight_decay=5e-4, momentum=0.9,
                                    nesterov=True)
    tx = make_optimizer(opt_cfg, steps_per_epoch=1, epochs=1)
    step = functools.partial(train_step, apply_fn=s.apply_fn, tx=tx, attack=PGDConfig(), fraction=1.0, augment=True)
    batch = {"image": jax.numpy.asarray(s.images_u8), "label": jax.numpy.asarray(s.y)}

    def fresh_state():
        copy_ = lambda t: jax.tree.map(jax.numpy.copy, t)  # noqa: E731 -- donated buffers must not be shared
        return create_train_state(copy_(s.params), copy_(s.model_state), tx, jax.random.key_data(jax.random.key(0)))

    variants = []
    runs = [("jax", True, step)] + ([("jax_switch_off", False, step)] if switch_off else [])
    if s.bf16:  # bfloat16 compute, float32 params / optimizer / BN statistics (config.model.dtype="bfloat16")
        from robust_flat.models import create_model, make_apply_fn
        bf16_fn = make_apply_fn(create_model(s.name, dtype="bfloat16"))
        runs.append(("jax_bf16", True, functools.partial(train_step, apply_fn=bf16_fn, tx=tx, attack=PGDConfig(),
                                                         fraction=1.0, augment=True)))
    for name, on, step in runs:
        holder = {"state": fresh_state(), "i": 0}
        with fast_conv(on):
            compiled, lo, co, ynn = _compile(xla.jit(step, donate_argnums=(0,)), holder["state"], batch,
                                             jax.random.key(0))

        def call(compiled=compiled, holder=holder):
            holder["i"] += 1
            holder["state"], metrics = compiled(holder["state"], batch, jax.random.key(holder["i"]))
            return _block((holder["state"], metrics))
        variants.append(Variant(name, call, lo, co, "lower()+compile()", info={"ynn": ynn}))
    if with_torch:
        import torch
        import torch.nn.functional as F
        net = copy.deepcopy(s.net)
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
        gen = s.generator()

        def torch_call():  # from the uint8 batch on the device, as the JAX step takes it
            x = torch_augment(torch_images(s.tu8), gen)
            net.eval()
            with frozen(net):
                x_adv = torch_pgd(net, x, s.ty, 7, gen)
            net.train()
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(x_adv), s.ty)
            loss.backward()
            opt.step()
            return loss.item()  # synchronizes
        variants.insert(1, Variant("torch", torch_call))
    return variants


def row_apgd_ce(s: Setup, with_torch: bool, switch_off: bool) -> list[Variant]:
    import jax
    from robust_flat.attacks.apgd import APGDConfig, apgd

    x, y, key, cfg = jax.numpy.asarray(s.x), jax.numpy.asarray(s.y_pred), jax.random.key(0), APGDConfig()
    # light warm-up: 10 iterations run the same compiled chunks (the host loop compiles per chunk length, not per
    # n_iter) on the same batch
    light = dataclasses.replace(cfg, n_iter=2 * cfg.unroll)
    variants = [Variant("jax", lambda: _block(apgd(s.f, x, y, key, cfg)), compile_method="first call - median",
                        warm=lambda: _block(apgd(s.f, x, y, key, light)))]
    if with_torch:
        from pyautoattack.autopgd_base import APGDAttack

        def make(n_iter):
            attack = APGDAttack(s.net, n_iter=n_iter, norm="Linf", n_restarts=1, eps=EPS, seed=0, loss="ce",
                                eot_iter=1, rho=0.75, device=s.tdev)

            def torch_call():
                with frozen(s.net):
                    return attack.perturb(s.tx, s.ty_pred)
            return torch_synced(torch_call, s.tdev)
        variants.append(Variant("torch", make(100), warm=make(light.n_iter)))
    return variants


def row_flatness_avg(s: Setup, with_torch: bool, switch_off: bool) -> list[Variant]:
    import jax
    from robust_flat import flatness
    from robust_flat.weights.neighbourhood import Neighbourhood

    cfg = flatness.AverageCaseConfig(neighbourhood=Neighbourhood(xi=FLATNESS_XI), samples=FLATNESS_K,
                                     distribution="sphere", batch_size=s.batch_size)
    zero_ref = np.zeros(s.batch_size)  # the reference (PGD-20 x 10 restarts) is not part of this row

    def jax_call(config=cfg):
        return flatness.average_case(s.logits_fn, s.params, s.model_state, s.x, s.y, jax.random.key(0), config,
                                     reference=zero_ref).perturbed
    # light warm-up: one weight sample runs the same compiled per-sample unit (CPU strategy "loop")
    light = dataclasses.replace(cfg, samples=1)
    variants = [Variant("jax", jax_call, compile_method="first call - median",
                        warm=functools.partial(jax_call, light))]
    if with_torch:
        gen = s.generator()
        variants.append(Variant("torch", torch_synced(lambda: torch_flatness(s.net, s.tx, s.ty, gen), s.tdev),
                                warm=torch_synced(lambda: torch_flatness(s.net, s.tx, s.ty, gen, samples=1), s.tdev)))
    return variants


def row_hvp(s: Setup, with_torch: bool, switch_off: bool) -> list[Variant]:
    import jax
    from robust_flat import hessian

    op = hessian.HessianOperator(s.logits_fn, s.params, s.model_state, s.x, s.y,
                                 hessian.HessianConfig(batch_size=s.batch_size))
    v = jax.random.normal(jax.random.key(0), (op.dim,))
    variant = Variant("jax", lambda: _block(op.matvec(v)), compile_method="first call - median")
    try:  # the operator's own jitted HVP (private name: fall back to the first-call estimate if it moves)
        xb, yb, wb, _ = op._batches[0]
        _, lo, co, ynn = _compile(hessian._hvp_jit, s.logits_fn, op.selected, op.rest, s.model_state, xb, yb, wb, v)
        variant.lower_s, variant.compile_s, variant.compile_method = lo, co, "lower()+compile()"
        variant.info["ynn"] = ynn
    except Exception as e:  # noqa: BLE001
        variant.info["compile_error"] = repr(e)
    variant.info["dim"] = op.dim
    variants = [variant]
    if with_torch:
        import torch
        params = [p for p in s.net.parameters() if p.dim() >= 2]
        gen = s.generator()
        tv = [torch.randn(p.shape, generator=gen, device=s.tdev) for p in params]

        def torch_call():
            with frozen(s.net, keep=params):
                return torch_hvp(s.net, s.tx, s.ty, params, tv)
        variants.append(Variant("torch", torch_synced(torch_call, s.tdev),
                                info={"dim": int(sum(p.numel() for p in params))}))
    return variants


ROW_BUILDERS = {"pgd_step": row_pgd_step, "train_step": row_train_step, "apgd_ce": row_apgd_ce,
                "flatness_avg": row_flatness_avg, "hvp": row_hvp}


# ------------------------------------------------------------------------------------------------ driver
def run_row(s: Setup, row: str, repeats: int, warmup: int, with_torch: bool, switch_off: bool, peak: float,
            log, light_warmup: bool, compiles, min_time: float = 0.0) -> dict:
    """``compiles``: an entered :class:`robust_flat.xla.CompileCounter`. ``min_time`` > 0: each timing sample runs
    the call back to back ``inner`` times (enough for ``min_time`` seconds, from one untimed calibration call) and
    records the mean, so that millisecond calls on an accelerator are not timed one dispatch at a time."""
    load_before = os.getloadavg()[0]
    if with_torch and s.tdev != "cpu":
        import torch
        torch.cuda.reset_peak_memory_stats()
    variants = ROW_BUILDERS[row](s, with_torch, switch_off)
    light = {v.name: light_warmup and v.warm is not None for v in variants}
    warm_compiles, timed_compiles = {}, {v.name: 0 for v in variants}
    for v in variants:  # untimed warm-up (the first JAX call includes compilation where not done above)
        c0 = compiles.snapshot()
        for i in range(warmup):
            t = _timed(v.warm if light[v.name] else v.call)
            if i == 0:
                v.first_call_s = t
            gc.collect()
        c1 = compiles.snapshot()
        warm_compiles[v.name] = (c1[0] - c0[0], c1[1] - c0[1])
        if light[v.name]:
            log(f"  {s.name} {row} {v.name} light warm-up: {v.first_call_s:.3f} s")
    inner = {v.name: 1 for v in variants}
    if min_time > 0:
        for v in variants:
            if not light[v.name]:  # a light warm-up stands for a call too long to repeat (and to calibrate with)
                inner[v.name] = max(1, min(1000, math.ceil(min_time / max(_timed(v.call), 1e-6))))

    def sample(v):
        t = time.perf_counter()
        for _ in range(inner[v.name]):
            v.call()
        return (time.perf_counter() - t) / inner[v.name]

    for r in range(repeats):
        for v in variants:
            time.sleep(0.2)  # let the other framework's worker threads go idle
            c0 = compiles.snapshot()[0]
            v.times.append(sample(v))
            timed_compiles[v.name] += compiles.snapshot()[0] - c0
            log(f"  {s.name} {row} {v.name} repeat {r + 1}/{repeats}: {v.times[-1]:.4f} s"
                + (f" (mean of {inner[v.name]})" if inner[v.name] > 1 else ""))
        gc.collect()
    work_gflop = WORK_F[row] * 2 * s.macs * s.batch_size / 1e9
    out_variants = {}
    for v in variants:
        med = float(np.median(v.times))
        compile_s = v.compile_s if v.compile_s is None or v.lower_s is None else v.lower_s + v.compile_s
        method = v.compile_method
        if light[v.name] and v.name != "torch":  # the warm-up did less work: time XLA's compiles instead
            compile_s, method = warm_compiles[v.name][1], "XLA compile events in the light warm-up"
        elif method == "first call - median" and v.first_call_s is not None:
            compile_s = max(v.first_call_s - med, 0.0)
        out_variants[v.name] = {
            "n": len(v.times), "times_s": [float(t) for t in v.times], "median_s": med,
            "min_s": float(min(v.times)), "max_s": float(max(v.times)),
            "images_per_s": s.batch_size / med, "gflops": work_gflop / med,
            "pct_peak": 100.0 * work_gflop / med / peak,
            "first_call_s": v.first_call_s, "light_warmup": light[v.name], "lower_s": v.lower_s,
            "compile_s": compile_s if v.name != "torch" else None,
            "compile_method": method if v.name != "torch" else None,
            "xla_compiles_warmup": warm_compiles[v.name][0], "xla_compile_s_warmup": warm_compiles[v.name][1],
            "xla_compiles_timed": timed_compiles[v.name], "calls_per_sample": inner[v.name], **v.info}
    result = {"model": s.name, "row": row, "batch_size": s.batch_size, "work_F_per_image": WORK_F[row],
              "gflop_per_call": work_gflop, "variants": out_variants, "load_avg_1min_before": load_before,
              "load_avg_1min_after": os.getloadavg()[0], "process_peak_rss_mb": peak_rss_mb(),
              "device_memory": device_memory(s.tdev if with_torch else "cpu")}
    if "torch" in out_variants:
        result["jax_over_torch"] = out_variants["jax"]["median_s"] / out_variants["torch"]["median_s"]
    if "jax_switch_off" in out_variants:
        result["switch_off_over_on"] = out_variants["jax_switch_off"]["median_s"] / out_variants["jax"]["median_s"]
    if "jax_bf16" in out_variants:
        result["bf16_over_fp32"] = out_variants["jax_bf16"]["median_s"] / out_variants["jax"]["median_s"]
    return result


def _pairs(spec: str) -> set:
    return {tuple(p.split(":", 1)) if ":" in p else ("*", p) for p in spec.split(",") if p and p != "none"}


def _matches(pairs: set, model: str, row: str) -> bool:
    return (model, row) in pairs or ("*", row) in pairs


def parse_repeats(spec: str, models) -> dict:
    if "=" not in spec:
        return {m: int(spec) for m in models}
    out = {m: 1 for m in models}
    for part in spec.split(","):
        k, v = part.split("=")
        out[k.strip()] = int(v)
    return out


def _sec(t: float) -> str:
    """Seconds with 3 decimals, or 3 significant digits below 0.1 s (millisecond calls on an accelerator)."""
    return f"{t:.3f}" if t >= 0.1 else f"{t:.3g}"


def format_table(result: dict) -> str:
    head = (f"{'model':<10} {'row':<13} {'variant':<15} {'n':>2} {'median s':>9} {'min':>8} {'max':>8} "
            f"{'img/s':>8} {'GFLOP/s':>8} {'%peak':>6} {'compile s':>9} {'JAX/torch':>9}")
    lines = [head, "-" * len(head)]
    for row in result["rows"]:
        for name, v in row["variants"].items():
            ratio = ""
            if name == "jax" and "jax_over_torch" in row:
                ratio = f"{row['jax_over_torch']:.2f}"
            elif name == "jax_switch_off":
                ratio = f"(off/on {row['switch_off_over_on']:.2f})"
            elif name == "jax_bf16":
                ratio = f"(bf16 {row['bf16_over_fp32']:.2f})"
            comp = "" if v["compile_s"] is None else f"{v['compile_s']:.1f}"
            lines.append(f"{row['model']:<10} {row['row']:<13} {name:<15} {v['n']:>2} {_sec(v['median_s']):>9} "
                         f"{_sec(v['min_s']):>8} {_sec(v['max_s']):>8} {v['images_per_s']:>8.1f} {v['gflops']:>8.1f} "
                         f"{v['pct_peak']:>5.0f}% {comp:>9} {ratio:>9}")
    return "\n".join(lines)


def markdown_table(result: dict) -> str:
    """The results as a Markdown table (what benchmarks/README.md shows)."""
    lines = ["| model | row | variant | n | median s | min s | max s | img/s | GFLOP/s | % peak | compile s | "
             "JAX/torch | load (1 min) | peak RSS MB |", "|" + "---|" * 14]
    for row in result["rows"]:
        for name, v in row["variants"].items():
            ratio = ""
            if name == "jax" and "jax_over_torch" in row:
                ratio = f"**{row['jax_over_torch']:.2f}**"
            elif name == "jax_switch_off":
                ratio = f"off/on {row['switch_off_over_on']:.2f}"
            elif name == "jax_bf16":
                ratio = f"bf16/fp32 {row['bf16_over_fp32']:.2f}"
            comp = "" if v.get("compile_s") is None else f"{v['compile_s']:.1f}"
            if comp and v.get("compile_method") != "lower()+compile()":
                comp += "*"
            load = f"{row['load_avg_1min_before']:.1f}-{row['load_avg_1min_after']:.1f}"
            lines.append(f"| {row['model']} | {row['row']} | {name} | {v['n']} | {_sec(v['median_s'])} | "
                         f"{_sec(v['min_s'])} | {_sec(v['max_s'])} | {v['images_per_s']:.1f} | {v['gflops']:.1f} | "
                         f"{v['pct_peak']:.0f}% | {comp} | {ratio} | {load} | {row['process_peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--repeats", default="5", help="N, or per model: small_cnn=5,resnet18=2")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls per variant before timing (>= 1)")
    ap.add_argument("--light-warmup", action="store_true",
                    help="warm up the APGD and flatness rows with a cheaper call that compiles the same programs "
                         "(10 APGD iterations, 1 weight sample) instead of a full call; the compile time is then "
                         "read from XLA's compile events. For ResNet-18 on a CPU, where one call takes 10-25 min")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--out", default="benchmarks/results/latest.json")
    ap.add_argument("--no-torch", action="store_true", help="JAX variants only")
    ap.add_argument("--append", action="store_true",
                    help="merge into an existing --out file: its rows for other (model, row) pairs are kept, its "
                         "run metadata goes to meta['previous_runs']")
    ap.add_argument("--skip", default=DEFAULT_SKIP, help="model:row pairs (or rows) not to run; 'none' for none")
    ap.add_argument("--switch-off", default=DEFAULT_SWITCH_OFF,
                    help="model:row pairs (or rows) that also run with the XLA:CPU conv switch off; 'none' for none")
    ap.add_argument("--torch-threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--torch-device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="where the PyTorch references run; auto: CUDA when JAX runs on a GPU")
    ap.add_argument("--bf16", action="store_true",
                    help="train_step also runs JAX with bfloat16 compute and float32 params (variant jax_bf16; "
                         "bf16_over_fp32 = its median / the float32 median)")
    ap.add_argument("--min-time", type=float, default=-1.0,
                    help="seconds per timing sample: shorter calls are repeated back to back and averaged "
                         "(-1: 0 on a CPU, 0.5 on an accelerator)")
    ap.add_argument("--matmul-size", type=int, default=4096)
    ap.add_argument("--matmul-repeats", type=int, default=5)
    ap.add_argument("--report", metavar="JSON", help="print the Markdown table of a saved result and exit")
    args = ap.parse_args(argv)
    if args.report:
        with open(args.report) as fh:
            print(markdown_table(json.load(fh)))
        return None

    rows = [r for r in args.rows.split(",") if r]
    models = [m for m in args.models.split(",") if m]
    bad = [r for r in rows if r not in ROWS] + [m for m in models if m not in MODELS]
    if bad:
        raise SystemExit(f"unknown rows/models {bad}; rows: {', '.join(ROWS)}; models: {', '.join(MODELS)}")
    if args.warmup < 1 or args.batch_size < 1:
        raise SystemExit("--warmup and --batch-size must be >= 1")
    repeats = parse_repeats(args.repeats, models)
    skip, switch_off = _pairs(args.skip), _pairs(args.switch_off)
    with_torch = not args.no_torch

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    import jax
    import jaxlib
    import flax
    from robust_flat import xla
    backend = jax.default_backend()
    min_time = args.min_time if args.min_time >= 0 else (0.0 if backend == "cpu" else 0.5)
    if backend != "cpu":  # the switch only sets XLA:CPU options: off and on compile the same program
        switch_off = set()
    meta = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "numpy": np.__version__, "jax": jax.__version__,
            "jaxlib": jaxlib.__version__, "flax": flax.__version__, "jax_backend": jax.default_backend(),
            "fast_cpu_conv": xla.fast_cpu_conv_enabled(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "load_avg_start": os.getloadavg(), "batch_size": args.batch_size, "warmup": args.warmup,
            "light_warmup": args.light_warmup, "min_time_s": min_time,
            "device_kind": jax.devices()[0].device_kind, "device_count": jax.device_count(),
            "repeats": repeats, "work_F_per_image": WORK_F, "argv": sys.argv[1:] if argv is None else list(argv)}
    if with_torch:
        import torch
        if args.torch_threads > 0:
            torch.set_num_threads(args.torch_threads)
        meta["torch"], meta["torch_threads"] = torch.__version__, torch.get_num_threads()
        meta["torch_device"] = tdev = torch_device(args.torch_device, backend)
        if tdev == "cuda":  # best settings: cuDNN picks its fastest algorithms; TF32 as XLA's default precision
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            meta["torch_cuda"] = {"device": torch.cuda.get_device_name(0), "cudnn_benchmark": True,
                                  "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32, "matmul_allow_tf32": True}
        torch.manual_seed(0)
    else:
        tdev = "cpu"

    def peak_gflops():
        if backend == "cpu":
            return matmul_gflops(args.matmul_size, args.matmul_repeats)
        return device_matmul_gflops(max(args.matmul_size, 8192), args.matmul_repeats)
    log(f"matmul peak ({backend}) ...")
    mm_start = peak_gflops()
    peak = mm_start["median_gflops"]
    meta["matmul_peak"] = {"start": mm_start, "used_for_pct_peak_gflops": peak}
    log(f"  {peak:.1f} GFLOP/s")

    result = {"meta": meta, "rows": []}
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    kept = []
    if args.append and os.path.exists(args.out):
        with open(args.out) as fh:
            old = json.load(fh)
        new_pairs = {(m, r) for m in models for r in rows if not _matches(skip, m, r)}
        kept = [r for r in old.get("rows", []) if (r["model"], r["row"]) not in new_pairs]
        previous = old.get("meta", {})
        for r in kept:  # rows of a run that did not record its date / peak per row
            r.setdefault("run_date_utc", previous.get("date_utc"))
            r.setdefault("matmul_peak_gflops", previous.get("matmul_peak", {}).get("used_for_pct_peak_gflops"))
        meta["previous_runs"] = previous.pop("previous_runs", []) + [previous]
        for name, info in previous.get("models", {}).items():
            meta.setdefault("models", {})[name] = info
    result["rows"] = list(kept)

    def save():  # atomic: an interrupted run leaves the previous file, never half of one
        atomic_write_json(args.out, result, indent=1)

    with xla.CompileCounter() as compiles:
        for name in models:
            todo = [r for r in rows if not _matches(skip, name, r)]
            if not todo:
                continue
            log(f"setup {name} (batch {args.batch_size}) ...")
            s = Setup(name, args.batch_size, with_torch, tdev, bf16=args.bf16)
            meta.setdefault("models", {})[name] = {"forward_gmac_per_image": s.macs / 1e9,
                                                   "twin_max_logit_diff": s.twin_check}
            for row in todo:
                log(f"row {name} {row} ...")
                res = run_row(s, row, repeats[name], args.warmup, with_torch, _matches(switch_off, name, row), peak,
                              log, light_warmup=args.light_warmup, compiles=compiles, min_time=min_time)
                res["run_date_utc"], res["matmul_peak_gflops"] = meta["date_utc"], peak
                result["rows"].append(res)
                save()
            del s
            gc.collect()
    meta["skipped"] = sorted(f"{m}:{r}" for m in models for r in rows if _matches(skip, m, r))
    mm_end = peak_gflops()
    meta["matmul_peak"]["end"] = mm_end
    meta["load_avg_end"] = os.getloadavg()
    save()
    print(f"# {meta['date_utc']}  {meta['cpu_model']}, {meta['cpu_count']} cores, load avg (1/5/15 min) start "
          f"{'/'.join(f'{l:.1f}' for l in meta['load_avg_start'])}, end "
          f"{'/'.join(f'{l:.1f}' for l in meta['load_avg_end'])}")
    print(f"# {mm_start.get('what', f'numpy {args.matmul_size}^2 float32 matmul')}: {peak:.1f} GFLOP/s at start, "
          f"{mm_end['median_gflops']:.1f} at end (% peak uses the start value); batch {args.batch_size}; JAX on "
          f"{meta['device_kind']}, PyTorch on {tdev}")
    print(format_table(result))
    print(f"# wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
