"""PyTorch checkpoints -> robust-flat models (robust_flat.torch_import, experiments.import_torch), and back.

Each published architecture is rebuilt here in PyTorch with the state-dict names of its original (Stutz et al.'s
``models.ResNet``, RobustBench's ``ResNet``, ``PreActResNet``, ``WideResNet``), small enough to run in seconds, with
random weights and non-trivial BN statistics; the imported Flax model must give the same eval-mode logits.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn as tnn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from robust_flat import torch_import as ti  # noqa: E402
from robust_flat.models import create_model, init_model, make_apply_fn, make_logits_fn  # noqa: E402
from robust_flat.models.layers import CIFAR10_MEAN, CIFAR10_STD  # noqa: E402
from robust_flat.models.wide_resnet import WideResNet  # noqa: E402

TOL = 1e-4
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_DIFF = {}  # architecture -> max |logit difference|, printed at the end (pytest -s)


# ------------------------------------------------------------------------------- PyTorch architectures
class StutzReBN(tnn.Module):
    """``common.torch.ReparameterizedBatchNorm2d``: scale ``1 + weight``."""

    def __init__(self, c):
        super().__init__()
        self.weight, self.bias = tnn.Parameter(torch.zeros(c)), tnn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self.momentum, self.eps = None, 1e-5

    def forward(self, x):
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training:
            self.num_batches_tracked += 1
            if momentum is None:  # cumulative average
                momentum = 1.0 / float(self.num_batches_tracked)
        return F.batch_norm(x, self.running_mean, self.running_var, 1 + self.weight, self.bias, self.training,
                            momentum, self.eps)


class StutzNormalize(tnn.Module):
    def __init__(self):
        super().__init__()
        self.weight, self.bias = tnn.Parameter(torch.ones(3)), tnn.Parameter(torch.zeros(3))

    def forward(self, x):
        return (x - self.bias.view(1, -1, 1, 1)) / self.weight.view(1, -1, 1, 1)


def _norm(kind, c):
    return StutzReBN(c) if kind == "rebn" else tnn.BatchNorm2d(c)


class StutzBlock(tnn.Module):
    def __init__(self, c_in, c_out, stride, downsample, norm):
        super().__init__()
        self.conv1 = tnn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.norm1 = _norm(norm, c_out)
        self.conv2 = tnn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.norm2 = _norm(norm, c_out)
        self.downsample = downsample

    def forward(self, x):
        out = self.norm2(self.conv2(torch.relu(self.norm1(self.conv1(x)))))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class StutzResNet(tnn.Module):
    """Stutz et al.'s ``models.ResNet`` (``Classifier``: clamp, optional whiten; conv1 with bias; '%s1' % norm)."""

    def __init__(self, width=16, blocks=(2, 2, 2, 2), n_class=10, norm="rebn", whiten=True):
        super().__init__()
        self.whiten = StutzNormalize() if whiten else None
        self.conv1 = tnn.Conv2d(3, width, 3, 1, 1, bias=True)
        self.norm_name = f"{norm}1"
        setattr(self, self.norm_name, _norm(norm, width))
        c_in = width
        for i, n in enumerate(blocks):
            c_out, stride = width * 2 ** i, 2 if i > 0 else 1
            down = None
            if stride != 1 or c_in != c_out:
                down = tnn.Sequential(tnn.Conv2d(c_in, c_out, 1, stride, bias=True), _norm(norm, c_out))
            seq = [StutzBlock(c_in, c_out, stride, down, norm)] + [StutzBlock(c_out, c_out, 1, None, norm)
                                                                  for _ in range(1, n)]
            setattr(self, f"block{i}", tnn.Sequential(*seq))
            c_in = c_out
        self.n_blocks = len(blocks)
        self.logits = tnn.Linear(c_in, n_class)

    def forward(self, x):
        x = torch.clamp(torch.clamp(x, min=0), max=1)
        if self.whiten is not None:
            x = self.whiten(x)
        x = torch.relu(getattr(self, self.norm_name)(self.conv1(x)))
        for i in range(self.n_blocks):
            x = getattr(self, f"block{i}")(x)
        return self.logits(F.adaptive_avg_pool2d(x, 1).flatten(1))


