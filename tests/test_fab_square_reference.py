"""FAB-T and Square against the original PyTorch AutoAttack code (``pyautoattack``), on the same tiny model and images.

Skipped without torch / pyautoattack. The PyTorch model is a copy of ``create_model("small_cnn", channels=(8, 16),
hidden=32)`` with the trained Flax weights. To stay within the test budget, the attacks run with reduced settings
(FAB-T: 2 targets x 20 iterations; Square: 300 queries) on 96 images. Set ``ROBUST_FLAT_FULL_REFERENCE=1`` for the
AutoAttack "standard" settings (FAB-T: 9 targets x 100 iterations) on 128 images. That takes many minutes on a
2-core CPU.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pyautoattack")
from pyautoattack.fab_projections import projection_l2, projection_linf  # noqa: E402
from pyautoattack.fab_pt import FABAttack_PT  # noqa: E402
from pyautoattack.square import SquareAttack  # noqa: E402

from robust_flat.attacks.fab import FABConfig, fab, project_hyperplane_box  # noqa: E402
from robust_flat.attacks.square import SquareConfig, _eta_rectangle, eta_pattern, square  # noqa: E402
from robust_flat.models.layers import CIFAR10_MEAN, CIFAR10_STD  # noqa: E402
from toy_task import make_data, toy_logits_fn, trained_model  # noqa: E402

FULL = os.environ.get("ROBUST_FLAT_FULL_REFERENCE", "0") not in ("", "0")
N = 128 if FULL else 96
FAB_ITER, FAB_TARGETS = (100, 9) if FULL else (20, 2)
EPS = {"linf": 4 / 255, "l2": 0.3}
SQUARE_EPS = {"linf": 4 / 255, "l2": 0.6}  # L2 Square with 300 queries is weak: a larger radius gives a real test
TORCH_NORM = {"linf": "Linf", "l2": "L2"}


class TorchSmallCNN(torch.nn.Module):
    """``SmallCNN(channels=(8, 16), hidden=32)`` in PyTorch, NCHW, weights copied from the Flax params."""

    def __init__(self, params):
        super().__init__()
        p = {k: {n: torch.from_numpy(np.array(v, np.float32)) for n, v in d.items()} for k, d in params.items()}
        chans = [3, 8, 8, 16, 16]
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(chans[i], chans[i + 1], 3, padding=1) for i in range(4))
        self.fc1 = torch.nn.Linear(p["fc1"]["kernel"].shape[0], 32)
        self.out = torch.nn.Linear(32, 10)
        with torch.no_grad():
            for i, conv in enumerate(self.convs, start=1):
                conv.weight.copy_(p[f"conv{i}"]["kernel"].permute(3, 2, 0, 1))  # HWIO -> OIHW
                conv.bias.copy_(p[f"conv{i}"]["bias"])
            self.fc1.weight.copy_(p["fc1"]["kernel"].T)
            self.fc1.bias.copy_(p["fc1"]["bias"])
            self.out.weight.copy_(p["logits"]["kernel"].T)
            self.out.bias.copy_(p["logits"]["bias"])
        self.register_buffer("mean", torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(CIFAR10_STD).view(1, 3, 1, 1))

    def forward(self, x):
        h = (x.clamp(0.0, 1.0) - self.mean) / self.std
        for i, conv in enumerate(self.convs):
            h = torch.relu(conv(h))
            if i % 2 == 1:
                h = torch.nn.functional.max_pool2d(h, 2)
        h = h.permute(0, 2, 3, 1).flatten(1)  # Flax flattens NHWC
        return self.out(torch.relu(self.fc1(h)))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """PyTorch's intra-op threads fight JAX's for the 2 cores: one thread is ~10x faster here. Restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pair():
    _, params, _ = trained_model()
    net = TorchSmallCNN(params).eval()
    x, y = make_data(N, seed=11)
    return toy_logits_fn(), net, x, y


