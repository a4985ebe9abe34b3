"""The PyTorch side of the benchmark rows: the same algorithms as robust-flat's JAX paths, written with torch
(PGD with the paper's defaults, crop/flip augmentation, average-case flatness, Hessian-vector products), and where
they run. Imported only when PyTorch variants are timed."""
from __future__ import annotations

import numpy as np

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


def torch_pgd_step(net, x, y, delta, best_delta, best_loss, eps, step_size):
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


def torch_pgd(net, x, y, steps, gen, eps, step_size):
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


def torch_flatness(net, x, y, gen, samples, xi, eps, step_size, steps=20):
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
            x_adv = torch_pgd(net, x, y, steps, gen, eps, step_size)
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
