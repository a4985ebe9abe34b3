"""The benchmark rows: which work each row times, on which model and data (:class:`Setup`), as a list of
:class:`benchmarks.harness.Variant` (JAX, PyTorch, [JAX with the XLA:CPU switch off], [JAX bfloat16]). The rows are
described in :mod:`benchmarks.run` and benchmarks/README.md."""
from __future__ import annotations

import copy
import dataclasses
import functools
import types

import numpy as np

from benchmarks.harness import Variant, _block, _compile, fast_conv, forward_macs

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
EPS, PGD_STEP = 8 / 255, 0.007
FLATNESS_K, FLATNESS_XI = 10, 0.5


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
            from benchmarks.torch_reference import torch_images
            from robust_flat import torch_twins
            self.net = torch_twins.twin(name, self.model, params, model_state).to(memory_format=torch.channels_last)
            self.twin_check = torch_twins.max_logit_difference(self.net, self.f, self.x[:16])  # on the CPU
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
        from benchmarks.torch_reference import frozen, torch_pgd_step, torch_synced
        import torch
        net, x, y = s.net, s.tx, s.ty
        t_delta = torch.from_numpy(np.array(delta)).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
        t_delta = t_delta.to(s.tdev)
        t_best = torch.full((n,), -float("inf"), device=s.tdev)

        def torch_call():
            with frozen(net):
                return torch_pgd_step(net, x, y, t_delta, t_delta, t_best, EPS, PGD_STEP)
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
        from benchmarks.torch_reference import frozen, torch_augment, torch_images, torch_pgd
        import torch
        import torch.nn.functional as F
        net = copy.deepcopy(s.net)
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
        gen = s.generator()

        def torch_call():  # from the uint8 batch on the device, as the JAX step takes it
            x = torch_augment(torch_images(s.tu8), gen)
            net.eval()
            with frozen(net):
                x_adv = torch_pgd(net, x, s.ty, 7, gen, EPS, PGD_STEP)
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
        from benchmarks.torch_reference import frozen, torch_synced
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
        from benchmarks.torch_reference import torch_flatness, torch_synced
        gen = s.generator()
        variants.append(Variant("torch", torch_synced(lambda: torch_flatness(s.net, s.tx, s.ty, gen, FLATNESS_K, FLATNESS_XI, EPS, PGD_STEP), s.tdev),
                                warm=torch_synced(lambda: torch_flatness(s.net, s.tx, s.ty, gen, 1, FLATNESS_XI, EPS, PGD_STEP), s.tdev)))
    return variants


def row_hvp(s: Setup, with_torch: bool, switch_off: bool) -> list[Variant]:
    import jax
    from robust_flat import hessian

    op = hessian.HessianOperator(s.logits_fn, s.params, s.model_state, s.x, s.y,
                                 hessian.HessianConfig(batch_size=s.batch_size))
    v = jax.random.normal(jax.random.key(0), (op.dim,))
    variant = Variant("jax", lambda: _block(op.matvec(v)), compile_method="first call - median")
    try:  # the operator's own jitted HVP (private name: fall back to the first-call estimate if it moves)
        b = op._batches[0]
        _, lo, co, ynn = _compile(hessian._hvp_jit, s.logits_fn, op.selected, op.rest, s.model_state, b.x, b.y, b.mask,
                                  v)
        variant.lower_s, variant.compile_s, variant.compile_method = lo, co, "lower()+compile()"
        variant.info["ynn"] = ynn
    except Exception as e:  # noqa: BLE001
        variant.info["compile_error"] = repr(e)
    variant.info["dim"] = op.dim
    variants = [variant]
    if with_torch:
        from benchmarks.torch_reference import frozen, torch_hvp, torch_synced
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
