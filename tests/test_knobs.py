"""The paper's one-option variants: PGD-tau, larger training eps, weight clipping, the cyclic schedule, Adam, and
``python -m experiments.cifar10_at --list``."""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.configs import pgd_at as pgd_at_config
from robust_flat.attacks.pgd import PGDConfig, pgd
from robust_flat.training import pgd_at
from robust_flat.training.config_check import check_config
from tests.toy_task import make_data, toy_logits_fn

SIZE = 16
EPS, STEP, STEPS = 6 / 255, 1.5 / 255, 5


@pytest.fixture(scope="module")
def toy():
    logits_fn = toy_logits_fn(SIZE)
    x, y = make_data(64, SIZE, seed=5)
    return logits_fn, jnp.asarray(x), jnp.asarray(y)


def _run(toy, **kw):
    logits_fn, x, y = toy
    return np.asarray(pgd(logits_fn, x, y, jax.random.PRNGKey(2), PGDConfig(eps=EPS, step_size=STEP, steps=STEPS,
                                                                              **kw)))


def _trajectory(logits_fn, x, y):
    """The iterates x + delta_0 .. x + delta_T of plain PGD (restarts 1, key 2), written out from its pieces."""
    from robust_flat.attacks.common import cross_entropy, init_delta, normalize_gradient, project

    @jax.jit
    def run(x, y):
        key = jax.random.split(jax.random.PRNGKey(2), 1)[0]
        delta = project(init_delta(key, x, EPS, "linf", "uniform_norm"), x, EPS, "linf")
        out = [x + delta]
        for _ in range(STEPS):
            g = jax.grad(lambda d: jnp.sum(cross_entropy(logits_fn(x + d), y)))(delta)
            delta = project(delta + STEP * normalize_gradient(g, "linf"), x, EPS, "linf")
            out.append(x + delta)
        return jnp.stack(out)

    return np.asarray(run(x, y))


def test_pgd_tau_stops_each_example_tau_iterations_after_its_label_flipped(toy):
    logits_fn, x, y = toy
    x_np = np.asarray(x)
    plain = _run(toy)
    iterates = _trajectory(logits_fn, x, y)
    np.testing.assert_allclose(iterates[-1], _run(toy, best_iterate="last"), atol=1e-6)  # the same trajectory
    wrong = np.stack([np.asarray(jnp.argmax(logits_fn(jnp.asarray(it)), -1)) != np.asarray(y) for it in iterates])
    # the toy model is not robust: some examples flip at the start, some later, some never within the budget
    first = np.where(wrong.any(0), wrong.argmax(0), -1)
    assert (first == 0).any() and (first > 0).any() and (first == -1).any(), first
    for tau in (0, 2):
        out = _run(toy, tau=tau)
        assert np.max(np.abs(out - x_np)) <= EPS + 1e-6 and out.min() >= 0.0 and out.max() <= 1.0
        for i in range(len(y)):
            hits = np.flatnonzero(wrong[:, i])  # its misclassified iterates; it stops at the (tau + 1)-th
            expected = iterates[hits[tau]][i] if len(hits) > tau else plain[i]
            np.testing.assert_allclose(out[i], expected, atol=1e-6, err_msg=f"tau {tau}, example {i}")
    # tau beyond the number of iterates: plain PGD, bit for bit
    np.testing.assert_array_equal(_run(toy, tau=STEPS + 1), plain)


def test_pgd_tau_is_selected_by_the_config_and_checked():
    c = pgd_at_config.get_config("tiny")
    assert pgd_at.attack_config(c).tau is None  # default -1: plain PGD
    c.attack.tau = 2
    assert pgd_at.attack_config(c).tau == 2 and check_config(c) == []
    c.attack.tau = -2
    assert any(p.startswith("attack.tau must be an integer >= 0") for p in check_config(c))
    from experiments.configs import trades as trades_config
    t = trades_config.get_config("tiny")
    t.attack.tau = 1
    assert any("TRADES attacks the KL divergence" in p for p in check_config(t))
    with pytest.raises(ValueError, match="PGD-tau needs"):
        PGDConfig(tau=1, best_iterate="batch")


