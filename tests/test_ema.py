"""Weight averaging (EMA) with its own batch-norm statistics: the average's update, the recalibration of its
statistics, its evaluations in the trainer (metrics, early stopping, checkpoints, exact resume), and the one choice
of weights in robust_flat.runs that evaluate/flatness/robust_loss go through."""
import dataclasses
import json
import os
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.configs import pgd_at as pgd_at_config
from flatness_toy import SIZE, make_data, trained
from robust_flat import data as data_lib
from robust_flat import models
from robust_flat.runs import LoadedRun, load_run, select_weights, weights
from robust_flat.training.averaging import recalibrate, reset_batch_stats
from robust_flat.training.state import create_train_state
from robust_flat.training.trainer import train
from robust_flat.training.update import apply_gradients


def _leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


# ------------------------------------------------------------------------------------------------ the average
def test_average_follows_tau_and_with_tau_zero_is_the_current_weights():
    params = {"w": jnp.asarray(np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)), "b": jnp.ones(3)}
    stats = {"batch_stats": {"bn": {"mean": jnp.full(3, 0.3), "var": jnp.full(3, 2.0)}}}
    tx = optax.sgd(0.1)
    state = create_train_state(params, stats, tx, jax.random.PRNGKey(0), ema=True)
    assert _leaves_equal(state.ema_params, params) and _leaves_equal(state.ema_model_state, stats)
    grads = {"w": jnp.asarray(np.arange(6, dtype=np.float32).reshape(2, 3)), "b": jnp.asarray([1.0, -2.0, 0.5])}

    zero = apply_gradients(state, grads, stats, tx, ema_decay=0.0)
    assert _leaves_equal(zero.ema_params, zero.params)  # tau = 0: the average is the current weights, exactly
    assert not _leaves_equal(zero.params, params)

    tau = 0.9
    avg = apply_gradients(state, grads, stats, tx, ema_decay=tau)
    for k in params:  # w_avg <- tau w_avg + (1 - tau) w, from the copy of the initial weights
        expected = tau * np.asarray(params[k]) + (1 - tau) * np.asarray(avg.params[k])
        np.testing.assert_allclose(np.asarray(avg.ema_params[k]), expected, rtol=1e-6)
    off = apply_gradients(state, grads, stats, tx, ema_decay=None)
    assert _leaves_equal(off.ema_params, params)


def test_recalibrated_statistics_equal_a_fresh_pass_computed_independently():
    model, params, model_state = trained("rebn")
    apply_fn = models.make_apply_fn(model)
    rng = np.random.default_rng(3)
    batches = [{"image": rng.integers(0, 256, (8, SIZE, SIZE, 3), dtype=np.uint8)} for _ in range(3)]
    out = recalibrate(apply_fn, params, model_state, batches, jax.random.PRNGKey(1), augment=False)

    # by hand: a fresh layer's statistics (mean 0, variance 1), then one train-mode forward per batch in order
    fresh = jax.tree_util.tree_map_with_path(
        lambda path, a: np.zeros_like(a) if path[-1].key == "mean" else np.ones_like(a), model_state)
    forward = jax.jit(lambda s, x: model.apply({"params": params, **s}, x, train=True, mutable=["batch_stats"])[1])
    expected = fresh
    for b in batches:
        expected = {**expected, **forward(expected, b["image"].astype(np.float32) / 255.0)}
    for a, e in zip(jax.tree.leaves(out), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-6, atol=1e-7)
    assert not _leaves_equal(out, model_state)

    # re-estimated from scratch: whatever statistics go in, the same come out
    other = jax.tree.map(lambda a: a * 3.0 + 1.0, model_state)
    assert _leaves_equal(recalibrate(apply_fn, params, other, batches, jax.random.PRNGKey(1), augment=False), out)
    assert _leaves_equal(reset_batch_stats(other), fresh)
    assert recalibrate(apply_fn, params, {}, batches, jax.random.PRNGKey(1)) == {}  # no batch norm: nothing to do