class MuSigma(tnn.Module):
    """RobustBench's zoo wrappers: ``mu``/``sigma`` buffers, ``(x - mu) / sigma`` before the network."""

    def add_mu_sigma(self, mean, std):
        self.register_buffer("mu", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("sigma", torch.tensor(std).view(1, 3, 1, 1))

    def normalize(self, x):
        return (x - self.mu) / self.sigma if hasattr(self, "mu") else x


class RBBlock(tnn.Module):
    def __init__(self, c_in, c, stride):
        super().__init__()
        self.conv1 = tnn.Conv2d(c_in, c, 3, stride, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(c)
        self.conv2 = tnn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = tnn.BatchNorm2d(c)
        self.shortcut = tnn.Sequential()
        if stride != 1 or c_in != c:
            self.shortcut = tnn.Sequential(tnn.Conv2d(c_in, c, 1, stride, bias=False), tnn.BatchNorm2d(c))

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class RBResNet(MuSigma):
    """RobustBench's ``ResNet(BasicBlock, [2, 2, 2, 2])`` with a width parameter."""

    def __init__(self, width=16, n_class=10):
        super().__init__()
        self.conv1 = tnn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(width)
        c_in = width
        for i in range(4):
            c = width * 2 ** i
            setattr(self, f"layer{i + 1}", tnn.Sequential(RBBlock(c_in, c, 1 if i == 0 else 2), RBBlock(c, c, 1)))
            c_in = c
        self.linear = tnn.Linear(c_in, n_class)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        for i in range(4):
            out = getattr(self, f"layer{i + 1}")(out)
        return self.linear(F.avg_pool2d(out, 4).flatten(1))


class RBPreActBlock(tnn.Module):
    """``PreActBlock`` (v2=False: shortcut on the raw input) / ``PreActBlockV2`` (v2=True: on the activation)."""

    def __init__(self, c_in, c, stride, v2):
        super().__init__()
        self.v2 = v2
        self.bn1 = tnn.BatchNorm2d(c_in)
        self.conv1 = tnn.Conv2d(c_in, c, 3, stride, 1, bias=False)
        self.bn2 = tnn.BatchNorm2d(c)
        self.conv2 = tnn.Conv2d(c, c, 3, 1, 1, bias=False)
        if stride != 1 or c_in != c:
            self.shortcut = tnn.Sequential(tnn.Conv2d(c_in, c, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out if self.v2 else x) if hasattr(self, "shortcut") else x
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class RBPreActResNet(MuSigma):
    def __init__(self, width=16, n_class=10, v2=False, bn_before_fc=False):
        super().__init__()
        self.bn_before_fc = bn_before_fc
        self.conv1 = tnn.Conv2d(3, width, 3, 1, 1, bias=False)
        c_in = width
        for i in range(4):
            c = width * 2 ** i
            setattr(self, f"layer{i + 1}", tnn.Sequential(RBPreActBlock(c_in, c, 1 if i == 0 else 2, v2),
                                                         RBPreActBlock(c, c, 1, v2)))
            c_in = c
        if bn_before_fc:
            self.bn = tnn.BatchNorm2d(c_in)
        self.linear = tnn.Linear(c_in, n_class)

    def forward(self, x):
        out = self.conv1(self.normalize(x))
        for i in range(4):
            out = getattr(self, f"layer{i + 1}")(out)
        if self.bn_before_fc:
            out = F.relu(self.bn(out))
        return self.linear(F.avg_pool2d(out, 4).flatten(1))


class RBWideBlock(tnn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.bn1 = tnn.BatchNorm2d(c_in)
        self.conv1 = tnn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = tnn.BatchNorm2d(c_out)
        self.conv2 = tnn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.equal = c_in == c_out
        self.convShortcut = None if self.equal else tnn.Conv2d(c_in, c_out, 1, stride, 0, bias=False)

    def forward(self, x):
        if not self.equal:
            x = F.relu(self.bn1(x))
            out = x
        else:
            out = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return (x if self.equal else self.convShortcut(x)) + out


class RBNetworkBlock(tnn.Module):
    def __init__(self, n, c_in, c_out, stride):
        super().__init__()
        self.layer = tnn.Sequential(*[RBWideBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1)
                                      for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class RBWideResNet(MuSigma):
    def __init__(self, depth=16, widen_factor=2, n_class=10, sub_block1=True):
        super().__init__()
        n = (depth - 4) // 6
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = tnn.Conv2d(3, ch[0], 3, 1, 1, bias=False)
        self.block1 = RBNetworkBlock(n, ch[0], ch[1], 1)
        if sub_block1:
            self.sub_block1 = RBNetworkBlock(n, ch[0], ch[1], 1)
        self.block2 = RBNetworkBlock(n, ch[1], ch[2], 2)
        self.block3 = RBNetworkBlock(n, ch[2], ch[3], 2)
        self.bn1 = tnn.BatchNorm2d(ch[3])
        self.fc = tnn.Linear(ch[3], n_class)

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(self.normalize(x)))))
        return self.fc(F.avg_pool2d(F.relu(self.bn1(out)), 8).flatten(1))


# ------------------------------------------------------------------------------------------- helpers
def images(n=8, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (n, 32, 32, 3)).astype(np.float32)


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def randomize(net, seed=0):
    """Random weights (BN affine too) and BN running statistics from train-mode forwards (cumulative average)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (tnn.BatchNorm2d, StutzReBN)):
                m.weight.normal_(0.0 if isinstance(m, StutzReBN) else 1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
                m.momentum = None
            elif isinstance(m, (tnn.Conv2d, tnn.Linear)) and m.bias is not None:
                m.bias.normal_(0.0, 0.1)
        net.train()
        for s in range(3):
            net(nchw(images(16, seed=100 + s)))
    return net.eval()


def torch_logits(net, x):
    with torch.no_grad():
        return net(nchw(x)).numpy()


def flax_logits(model, params, model_state, x):
    return np.asarray(make_logits_fn(model)(params, model_state, x))


def save(net_or_sd, path, wrap=None):
    sd = net_or_sd.state_dict() if isinstance(net_or_sd, tnn.Module) else net_or_sd
    torch.save(wrap(sd) if wrap else sd, path)
    return str(path)


def check_import(name, net, arch, tmp_path, **kw):
    path = save(net, tmp_path / f"{name}.pt")
    sd, _ = ti.read_checkpoint(path)
    imp = ti.import_torch(sd, arch, **kw)
    x = images()
    diff = float(np.abs(torch_logits(net, x) - flax_logits(imp.model, imp.params, imp.model_state, x)).max())
    MAX_DIFF[name] = diff
    assert diff < TOL, (name, diff)
    return imp


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if MAX_DIFF:
        print("\nmax |logits PyTorch - logits Flax|: "
              + ", ".join(f"{k} {v:.1e}" for k, v in sorted(MAX_DIFF.items())))


# ----------------------------------------------------------------------------------- imports, per arch
@pytest.mark.parametrize("norm,whiten", [("rebn", True), ("bn", False)])
def test_stutz_resnet(tmp_path, norm, whiten):
    net = StutzResNet(width=16, norm=norm, whiten=whiten)
    if whiten:
        with torch.no_grad():
            net.whiten.bias.copy_(torch.tensor(CIFAR10_MEAN))
            net.whiten.weight.copy_(torch.tensor(CIFAR10_STD))
    imp = check_import(f"resnet18_stutz_{norm}{'_whiten' if whiten else ''}", randomize(net), "resnet18_stutz",
                       tmp_path)
    assert imp.model_config["norm"] == norm and imp.model_config["width"] == 16
    if whiten:
        assert np.allclose(imp.model_config["whiten_mean"], CIFAR10_MEAN, atol=1e-6)
    else:  # the original clamps to [0, 1] only
        assert imp.model_config["whiten_mean"] == (0, 0, 0) and imp.model_config["whiten_std"] == (1, 1, 1)
    # inputs outside the box: both clamp
    x = images() * 3 - 1
    assert np.abs(torch_logits(net, x) - flax_logits(imp.model, imp.params, imp.model_state, x)).max() < TOL


@pytest.mark.parametrize("mu_sigma", [False, True])
def test_robustbench_resnet18(tmp_path, mu_sigma):
    net = RBResNet(width=16)
    if mu_sigma:
        net.add_mu_sigma([0.4914, 0.4822, 0.4465], [0.2471, 0.2435, 0.2616])
    imp = check_import(f"resnet18{'_mu_sigma' if mu_sigma else ''}", randomize(net), "resnet18", tmp_path)
    assert imp.model_config["conv_bias"] is False and imp.model_config["whiten"] is mu_sigma


@pytest.mark.parametrize("v2,bn_before_fc,mu_sigma", [(False, False, True), (True, True, False),
                                                      (False, True, False)])
def test_robustbench_preact_resnet18(tmp_path, v2, bn_before_fc, mu_sigma):
    """Wong2020Fast (PreActBlock, no bn, mu/sigma), Rice2020OverfittingNetL2-like (V2 + bn), and V1 + bn."""
    net = RBPreActResNet(width=16, v2=v2, bn_before_fc=bn_before_fc)
    if mu_sigma:
        net.add_mu_sigma([0.4914, 0.4822, 0.4465], [0.2471, 0.2435, 0.2616])
    randomize(net)
    name = f"preact_resnet18_{'v2' if v2 else 'v1'}{'_bn' if bn_before_fc else ''}"
    if v2 == bn_before_fc:  # the zoo's pairing: inferred
        imp = check_import(name, net, "preact_resnet18", tmp_path)
    else:  # a pairing the zoo does not have: told explicitly; the inferred one gives other logits
        imp = check_import(name, net, "preact_resnet18", tmp_path, preact_shortcut="activation" if v2 else "input")
        wrong = ti.import_torch(ti.read_checkpoint(save(net, tmp_path / "w.pt"))[0], "preact_resnet18")
        x = images()
        assert np.abs(torch_logits(net, x) - flax_logits(wrong.model, wrong.params, wrong.model_state, x)).max() > 1e-2
    assert imp.model_config["final_norm"] is bn_before_fc
    assert imp.model_config["shortcut_from"] == ("activation" if v2 else "input")


@pytest.mark.parametrize("widen_factor", [1, 2])
def test_robustbench_wide_resnet(tmp_path, widen_factor):
    """WRN-16-k with RobustBench's names (sub_block1 present and ignored); k=1 has identity shortcuts in stage 1."""
    net = randomize(RBWideResNet(depth=16, widen_factor=widen_factor))
    sd, _ = ti.read_checkpoint(save(net, tmp_path / "wrn.pt"))
    assert any(k.startswith("sub_block1.") for k in sd)
    model = WideResNet(depth=16, widen_factor=widen_factor, norm="bn", whiten=False)
    params, model_state = ti.from_torch_state_dict(sd, model, "wrn")
    x = images()
    diff = float(np.abs(torch_logits(net, x) - flax_logits(model, params, model_state, x)).max())
    MAX_DIFF[f"wrn16_{widen_factor}"] = diff
    assert diff < TOL
    # the same state dict is not a WRN-28-10: the error names the keys and what the checkpoint looks like
    with pytest.raises(ti.TorchImportError, match=r"missing: .*block1\.layer\.2\..*WideResNet-16-" + str(widen_factor)):
        ti.import_torch(sd, "wrn28_10")


def test_wrong_arch_and_shapes_are_errors(tmp_path):
    rb = RBResNet(width=16).state_dict()
    with pytest.raises(ti.TorchImportError, match=r"unexpected: .*bn1.*ResNet \(post-activation\).*arch resnet18"):
        ti.import_torch(rb, "preact_resnet18")
    with pytest.raises(ti.TorchImportError, match=r"no classifier logits.weight .*\(arch resnet18\)"):
        ti.import_torch(rb, "resnet18_stutz")
    stutz = {k: v for k, v in StutzResNet(width=16).state_dict().items() if k != "block1.0.downsample.0.bias"}
    with pytest.raises(ti.TorchImportError, match=r"1 missing: block1.0.downsample.0.bias;.*arch resnet18_stutz"):
        ti.import_torch(stutz, "resnet18_stutz")
    bad = dict(rb)
    bad["layer1.0.conv1.weight"] = torch.zeros(16, 16, 5, 5)
    with pytest.raises(ti.TorchImportError, match=r"another shape: layer1.0.conv1.weight \(16, 16, 5, 5\)"):
        ti.import_torch(bad, "resnet18")
    extra = dict(rb, **{"extra.weight": torch.zeros(3)})
    with pytest.raises(ti.TorchImportError, match="1 unexpected: extra.weight"):
        ti.import_torch(extra, "resnet18")
    # whitening constants in the checkpoint that disagree with the ones asked for
    net = RBResNet(width=16)
    net.add_mu_sigma([0.5] * 3, [0.25] * 3)
    with pytest.raises(ti.TorchImportError, match="whitening constants differ"):
        ti.import_torch(net.state_dict(), "resnet18", whiten="cifar10")
    with pytest.raises(ti.TorchImportError, match="model does not whiten"):
        ti.import_torch(net.state_dict(), "resnet18", whiten="none")
    imp = ti.import_torch(net.state_dict(), "resnet18", whiten="0.5,0.5,0.5/0.25,0.25,0.25")
    assert imp.model_config["whiten_std"] == (0.25, 0.25, 0.25)


def test_wrapped_checkpoints(tmp_path):
    net = randomize(RBResNet(width=8))
    ref, _ = ti.read_checkpoint(save(net, tmp_path / "plain.pt"))
    wrappers = {
        "state_dict_module": lambda sd: {"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3},
        "model": lambda sd: {"model": sd, "model_class": "ResNet", "arguments": {"activation": "relu"}},
        "model_state_dict": lambda sd: {"model_state_dict": sd, "optimizer_state_dict": {"lr": 0.1}},
        "compiled": lambda sd: {"net": {"_orig_mod." + k: v for k, v in sd.items()}},
    }
    for name, wrap in wrappers.items():
        sd, meta = ti.read_checkpoint(save(net, tmp_path / f"{name}.pt", wrap))
        assert sorted(sd) == sorted(ref), name
        assert all(np.array_equal(sd[k], ref[k]) for k in ref), name
    assert meta["stripped_prefixes"] == ["_orig_mod."]
    _, meta = ti.read_checkpoint(str(tmp_path / "model.pt"))
    assert meta["arguments"] == {"activation": "relu"}


# -------------------------------------------------------------------------------------- round trips
def _random_flax(model, seed=0):
    """Perturbed initial weights, BN affine parameters away from their init, and BN running statistics equal to
    the batch statistics of random images (so activations keep a trained network's scale)."""
    # an rbg key and NumPy noise: threefry init and a jax.random draw per leaf compiled a program for every leaf
    # shape (~30 s for the first ResNet-18)
    params, model_state = init_model(model, jax.random.key(seed, impl="rbg"))
    rng = np.random.default_rng(seed + 1)

    def perturb(path, a):
        noise = rng.normal(size=a.shape).astype(np.float32)
        if path[-1].key == "kernel":
            return a * (1 + 0.2 * noise)
        return a + 0.1 * noise

    params = jax.tree_util.tree_map_with_path(perturb, params)
    if model_state:
        _, new = make_apply_fn(model)(params, model_state, images(32, seed=5), train=True)
        # Flax: running = 0.9 old + 0.1 batch
        model_state = jax.tree.map(lambda n, o: (n - 0.9 * o) / 0.1, new, model_state)
    return params, model_state


@pytest.mark.parametrize("case", ["stutz_rebn", "resnet18_bn", "preact_rebn_to_bn", "preact_v1_nofinal", "wrn16_2",
                                  "small_cnn"])
def test_round_trip_flax_torch_flax(tmp_path, case):
    if case == "stutz_rebn":
        model, net = create_model("resnet18", width=8), StutzResNet(width=8)
    elif case == "resnet18_bn":
        model = create_model("resnet18", width=8, norm="bn", conv_bias=False, whiten=False)
        net = RBResNet(width=8)
    elif case == "preact_rebn_to_bn":  # our re-parameterized BN exports as plain BN weights 1 + gamma
        model = create_model("preact_resnet18", width=8)
        net = RBPreActResNet(width=8, v2=True, bn_before_fc=True)
        net.add_mu_sigma(list(CIFAR10_MEAN), list(CIFAR10_STD))
    elif case == "preact_v1_nofinal":
        model = create_model("preact_resnet18", width=8, norm="bn", shortcut_from="input", final_norm=False,
                             whiten=False)
        net = RBPreActResNet(width=8, v2=False, bn_before_fc=False)
    elif case == "wrn16_2":
        model = WideResNet(depth=16, widen_factor=2, norm="bn", whiten=False)
        net = RBWideResNet(16, 2, sub_block1=False)
    else:
        from robust_flat.torch_twins import TorchSmallCNN
        model = create_model("small_cnn")
        net = TorchSmallCNN([32, 64], 128, 10, CIFAR10_MEAN, CIFAR10_STD)
    params, model_state = _random_flax(model)
    sd = ti.to_torch_state_dict(model, params, model_state)
    net.load_state_dict(sd)  # strict: every key of the PyTorch model, nothing else
    net.eval()
    x = images()
    diff = float(np.abs(torch_logits(net, x) - flax_logits(model, params, model_state, x)).max())
    MAX_DIFF[f"export_{case}"] = diff
    assert diff < TOL
    back, _ = ti.read_checkpoint(save(net, tmp_path / "rt.pt"))
    params2, model_state2 = ti.from_torch_state_dict(back, model)
    exact = case != "preact_rebn_to_bn"  # (1 + gamma) - 1 rounds
    for a, b in zip(jax.tree.leaves((params, model_state)), jax.tree.leaves((params2, model_state2))):
        assert a.shape == b.shape
        assert np.array_equal(a, b) if exact else np.allclose(a, b, rtol=0, atol=1e-6)
    assert jax.tree.structure((params, model_state)) == jax.tree.structure((params2, model_state2))
    # numpy export needs no torch and gives the same arrays
    sd_np = ti.to_torch_state_dict(model, params, model_state, numpy=True)
    assert sorted(sd_np) == sorted(sd) and all(np.array_equal(sd_np[k], sd[k].numpy()) for k in sd)


def test_torch_twins_match_the_flax_models():
    from robust_flat import torch_twins

    x = images()
    model = create_model("resnet18", width=8)
    params, model_state = _random_flax(model)
    net = torch_twins.twin("resnet18", model, params, model_state)
    assert torch_twins.max_logit_difference(net, lambda v: flax_logits(model, params, model_state, v), x) < TOL
    model = create_model("small_cnn")
    params, _ = _random_flax(model)
    net = torch_twins.twin("small_cnn", model, params)
    assert torch_twins.max_logit_difference(net, lambda v: flax_logits(model, params, {}, v), x) < TOL


# ----------------------------------------------------------------------------------------------- CLI
def test_cli_writes_a_run_that_load_run_restores(tmp_path, capsys):
    from experiments import import_torch as cli
    from robust_flat.runs import load_run

    net = StutzResNet(width=16)
    with torch.no_grad():
        net.whiten.bias.copy_(torch.tensor(CIFAR10_MEAN))
        net.whiten.weight.copy_(torch.tensor(CIFAR10_STD))
    randomize(net)
    ckpt = save(net, tmp_path / "stutz.pth", lambda sd: {"model": {"module." + k: v for k, v in sd.items()},
                                                          "model_class": "ResNet", "epoch": 150})
    run = str(tmp_path / "run")
    assert cli.main(["--checkpoint", ckpt, "--arch", "resnet18_stutz", "--run-dir", run, "--no-check"]) == 0
    out = capsys.readouterr().out
    assert "experiments.evaluate --run-dir" in out and "experiments.flatness --run-dir" in out
    loaded = load_run(run, "last")
    x = images()
    diff = float(np.abs(torch_logits(net, x) - flax_logits(loaded.model, loaded.params, loaded.model_state, x)).max())
    MAX_DIFF["cli_resnet18_stutz"] = diff
    assert diff < TOL
    with open(os.path.join(run, "config.json")) as f:
        config = json.load(f)
    assert config["method"] == "imported" and config["model"]["name"] == "resnet18"
    assert config["imported"]["arch"] == "resnet18_stutz" and len(config["imported"]["sha256"]) == 64
    assert loaded.ema_params is None and loaded.epoch == 0
    # the same command again: nothing to do
    assert cli.main(["--checkpoint", ckpt, "--arch", "resnet18_stutz", "--run-dir", run]) == 0
    assert "already" in capsys.readouterr().out
    # another checkpoint into the same run directory: refused
    other = save(randomize(StutzResNet(width=16), seed=1), tmp_path / "other.pt")
    assert cli.main(["--checkpoint", other, "--arch", "resnet18_stutz", "--run-dir", run]) == 2
    assert "different config" in capsys.readouterr().err


def _one_line_error(argv, capsys):
    from experiments import import_torch as cli

    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_cli_errors_are_one_line(tmp_path, capsys):
    run = str(tmp_path / "run")
    err = _one_line_error(["--checkpoint", str(tmp_path / "nope.pt"), "--arch", "resnet18", "--run-dir", run], capsys)
    assert "no such file" in err
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    err = _one_line_error(["--checkpoint", str(text), "--arch", "resnet18", "--run-dir", run], capsys)
    assert "not a PyTorch checkpoint" in err
    rb = save(RBResNet(width=8), tmp_path / "rb.pt")
    err = _one_line_error(["--checkpoint", rb, "--arch", "wrn28_10", "--run-dir", run], capsys)
    assert "wrn28_10" in err and "look like a ResNet" in err and "(arch resnet18)" in err
    err = _one_line_error(["--checkpoint", rb, "--arch", "preact_resnet18", "--run-dir", run], capsys)
    assert "does not fit" in err and "unexpected: " in err and "(arch resnet18)" in err
    err = _one_line_error(["--checkpoint", rb, "--arch", "resnet18", "--run-dir", run, "--whiten", "0.5"], capsys)
    assert "--whiten" in err
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pt")
    err = _one_line_error(["--checkpoint", str(tmp_path / "meta.pt"), "--arch", "resnet18", "--run-dir", run],
                          capsys)
    assert "holds no state dict" in err
    assert not os.path.exists(run)  # nothing written on a bad input


def test_cli_error_exit_code_without_traceback(tmp_path):
    """As a process: exit status 2, one line on stderr."""
    r = subprocess.run([sys.executable, "-m", "experiments.import_torch", "--checkpoint", str(tmp_path / "x.pt"),
                        "--arch", "resnet18", "--run-dir", str(tmp_path / "run")], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_module_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import robust_flat.torch_import as ti, experiments.import_torch\n"
            "try:\n    ti.read_checkpoint('setup.cfg')\nexcept ti.TorchImportError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "needs PyTorch" in r.stdout


@pytest.mark.slow
def test_evaluate_and_flatness_run_unchanged_on_an_imported_run(tmp_path):
    """The paper's RobustBench table in two commands: import, then the unchanged CLIs (data injected: offline)."""
    from experiments import evaluate, flatness
    from experiments import import_torch as cli

    net = randomize(RBPreActResNet(width=8, v2=True, bn_before_fc=True))
    run = str(tmp_path / "run")
    assert cli.main(["--checkpoint", save(net, tmp_path / "p.pt"), "--arch", "preact_resnet18", "--run-dir", run]) == 0
    x = images(8, seed=3)
    y = torch_logits(net, x).argmax(1).astype(np.int32)  # all correct: robust accuracy is what the attack leaves
    data = dict(load_eval_set=lambda config, subset, data_dir=None: (x, y))
    res = evaluate.main(["--run-dir", run, "--attack", "pgd", "--pgd-steps", "2", "--pgd-restarts", "1",
                         "--n-examples", "8", "--no-progress"], **data)
    assert res["clean_accuracy"] == 1.0 and os.path.isfile(os.path.join(run, "evaluations", res["name"] + ".json"))
    out = flatness.main(["--run-dir", run, "--measure", "avg", "--samples", "1", "--n-examples", "8",
                         "--pgd-steps", "2", "--reference-restarts", "1", "--no-progress"], **data)
    assert np.isfinite(out["flatness"]) and os.path.isdir(os.path.join(run, "flatness"))