def _to_torch(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _broken_torch(net, x_adv_nchw, y):
    with torch.no_grad():
        return net(x_adv_nchw).argmax(1).numpy() != y


def _broken_jax(f, x_adv, y):
    return np.asarray(jnp.argmax(f(jnp.asarray(x_adv)), axis=1)) != y


def test_torch_copy_has_the_same_logits(pair):
    f, net, x, _ = pair
    with torch.no_grad():
        z_torch = net(_to_torch(x)).numpy()
    z_jax = np.asarray(f(jnp.asarray(x)))
    assert np.abs(z_torch - z_jax).max() <= 5e-5 * max(1.0, np.abs(z_jax).max())


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_projection_matches_the_original(norm):
    rng = np.random.default_rng(1)
    rows, dim = 64, 768
    t = rng.uniform(0, 1, (rows, dim)).astype(np.float32)
    t[:, :100] = rng.integers(0, 2, (rows, 100))  # coordinates on the box faces
    w = rng.normal(size=(rows, dim)).astype(np.float32)
    w[:, ::9] = 0.0
    scale = rng.choice([0.01, 0.1, 1.0], rows)  # from near the hyperplane to unreachable
    b = ((w * t).sum(1) + rng.normal(size=rows) * np.abs(w).sum(1) * scale).astype(np.float32)
    original = {"linf": projection_linf, "l2": projection_l2}[norm]
    d_torch = original(torch.from_numpy(t), torch.from_numpy(w), torch.from_numpy(b)).numpy()
    d_jax = np.asarray(jax.jit(project_hyperplane_box, static_argnames="norm")(t, w, b, norm=norm))
    np.testing.assert_allclose(d_jax, d_torch, atol=2e-5)


def test_eta_pattern_matches_the_original():
    attack = SquareAttack(lambda v: v, norm="L2", eps=1.0, device="cpu")
    for rows, cols in [(3, 6), (2, 5), (14, 29), (1, 3)]:
        np.testing.assert_allclose(_eta_rectangle(rows, cols), attack.eta_rectangles(rows, cols).numpy(), atol=1e-6)
    for s in (3, 6, 29):
        ref = attack.eta(s).numpy()  # randomly transposed by the original
        ours = eta_pattern(s)
        assert np.allclose(ours, ref, atol=1e-6) or np.allclose(ours.T, ref, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_t_agrees_with_the_original(pair, norm):
    f, net, x, y = pair
    eps = EPS[norm]
    x_jax = np.asarray(fab(f, x, y, jax.random.PRNGKey(0),
                           FABConfig(eps=eps, norm=norm, n_iter=FAB_ITER, n_target_classes=FAB_TARGETS)))
    attack = FABAttack_PT(net, norm=TORCH_NORM[norm], n_restarts=1, n_iter=FAB_ITER, eps=eps, targeted=True,
                          n_target_classes=FAB_TARGETS, device="cpu")
    x_torch = attack.perturb(_to_torch(x), torch.from_numpy(y.astype(np.int64)))
    broken_jax, broken_torch = _broken_jax(f, x_jax, y), _broken_torch(net, x_torch, y)
    assert 0.2 < broken_jax.mean() < 0.9  # a regime where the attack matters
    # FAB-T is deterministic (one restart, no random start): up to float noise the two agree point by point
    assert abs(broken_jax.mean() - broken_torch.mean()) <= 0.03
    assert np.mean(broken_jax != broken_torch) <= 0.05


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_square_agrees_with_the_original(pair, norm):
    f, net, x, y = pair
    eps = SQUARE_EPS[norm]
    x_jax = np.asarray(square(f, x, y, jax.random.PRNGKey(0), SquareConfig(eps=eps, norm=norm, n_queries=300)))
    attack = SquareAttack(net, norm=TORCH_NORM[norm], n_queries=300, eps=eps, p_init=0.8, n_restarts=1, seed=0,
                          device="cpu")
    x_torch = attack.perturb(_to_torch(x), torch.from_numpy(y.astype(np.int64)))
    broken_jax, broken_torch = _broken_jax(f, x_jax, y), _broken_torch(net, x_torch, y)
    assert 0.1 < broken_jax.mean() < 0.9
    # random search with different random streams: robust accuracy agrees within a few points
    assert abs(broken_jax.mean() - broken_torch.mean()) <= 0.07
