"""Average-case flatness speed: robust-flat (JAX) vs a PyTorch reference of the same algorithm, plus the three
strategies for evaluating K weight perturbations.

    python -m benchmarks.flatness_speed [--samples 2] [--n 128] [--rounds 3] [--strategy-n 32] [--strategy-samples 4]
        [--strategy-chunks 2,5] [--strategy-model small_cnn|resnet18] [--skip-comparison | --skip-strategies]
        [--torch-device auto|cpu|cuda]

Workload (both frameworks, eval mode, the small CNN ``small_cnn``: conv 32-32-pool-64-64-pool, dense 4096-128-10,
591k parameters, identical weights): for each of K samples draw one layer-wise relative perturbation on the sphere
(nu_l = 0.5 ||w_l|| g/||g||, every conv/dense kernel and bias; one nu per sample for all examples, as the released
code), then for each batch of 128 run PGD-20 (L-inf 8/255, signed step 0.007, uniform-norm random start, box + eps
projection, per-example best iterate) on the perturbed model and take the mean cross-entropy at the result. The
reference (unperturbed PGD-20 x 10 restarts) is not timed. The paper's full measure is 10 samples x 1000 images,
i.e. (10 / K) x (1000 / N) times the timed work. JAX: ``robust_flat.flatness.average_case`` (reference passed in,
so it is skipped), strategy "loop" unless stated. PyTorch: eager, frozen parameters, ``torch.autograd.grad``
w.r.t. the input, channels_last (the faster layout on this CPU); ``--torch-nchw`` for NCHW.

Runs are interleaved in one process (JAX, torch, JAX, torch, ...) and medians reported; the machine is shared and
timings are noisy (up to ~1.7x between identical runs on the shared 2-core VM).

Measured once with the defaults (2-core VM shared with other jobs, load average ~10; jax 0.10.2, torch 2.13 CPU):
K=2 x 128 images: JAX 38.9 s, torch (channels_last) 53.2 s, JAX/torch 0.73 (medians of 3); JAX first call 87.6 s
(compile). Strategies, K=4 x 32 images: loop 17.6 s, chunked(2) 32.7 s, vmap 42.7 s (medians of 2).

The issue's size on a quiet machine (2026-11-26, same VM, nothing else running, numpy matmul ~155 GFLOP/s;
``--samples 10 --n 1000 --rounds 1 --skip-strategies``): JAX 319.1 s vs torch 196.7 s (1.62); after the
first-maximum max-pool JVP, JAX 333.1 s vs torch 226.6 s (1.47); after the weight sampler became a program of its
own (2026-11-26), JAX 306.3 s vs torch 194.4 s (1.58). JAX is slower here: the contended figure above (0.73) came
from PyTorch losing more than XLA under CPU contention, and XLA:CPU's convolutions trail PyTorch's oneDNN ones on
this CPU (benchmarks/README.md).

On one NVIDIA H200 (2026-11-26, jax 0.11.2, torch 2.11 on CUDA with cuDNN autotuning): the issue's size, JAX 0.62 s
vs torch 3.53 s (0.17). Strategies, K=10 x 128 images, medians of 3: ResNet-18 loop 0.464 s, chunked(2) 0.604 s,
chunked(5) 0.532 s, vmap 0.529 s; small CNN loop 0.085 s, chunked(2) 0.079 s, chunked(5) 0.068 s, vmap 0.061 s
(``results/flatness_speed_gpu_h200.json``).
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from robust_flat import flatness as F
from robust_flat.io import atomic_write_json
from robust_flat.attacks.pgd import PGDConfig
from robust_flat.models import create_model, init_model, make_logits_fn
from robust_flat.models.layers import CIFAR10_MEAN, CIFAR10_STD
from robust_flat.weights import Neighbourhood

XI, EPS, STEP, STEPS = 0.5, 8 / 255, 0.007, 20


# ------------------------------------------------------------------------------------------------ PyTorch reference
def torch_model(jax_params, channels_last: bool):
    import torch
    import torch.nn as tnn

    class SmallCNN(tnn.Module):
        def __init__(self):
            super().__init__()
            self.convs = tnn.ModuleList([tnn.Conv2d(3, 32, 3, padding=1), tnn.Conv2d(32, 32, 3, padding=1),
                                         tnn.Conv2d(32, 64, 3, padding=1), tnn.Conv2d(64, 64, 3, padding=1)])
            self.fc1 = tnn.Linear(8 * 8 * 64, 128)
            self.logits = tnn.Linear(128, 10)
            self.register_buffer("mean", torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(CIFAR10_STD).view(1, 3, 1, 1))

        def forward(self, x):
            x = (x.clamp(0, 1) - self.mean) / self.std
            for i, conv in enumerate(self.convs):
                x = torch.relu(conv(x))
                if i % 2 == 1:
                    x = torch.nn.functional.max_pool2d(x, 2)
            x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)  # (h, w, c) order, as the Flax model flattens
            return self.logits(torch.relu(self.fc1(x)))

    m = SmallCNN().eval()
    with torch.no_grad():
        for i, conv in enumerate(m.convs):
            p = jax_params[f"conv{i + 1}"]
            conv.weight.copy_(torch.from_numpy(np.asarray(p["kernel"]).transpose(3, 2, 0, 1).copy()))
            conv.bias.copy_(torch.from_numpy(np.array(p["bias"])))
        for name in ("fc1", "logits"):
            getattr(m, name).weight.copy_(torch.from_numpy(np.asarray(jax_params[name]["kernel"]).T.copy()))
            getattr(m, name).bias.copy_(torch.from_numpy(np.array(jax_params[name]["bias"])))
    for p in m.parameters():
        p.requires_grad_(False)
    if channels_last:
        m = m.to(memory_format=torch.channels_last)
    return m


def torch_pgd(model, x, y, gen):
    import torch
    ce = torch.nn.CrossEntropyLoss(reduction="none")
    n, dev = x.shape[0], x.device
    g = torch.randn(x.shape, generator=gen, device=dev)
    g = g / g.abs().flatten(1).max(dim=1).values.view(-1, 1, 1, 1)
    delta = EPS * torch.rand(n, generator=gen, device=dev).view(-1, 1, 1, 1) * g
    best_delta, best_loss = delta.clone(), torch.full((n,), -float("inf"), device=dev)
    for i in range(STEPS + 1):
        delta = torch.clamp(torch.clamp(delta, -x, 1 - x), -EPS, EPS).requires_grad_(True)
        losses = ce(model(x + delta), y)
        better = losses.detach() > best_loss
        best_loss = torch.where(better, losses.detach(), best_loss)
        best_delta = torch.where(better.view(-1, 1, 1, 1), delta.detach(), best_delta)
        if i == STEPS:
            break
        (grad,) = torch.autograd.grad(losses.sum(), delta)
        delta = delta.detach() + STEP * grad.sign()
    return (x + best_delta).detach()


def torch_average_case(model, x, y, samples, batch_size, seed, channels_last, device="cpu"):
    """Mean over samples of the dataset-mean CE at PGD-20 on the perturbed model (one nu per sample). Images are
    copied to ``device`` batch by batch inside the timed call, as the JAX side receives host arrays."""
    import torch
    gen = torch.Generator(device=device).manual_seed(seed)
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    values = []
    for _ in range(samples):
        with torch.no_grad():
            for n, p in model.named_parameters():
                w = originals[n]
                d = torch.randn(w.shape, generator=gen, device=w.device)
                p.copy_(w + XI * w.norm() * d / d.norm())
        losses = []
        for s in range(0, len(x), batch_size):
            xb = torch.from_numpy(x[s:s + batch_size]).to(device).permute(0, 3, 1, 2).contiguous()
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yb = torch.from_numpy(y[s:s + batch_size]).long().to(device)
            x_adv = torch_pgd(model, xb, yb, gen)
            with torch.no_grad():
                losses.append(torch.nn.functional.cross_entropy(model(x_adv), yb, reduction="none"))
        values.append(torch.cat(losses).mean().item())
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(originals[n])
    return float(np.mean(values))


# ------------------------------------------------------------------------------------------------ JAX
def jax_config(samples, batch_size, strategy, chunk_size=2):
    return F.AverageCaseConfig(neighbourhood=Neighbourhood(xi=XI), samples=samples, distribution="sphere",
                               attack=PGDConfig(eps=EPS, step_size=STEP, steps=STEPS), nu_per="dataset",
                               batch_size=batch_size, strategy=strategy, chunk_size=chunk_size)


def jax_average_case(logits_fn, params, x, y, config, seed, model_state=None):
    r = F.average_case(logits_fn, params, {} if model_state is None else model_state, x, y,
                       jax.random.PRNGKey(seed), config, reference=np.zeros(len(x)))
    return r.perturbed_mean


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def compare_strategies(args, result):
    """The K-strategies on ``args.strategy_model`` (JAX only): same keys, so the same losses up to float error."""
    model = create_model(args.strategy_model)
    params, model_state = init_model(model, jax.random.PRNGKey(0), (1, 32, 32, 3))
    logits_fn = make_logits_fn(model)
    rng = np.random.default_rng(1)
    xs = rng.uniform(0, 1, (args.strategy_n, 32, 32, 3)).astype(np.float32)
    ys = rng.integers(0, 10, args.strategy_n).astype(np.int32)
    strategies = {"loop": jax_config(args.strategy_samples, args.strategy_n, "loop")}
    for c in args.strategy_chunks:
        strategies[f"chunked({c})"] = jax_config(args.strategy_samples, args.strategy_n, "chunked", c)
    strategies["vmap"] = jax_config(args.strategy_samples, args.strategy_n, "vmap")
    first, times, values = {}, {k: [] for k in strategies}, {}
    for name, cfg in strategies.items():
        first[name], values[name] = timed(lambda: jax_average_case(logits_fn, params, xs, ys, cfg, 0, model_state))
        print(f"  {name}: first call {first[name]:.1f} s", flush=True)
    for _ in range(args.strategy_rounds):
        for name, cfg in strategies.items():
            t, v = timed(lambda: jax_average_case(logits_fn, params, xs, ys, cfg, 0, model_state))
            times[name].append(t)
            assert abs(v - values[name]) < 1e-3 * max(1.0, abs(values[name])), (name, v, values[name])
    print(f"strategies ({args.strategy_model}, K={args.strategy_samples} samples x PGD-20 on {args.strategy_n} "
          f"images, median of {args.strategy_rounds}):")
    for name in strategies:
        print(f"  {name:11s} {statistics.median(times[name]):7.3f} s   first call {first[name]:6.1f} s   "
              f"loss {values[name]:.5f}")
    result["strategies"] = {k: {"median_s": statistics.median(v), "times_s": v, "first_call_s": first[k],
                                "loss": values[k]} for k, v in times.items()}
    result["strategy_setup"] = {"model": args.strategy_model, "samples": args.strategy_samples,
                                "n": args.strategy_n, "rounds": args.strategy_rounds,
                                "jax_device": jax.devices()[0].device_kind}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--strategy-n", type=int, default=32)
    p.add_argument("--strategy-samples", type=int, default=4)
    p.add_argument("--strategy-rounds", type=int, default=2)
    p.add_argument("--strategy-chunks", default="2", help="comma list of weight samples per call of the chunked "
                   "strategy, one row each")
    p.add_argument("--strategy-model", default="small_cnn", choices=("small_cnn", "resnet18"))
    p.add_argument("--skip-comparison", action="store_true", help="only the strategies (JAX)")
    p.add_argument("--skip-strategies", action="store_true")
    p.add_argument("--torch-nchw", action="store_true")
    p.add_argument("--torch-device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA when JAX runs on a GPU (cuDNN autotuning on)")
    p.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = p.parse_args(argv)
    try:
        args.strategy_chunks = [int(v) for v in args.strategy_chunks.split(",") if v.strip()]
    except ValueError:
        p.error(f"--strategy-chunks: comma list of positive integers, got {args.strategy_chunks!r}")
    if any(c < 1 for c in args.strategy_chunks):
        p.error(f"--strategy-chunks: chunk sizes must be >= 1, got {args.strategy_chunks}")
    result = {} if args.skip_comparison else compare_frameworks(args)
    if not args.skip_strategies:
        compare_strategies(args, result)
    if args.out:
        atomic_write_json(args.out, result, indent=2)
    return result


def compare_frameworks(args) -> dict:
    """JAX (strategy "loop") vs the PyTorch reference on the small CNN, interleaved rounds."""
    import torch

    model = create_model("small_cnn")
    params, _ = init_model(model, jax.random.PRNGKey(0), (1, 32, 32, 3))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: jnp.asarray(np.asarray(a) + 0.01 * rng.normal(size=a.shape), jnp.float32),
                          params)  # non-zero biases, so every layer is perturbed
    logits_fn = make_logits_fn(model)
    x = rng.uniform(0, 1, (args.n, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, args.n).astype(np.int32)
    channels_last = not args.torch_nchw
    from benchmarks.run import torch_device
    dev = torch_device(args.torch_device, jax.default_backend())
    if dev == "cuda":
        torch.backends.cudnn.benchmark = True
    tmodel = torch_model(params, channels_last).to(dev)
    with torch.no_grad():
        t_logits = tmodel(torch.from_numpy(x[:8]).to(dev).permute(0, 3, 1, 2)).cpu().numpy()
    diff = float(np.abs(t_logits - np.asarray(logits_fn(params, {}, x[:8]))).max())
    print(f"torch threads {torch.get_num_threads()}, torch device {dev}, jax backend {jax.default_backend()} "
          f"({jax.devices()[0].device_kind}), max |logit difference| {diff:.2e}")

    config = jax_config(args.samples, args.batch_size, "loop")
    nb = min(args.batch_size, args.n)  # one batch compiles every shape the timed calls use
    t_first, _ = timed(lambda: jax_average_case(logits_fn, params, x[:nb], y[:nb], config, 0))
    print(f"JAX first call on {nb} images (compile + run): {t_first:.1f} s")
    t_warm, _ = timed(lambda: torch_average_case(tmodel, x[:nb], y[:nb], 1, args.batch_size, 0, channels_last, dev))
    print(f"torch warm-up, one sample on {nb} images (untimed below): {t_warm:.1f} s")
    jt, tt, jv, tv = [], [], [], []
    for r in range(args.rounds):
        t, v = timed(lambda: jax_average_case(logits_fn, params, x, y, config, r + 1))
        jt.append(t), jv.append(v)
        t, v = timed(lambda: torch_average_case(tmodel, x, y, args.samples, args.batch_size, r, channels_last, dev))
        tt.append(t), tv.append(v)
        print(f"round {r}: JAX {jt[-1]:.2f} s (loss {jv[-1]:.3f}), torch {tt[-1]:.2f} s (loss {tv[-1]:.3f})")
    full = (10 / args.samples) * (1000 / args.n)
    result = {"samples": args.samples, "n": args.n, "batch_size": args.batch_size, "rounds": args.rounds,
              "jax_median_s": statistics.median(jt), "torch_median_s": statistics.median(tt),
              "jax_over_torch": statistics.median(jt) / statistics.median(tt), "jax_first_call_one_batch_s": t_first,
              "full_measure_factor": full, "torch_layout": "channels_last" if channels_last else "nchw",
              "torch_device": dev, "jax_device": jax.devices()[0].device_kind,
              "jax_losses": jv, "torch_losses": tv}
    print(f"median: JAX {result['jax_median_s']:.2f} s, torch {result['torch_median_s']:.2f} s, "
          f"JAX/torch = {result['jax_over_torch']:.2f} (the paper's 10 x 1000 measure is {full:.0f}x this work)")
    return result


if __name__ == "__main__":
    main()