def test_ema_config_bn_batches_is_checked_and_counted_in_the_evaluation_cost():
    from experiments.configs import ema as ema_config
    from robust_flat.training.config_check import check_config
    from robust_flat.training.monitor import bn_batches, eval_cost

    c = ema_config.get_config("cpu")  # 10,000 training images, batch 128
    assert c.ema.enabled and c.ema.decay == 0.9975 and check_config(c) == []
    plain = ema_config.get_config("cpu")
    plain.ema.enabled = False  # the same evaluation settings, one model
    with_ema, without = eval_cost(c), eval_cost(plain)
    assert bn_batches(c, 10000) == 78  # 0: one pass over the training data
    assert with_ema["curves"] == 2 * without["curves"] and with_ema["early_stopping"] == 2 * without["early_stopping"]
    assert with_ema["ema_bn"] == 0.5 * 78 * 128 and without["ema_bn"] == 0.0
    c.ema.bn_batches = 200
    assert bn_batches(c, 10000) == 200 and eval_cost(c)["ema_bn"] == 0.5 * 200 * 128
    c.ema.bn_batches = -1
    assert check_config(c) == ["ema.bn_batches must be an integer >= 0 (0: one pass over the training data), got -1"]


# ------------------------------------------------------------------------------------------------ the trainer
def _config(decay=0.0):
    c = pgd_at_config.get_config("tiny")
    c.ema.enabled, c.ema.decay = True, decay
    c.eval.n_examples, c.eval.batch_size = 32, 32  # curves and early stopping: one program (PGD-2, batches of 32)
    c.checkpoint.every_steps, c.checkpoint.keep_latest = 3, 10  # rolling checkpoints mid-epoch, all kept
    return c


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("ema") / "run")
    state = train(_config(), run_dir, progress=False)
    return run_dir, jax.device_get(state)


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_averaged_weights_are_evaluated_every_epoch_and_early_stopped(ema_run):
    run_dir, state = ema_run
    lines = _metrics(run_dir)
    assert [r["epoch"] for r in lines] == [1, 2]
    for r in lines:
        for name in ("train", "test"):
            for metric in ("loss", "error", "robust_loss", "robust_error"):
                assert f"{name}_{metric}" in r and f"ema_{name}_{metric}" in r
        assert 0.0 <= r["ema_es_robust_error"] <= 1.0 and r["ema_test_error"] <= r["ema_test_robust_error"]
    # tau = 0: the average is the trained weights (through the whole training step), but it has its own statistics
    assert _leaves_equal(state.ema_params, state.params)
    assert not _leaves_equal(state.ema_model_state, state.model_state)
    # its own early stopping: the snapshot of the epoch with the lowest ema_es_robust_error
    errors = [r["ema_es_robust_error"] for r in lines]
    best = load_run(run_dir, "best_ema")
    assert best.epoch == lines[int(np.argmin(errors))]["epoch"] and best.snapshot == "best_ema"
    assert _leaves_equal(best.params, load_run(run_dir, best.epoch).params)