def test_larger_eps_scales_the_step_and_leaves_the_evaluation_radius_alone():
    from experiments.configs import larger_eps
    from robust_flat.attacks.pgd import PAPER_EPS

    c = larger_eps.get_config("tiny")
    attack = pgd_at.attack_config(c)
    base = pgd_at.attack_config(pgd_at_config.get_config("tiny"))
    assert attack.eps == 9 / 255 and base.eps == 8 / 255 == PAPER_EPS
    # the rule (attack.step_rule="scaled"): the 8/255 step scaled with eps; AT's default rule keeps the given step
    assert base.step_size == 0.007 and attack.step_size == pytest.approx(0.007 * 9 / 8)
    assert dataclasses.replace(attack, eps=base.eps, step_size=base.step_size) == base  # nothing else differs
    c.attack.step_size = 0.002
    assert pgd_at.attack_config(c).step_size == pytest.approx(0.002 * 9 / 8)
    c.attack.step_rule = "fixed"  # the released code's: the step as given at every eps
    assert pgd_at.attack_config(c).step_size == 0.002 and pgd_at.attack_config(c).eps == 9 / 255
    c.attack.eps, c.attack.step_rule = 16 / 255, "scaled"
    assert pgd_at.attack_config(c).step_size == pytest.approx(0.004)
    c.attack.step_rule = "sclaed"
    assert any("attack.step_rule" in p for p in check_config(c))
    # the evaluations take their own --eps, 8/255 by default, whatever the run was trained with
    import experiments.evaluate as evaluate
    import experiments.robust_loss as robust_loss
    from experiments.flatness import build_parser

    assert evaluate.build_parser().parse_args(["--run-dir", "r"]).eps == "8/255"
    assert robust_loss.build_parser().parse_args(["--run-dir", "r"]).eps == "8/255"
    assert build_parser().parse_args(["--run-dir", "r", "--measure", "avg"]).eps == 8 / 255


def _tiny_state(tx):
    from robust_flat.models import create_model, make_apply_fn
    from robust_flat.training.state import create_train_state
    from tests.toy_task import _he_init

    model = create_model("small_cnn", channels=(4, 8), hidden=16, norm="none")
    params, model_state = _he_init(model, 0, 8)
    x, y = make_data(8, 8, seed=7)
    batch = {"image": jnp.asarray(np.round(x * 255).astype(np.uint8)), "label": jnp.asarray(y)}
    return make_apply_fn(model), create_train_state(params, model_state, tx, jax.random.PRNGKey(0)), batch


def test_weight_clipping_keeps_every_parameter_in_the_box_after_a_step():
    from robust_flat.training import make_step

    tx = optax.sgd(0.5)
    apply_fn, state, batch = _tiny_state(tx)
    w = 0.01
    assert max(float(jnp.max(jnp.abs(p))) for p in jax.tree.leaves(state.params)) > w  # the step has work to do
    c = pgd_at_config.get_config("tiny")
    c.train.clip_weights = w
    new, _ = jax.jit(make_step(c, apply_fn, tx))(state, batch, jax.random.PRNGKey(1))
    leaves = jax.tree.leaves(new.params)
    assert all(float(jnp.max(jnp.abs(p))) <= w for p in leaves)
    assert sum(int(jnp.sum(jnp.abs(p) == w)) for p in leaves) > 0  # some parameters sit on the box's faces
    c.train.clip_weights = -0.1
    assert any(p.startswith("train.clip_weights must be a number >= 0") for p in check_config(c))


def test_cyclic_schedule_is_a_triangle_from_zero_to_lr_and_back():
    from robust_flat.training.optim import make_schedule

    c = pgd_at_config.get_config("")
    c.optimizer.schedule, c.optimizer.lr, c.optimizer.cycle_epochs = "cyclic", 0.2, 30
    steps_per_epoch = 10
    schedule = make_schedule(c.optimizer, steps_per_epoch, epochs=60)  # two cycles of 300 steps, peak at 150
    expected = {0: 0.0, 75: 0.1, 150: 0.2, 225: 0.1, 300: 0.0, 375: 0.1, 450: 0.2, 599: 0.2 / 150}
    for step, lr in expected.items():
        np.testing.assert_allclose(float(schedule(step)), lr, atol=1e-7, err_msg=f"step {step}")