def test_checkpoints_hold_the_statistics_recalibrated_for_the_average(ema_run):
    run_dir, state = ema_run
    config = _config()
    last = load_run(run_dir, "last")
    assert last.step == 16 and last.ema_bn_step == 16
    params, model_state = weights(last, "ema")
    assert _leaves_equal(params, state.ema_params) and _leaves_equal(model_state, state.ema_model_state)
    # what they are: one pass of clean training batches (epoch 2's order), from fresh statistics
    x, y = data_lib.load_split("synthetic", "train", None, 255.0, **data_lib.synthetic_config(config.data))
    bs = config.train.batch_size
    batches = [data_lib.train_batch(x, y, config.seed, len(x) // bs + i, bs) for i in range(len(x) // bs)]
    expected = recalibrate(models.make_apply_fn(last.model), state.ema_params, state.model_state, batches,
                           jax.random.fold_in(jax.random.PRNGKey(config.seed), 2_000_000 + 2), config.data.augment)
    for a, e in zip(jax.tree.leaves(model_state), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-6, atol=1e-7)
    snap = load_run(run_dir, 1)  # every snapshot has its epoch's statistics
    assert snap.ema_bn_step == snap.step == 8 and not _leaves_equal(weights(snap, "ema")[1], model_state)


def test_resume_with_ema_is_exact(ema_run, tmp_path):
    ref_dir, ref = ema_run
    run_dir = str(tmp_path / "resumed")
    shutil.copytree(ref_dir, run_dir)
    ckpts = os.path.join(run_dir, "checkpoints")
    # as if killed after step 5 (mid-epoch 1): only the rolling checkpoint of step 3 and the initial snapshot exist
    for which in ("latest", "snapshots", "best"):
        for step in os.listdir(os.path.join(ckpts, which)):
            if step.isdigit() and int(step) > (3 if which == "latest" else 0):
                shutil.rmtree(os.path.join(ckpts, which, step))
    assert load_run(run_dir, "last").step == 3
    state = jax.device_get(train(_config(), run_dir, progress=False))
    for field in ("params", "model_state", "opt_state", "ema_params", "ema_model_state"):
        assert _leaves_equal(getattr(state, field), getattr(ref, field)), field
    strip = lambda r: {k: v for k, v in r.items() if k not in ("time_s", "images_per_s")}  # noqa: E731
    assert [strip(r) for r in _metrics(run_dir)] == [strip(r) for r in _metrics(ref_dir)]
    assert load_run(run_dir, "best_ema").epoch == load_run(ref_dir, "best_ema").epoch


def test_weights_refuses_a_run_without_average_or_with_stale_statistics():
    base = dict(model=None, params={"w": 1}, model_state={"s": 1}, config=None, epoch=1, run_dir="r", snapshot="last")
    with pytest.raises(ValueError, match="no weight-averaged parameters"):
        weights(LoadedRun(ema_params=None, step=8, **base), "ema")
    mid = LoadedRun(ema_params={"w": 2}, ema_model_state={"s": 2}, ema_bn_step=8, step=11, **base)
    with pytest.raises(ValueError, match="mid-epoch"):
        weights(mid, "ema")
    assert weights(dataclasses.replace(mid, step=8), "ema") == ({"w": 2}, {"s": 2})
    assert weights(mid, "params") == ({"w": 1}, {"s": 1})
    with pytest.raises(ValueError, match="weights must be one of"):
        weights(mid, "average")


# ------------------------------------------------------------------------------------------------ entry points
def _toy_runs():
    """A toy run with an average whose weights and statistics differ from the trained ones, and the same run with
    the average as its trained weights (what --weights ema must measure)."""
    model, params, model_state = trained("rebn")
    ema_params = jax.tree.map(lambda a: a * 0.9, params)
    ema_state = jax.tree.map(lambda a: a * 1.5 + 0.2, model_state)
    run = types.SimpleNamespace(model=model, params=params, model_state=model_state, ema_params=ema_params,
                                ema_model_state=ema_state, config=None, epoch=3, step=30)
    as_trained = types.SimpleNamespace(**{**vars(run), "params": ema_params, "model_state": ema_state})
    wrong_stats = types.SimpleNamespace(**{**vars(run), "params": ema_params})  # the raw model's statistics
    return run, as_trained, wrong_stats


def test_evaluate_and_flatness_with_ema_weights_use_the_average_and_its_statistics(tmp_path):
    from experiments import evaluate, flatness

    run, as_trained, wrong_stats = _toy_runs()
    assert select_weights(run, "params") is run
    x, y = make_data(16, seed=5)
    data = dict(load_eval_set=lambda cfg, subset, data_dir: (x, y))

    def measure(cli, loaded, argv):
        return cli.main(["--run-dir", str(tmp_path), "--no-progress", *argv], load_run=lambda d, s: loaded, **data)

    ev_args = ["--attack", "pgd", "--pgd-steps", "2", "--pgd-restarts", "1", "--n-examples", "16",
               "--batch-size", "16", "--shape-buckets", "1"]
    ema = measure(evaluate, run, ev_args + ["--weights", "ema"])
    same = measure(evaluate, as_trained, ev_args + ["--name", "as_trained"])
    other = measure(evaluate, wrong_stats, ev_args + ["--name", "wrong_stats"])
    assert ema["name"].endswith("_ema") and ema["weights"] == "ema"
    assert ema["clean_accuracy"] == same["clean_accuracy"] and ema["robust_accuracy"] == same["robust_accuracy"]
    assert ema["clean_accuracy"] != other["clean_accuracy"]

    fl_args = ["--measure", "clean_avg", "--samples", "1", "--n-examples", "16", "--batch-size", "16"]
    ema = measure(flatness, run, fl_args + ["--weights", "ema"])
    same = measure(flatness, as_trained, fl_args + ["--name", "as_trained"])
    other = measure(flatness, wrong_stats, fl_args + ["--name", "wrong_stats"])
    assert ema["use_ema"] and ema["reference"] == same["reference"] and ema["flatness"] == same["flatness"]
    assert ema["reference"] != other["reference"]

    no_average = types.SimpleNamespace(**{**vars(run), "ema_params": None})
    with pytest.raises(SystemExit, match="no weight-averaged parameters"):
        measure(evaluate, no_average, ev_args + ["--weights", "ema", "--name", "none"])