def test_adam_is_used_when_selected_and_its_state_resumes_exactly(tmp_path, monkeypatch):
    from robust_flat.checkpoint import Checkpointer
    from robust_flat.runs import load_run
    from robust_flat.training.optim import make_optimizer
    from robust_flat.training.trainer import train

    c = pgd_at_config.get_config("tiny")
    c.optimizer.name = "adam"
    tx = make_optimizer(c.optimizer, steps_per_epoch=4, epochs=2)
    zeros = {"w": jnp.zeros(3)}
    updates, _ = tx.update({"w": jnp.asarray([1.0, -2.0, 0.5])}, tx.init(zeros), zeros)
    # Adam's first step is -lr * sign(g) (up to its eps) whatever the gradient's scale; SGD's would be -lr * g
    np.testing.assert_allclose(np.asarray(updates["w"]), -c.optimizer.lr * np.sign([1.0, -2.0, 0.5]), rtol=1e-5)

    def is_adam(s):
        return isinstance(s, optax.ScaleByAdamState)

    c.eval.n_examples, c.eval.early_stopping = 0, False  # no per-epoch evaluation: only the training matters here
    reference = train(c, str(tmp_path / "reference"), progress=False)
    adam = [s for s in jax.tree.leaves(reference.opt_state, is_leaf=is_adam) if is_adam(s)]
    assert len(adam) == 1 and int(adam[0].count) == 16  # the trainer's optimizer is Adam, 16 steps taken

    # killed (in-process: an exception nothing catches) as it writes the rolling checkpoint of step 12, mid-epoch 2;
    # the rerun restores step 9, Adam's moments and count included, and must end where the reference ended
    class Killed(BaseException):
        pass

    real = Checkpointer.save

    def save(self, which, step, state, meta):
        if (which, int(step)) == ("latest", 12):
            raise Killed()
        return real(self, which, step, state, meta)

    run_dir = str(tmp_path / "killed")
    monkeypatch.setattr(Checkpointer, "save", save)
    with pytest.raises(Killed):
        train(c, run_dir, progress=False)
    monkeypatch.setattr(Checkpointer, "save", real)
    assert load_run(run_dir, "last").step == 9
    resumed = train(c, run_dir, progress=False)
    assert int(resumed.step) == 16
    for a, b in zip(jax.tree.leaves((resumed.params, resumed.opt_state)),
                    jax.tree.leaves((reference.params, reference.opt_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_list_prints_every_config_method_and_variant_with_the_paper_values(run_module):
    from experiments.configs.common import VARIANT_OPTIONS, base_config
    from robust_flat.training import METHODS

    base = base_config()
    for path in VARIANT_OPTIONS:  # every documented option is a real field (the list cannot go stale)
        block, field = path.split(".")
        assert field in base[block], path
    proc = run_module("experiments.cifar10_at", "--list")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    flat = " ".join(out.split())  # the descriptions are wrapped
    configs = sorted(f for f in os.listdir("experiments/configs") if f.endswith(".py")
                     and f not in ("__init__.py", "common.py"))
    assert "larger_eps.py" in configs
    for f in configs:
        assert f"  {f}  (method " in out, f
    for m in METHODS:
        assert m in out
    for path, (_, paper) in VARIANT_OPTIONS.items():
        assert f"  {path} = " in out and f"Paper: {paper}." in flat, path
    assert "train.label_smoothing = 0.0" in out and "Paper: tau 0.1, 0.2, 0.3." in flat
    assert "data.label_noise = 0.0" in out and "Paper: tau 0.1, 0.2, 0.3, 0.4, 0.5." in flat
    assert "AT-AWP (Wu et al. 2020) on the paper's AT recipe" in flat  # a summary: the docstring's first sentence
