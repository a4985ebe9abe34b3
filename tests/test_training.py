"""End-to-end training on the ``tiny`` preset: resume after SIGKILL, signals, NaN, config checks (sharding over 2
devices: tests/test_distributed.py)."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments.configs import clean as clean_config
from experiments.configs import pgd_at as pgd_at_config
from robust_flat.checkpoint import CheckpointError
from robust_flat.runs import load_run
from robust_flat.training.trainer import TrainingError, prepare_run_dir, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(run_dir, *overrides, env=None):
    cmd = [sys.executable, "-m", "experiments.cifar10_at", "--config=experiments/configs/pgd_at.py:tiny",
           f"--run-dir={run_dir}", "--no-progress", *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _leaves_equal(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("runs") / "reference")
    state = train(pgd_at_config.get_config("tiny"), run_dir, progress=False)
    return run_dir, jax.device_get(state)


def test_run_directory_layout_and_metrics(reference_run):
    run_dir, state = reference_run
    assert int(state.step) == 16  # 256 examples / batch 32 x 2 epochs
    lines = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [r["epoch"] for r in lines] == [1, 2]
    for key in ("batch_loss", "batch_error", "train_loss", "test_robust_error", "train_robust_loss", "test_error",
                "es_robust_error"):
        assert key in lines[0]
    assert json.load(open(os.path.join(run_dir, "config.json")))["method"] == "pgd_at"
    snaps = sorted(os.listdir(os.path.join(run_dir, "checkpoints", "snapshots")))
    assert snaps == ["0", "1", "2"]
    last = load_run(run_dir, "last")
    assert _leaves_equal(last.params, state.params) and last.step == 16
    best = load_run(run_dir, "best")
    assert best.epoch in (1, 2)
    assert load_run(run_dir, 1).epoch == 1
    with pytest.raises(CheckpointError, match="no snapshot"):
        load_run(run_dir, 7)


def test_sigkill_mid_epoch_then_rerun_resumes_bit_identically(reference_run, tmp_path):
    ref_dir, ref_state = reference_run
    run_dir = str(tmp_path / "killed")
    proc = _cli(run_dir, "--config.debug.sigkill_at_step=7")  # mid-epoch 1 (8 steps per epoch)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL, out
    assert 0 < load_run(run_dir, "last").step < 7  # a rolling checkpoint, not the end
    # the same run again, in this process (its step is compiled by the reference run; rerunning the command itself
    # after a SIGKILL is tests/test_distributed.py's, on two processes)
    train(pgd_at_config.get_config("tiny"), run_dir, progress=False)
    assert "RESUME: step" in open(os.path.join(run_dir, "log.txt")).read()
    resumed = load_run(run_dir, "last")
    reference = load_run(ref_dir, "last")
    assert resumed.step == 16
    assert _leaves_equal(resumed.params, reference.params)
    assert _leaves_equal(resumed.model_state, reference.model_state)
    a = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    b = [json.loads(x) for x in open(os.path.join(ref_dir, "metrics.jsonl"))]
    strip = lambda r: {k: v for k, v in r.items() if k not in ("time_s", "images_per_s")}
    assert [strip(r) for r in a] == [strip(r) for r in b]


def test_ctrl_c_saves_and_exits_cleanly(tmp_path):
    run_dir = str(tmp_path / "interrupted")
    proc = _cli(run_dir, "--config.train.epochs=50")
    latest = os.path.join(run_dir, "checkpoints", "latest")
    deadline = time.time() + 600
    while time.time() < deadline and not (os.path.isdir(latest) and any(d.isdigit() for d in os.listdir(latest))):
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGINT, out
    assert "INTERRUPTED" in out
    step = int(out.split("INTERRUPTED by signal 2 at step ")[1].split(":")[0])
    assert load_run(run_dir, "last").step == step


def test_rerun_with_a_different_config_is_refused_once_a_rolling_checkpoint_exists(tmp_path):
    c = pgd_at_config.get_config("tiny")
    prepare_run_dir(str(tmp_path), c)
    c2 = pgd_at_config.get_config("tiny")
    c2.attack.steps = 3
    # nothing trained yet (e.g. the first attempt failed loading its data): the corrected config replaces it
    os.makedirs(tmp_path / "checkpoints" / "snapshots" / "0")
    prepare_run_dir(str(tmp_path), c2)
    assert json.load(open(tmp_path / "config.json"))["attack"]["steps"] == 3
    assert not os.path.exists(tmp_path / "checkpoints")  # the old config's initial snapshot is cleared
    os.makedirs(tmp_path / "checkpoints" / "latest" / "3")  # a rolling checkpoint: the run is the old config's
    with pytest.raises(TrainingError, match=r"different config \(attack.steps: 3 -> 2\)"):
        prepare_run_dir(str(tmp_path), c)
    c3 = pgd_at_config.get_config("tiny")
    c3.attack.steps = 3
    c3.data.data_dir = "/elsewhere"  # where the data lives may change
    prepare_run_dir(str(tmp_path), c3)


def test_nan_loss_stops_with_the_step_and_keeps_checkpoints(tmp_path):
    c = clean_config.get_config("tiny")
    c.optimizer.lr = 1e30
    with pytest.raises(TrainingError, match=r"non-finite training metrics at step \d+") as err:
        train(c, str(tmp_path), progress=False)
    assert "None" not in str(err.value)  # "no checkpoint was written yet" or "the last good checkpoint (step N)"
    snap = load_run(str(tmp_path), 0)  # the initial snapshot is intact
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(snap.params))


def test_clean_training_learns_the_synthetic_task(tmp_path):
    c = clean_config.get_config("tiny")
    c.train.epochs = 1
    train(c, str(tmp_path), progress=False)
    rec = json.loads(open(os.path.join(tmp_path, "metrics.jsonl")).readline())
    assert rec["test_error"] < 0.8  # chance is 0.9; 8 steps of SGD already get well below it


def test_corrupt_checkpoint_is_a_clear_error(reference_run, tmp_path):
    import shutil

    run_dir = str(tmp_path / "copy")
    shutil.copytree(reference_run[0], run_dir)
    ckpt = os.path.join(run_dir, "checkpoints", "latest", "16", "state")
    for root, _, files in os.walk(ckpt):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_run(run_dir, "last")


def test_every_run_directory_gets_curves_png_and_the_start_line_gives_the_eval_cost(reference_run):
    run_dir, _ = reference_run
    path = os.path.join(run_dir, "curves.png")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(path).shape[:2] == (360, 1100)  # the whole figure was drawn
    assert not [f for f in os.listdir(run_dir) if f.startswith(".tmp-")]  # written atomically
    log = open(os.path.join(run_dir, "log.txt")).read()
    assert "per-epoch evaluation ~0.75 x an epoch's cost (over 0.25" in log  # tiny: a test fixture, exempt
    assert "eval " in log.split("epoch 1/2:")[1].splitlines()[0]  # the epoch line gives the evaluation's time


def test_a_failing_plot_is_logged_once_and_never_raised(tmp_path, monkeypatch):
    from robust_flat import curves
    from robust_flat.training import trainer

    def broken(run_dir):
        raise RuntimeError("no display")

    monkeypatch.setattr(curves, "write_curves", broken)
    logged, warned = [], []
    for _ in range(3):
        trainer._write_curves(str(tmp_path), logged.append, warned)
    assert len(logged) == 1 and "curves.png not written (RuntimeError: no display)" in logged[0]


def test_curves_png_is_cheap_and_skips_torn_lines(tmp_path):
    from robust_flat.curves import read_metrics, write_curves

    rng = np.random.default_rng(0)
    lines = [json.dumps({"epoch": e, **{k: float(v) for k, v in zip(
        ("batch_loss", "batch_error", "train_loss", "train_error", "train_robust_loss", "train_robust_error",
         "test_loss", "test_error", "test_robust_loss", "test_robust_error"), rng.uniform(0.01, 1, 10))},
        **({"es_robust_error": 0.5 - e / 1000} if e % 5 == 0 else {})}) for e in range(1, 151)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"epoch": 151, "train_lo')  # a torn last line
    records = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["epoch"] for r in records] == list(range(1, 151))
    write_curves(str(tmp_path))  # 0.2-0.4 s on the 2-core VM (speed is not asserted here: no timed tests)
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_curves_show_the_averaged_model_when_the_run_averages():
    from robust_flat.curves import plot_curves

    base = {"train_robust_loss": 1.0, "test_robust_loss": 1.5, "train_robust_error": 0.4, "test_robust_error": 0.6}
    ema = {"ema_train_robust_loss": 0.9, "ema_test_robust_loss": 1.4, "ema_train_robust_error": 0.3,
           "ema_test_robust_error": 0.5}

    def labels(records):
        return {line.get_label() for ax in plot_curves(records).axes for line in ax.get_lines()}

    assert "averaged: test robust" not in labels([{"epoch": e, **base} for e in (1, 2)])
    assert {"averaged: test robust", "averaged: train robust"} <= labels([{"epoch": e, **base, **ema} for e in (1, 2)])


METHOD_CONFIGS = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "experiments", "configs"))
                        if f.endswith(".py") and f not in ("__init__.py", "common.py"))


@pytest.mark.parametrize("preset", ["paper", "cpu", "smoke"])  # tiny: the tests' fixture, exempt
@pytest.mark.parametrize("method", METHOD_CONFIGS)
def test_per_epoch_evaluation_costs_at_most_a_quarter_of_an_epoch(method, preset):
    import importlib

    from robust_flat.training.monitor import eval_cost

    config = importlib.import_module(f"experiments.configs.{method}").get_config(preset)
    cost = eval_cost(config)
    assert cost["train"] > 0 and cost["curves"] > 0
    assert cost["ratio"] <= 0.25, (method, preset, cost)


def test_eval_cost_counts_passes_as_documented():
    from robust_flat.training.monitor import eval_cost

    assert set(METHOD_CONFIGS) >= {"pgd_at", "clean", "trades", "mart", "awp", "entropy_sgd"}
    c = pgd_at_config.get_config("cpu")  # 10,000 CIFAR-10 images, batch 128, PGD-7, snapshots every epoch
    cost = eval_cost(c)
    assert cost["train"] == 78 * 128 * (7 + 2)
    assert cost["curves"] == 2 * c.eval.n_examples * (7 + 1)
    assert cost["early_stopping"] == 500 * c.eval.es_restarts * (c.eval.es_steps + 1) / 1
    c.checkpoint.snapshot_every, c.eval.n_examples = 5, 20000  # only 10,000 test images exist
    cost = eval_cost(c)
    assert cost["early_stopping"] == 500 * c.eval.es_restarts * (c.eval.es_steps + 1) / 5
    assert cost["curves"] == (10000 + 10000) * 8
    clean = clean_config.get_config("cpu")  # no attack in the step, no early stopping
    assert eval_cost(clean)["train"] == 78 * 128 * 2 and eval_cost(clean)["early_stopping"] == 0
    tiny = pgd_at_config.get_config("tiny")
    assert eval_cost(tiny)["ratio"] > 0.25  # the exempt fixture: 256 images, ES on all 128 test images
    from experiments.configs import sam as sam_config, ssl as ssl_config
    from robust_flat.training.monitor import train_passes_per_image
    # SAM: one more pass for the gradient at the perturbed weights; rotation SSL: the image and its 4 rotations
    assert train_passes_per_image(sam_config.get_config("cpu")) == 7 + 3
    assert train_passes_per_image(ssl_config.get_config("cpu")) == 5 * (7 + 2)


def test_a_run_written_before_an_option_existed_resumes_with_its_default(tmp_path):
    """config.json of a run written before an option was added lacks it: the default resumes, another value does
    not (it would train a different run)."""
    c = pgd_at_config.get_config("tiny")
    prepare_run_dir(str(tmp_path), c)
    path = tmp_path / "config.json"
    old = json.loads(path.read_text())
    del old["train"]["label_smoothing"], old["data"]["label_noise"], old["attack"]["tau"]
    path.write_text(json.dumps(old))
    os.makedirs(tmp_path / "checkpoints" / "latest" / "3")  # a rolling checkpoint: the stored config is binding
    prepare_run_dir(str(tmp_path), c)
    c.train.label_smoothing = 0.1
    with pytest.raises(TrainingError, match=r"different config \(train.label_smoothing: 0.0 -> 0.1\)"):
        prepare_run_dir(str(tmp_path), c)


def test_every_option_added_since_the_first_runs_has_the_value_those_runs_ran_with():
    """tests/config_keys_2026_11.json: the base config's keys of runs written in November 2026 (the CPU grid's).
    An option added since must be in the trainer's _ADDED_KEYS with its default, or every run written before it
    refuses to resume ("different config (new.key: None -> default)")."""
    from experiments.configs.common import base_config
    from robust_flat.training.trainer import _ADDED_KEYS, _VOLATILE_KEYS, _flatten, config_to_dict

    old = {tuple(k.split(".")) for k in json.load(open(os.path.join(os.path.dirname(__file__),
                                                                    "config_keys_2026_11.json")))}
    new = _flatten(config_to_dict(base_config()))
    added = {k: v for k, v in new.items() if k not in old and k not in _VOLATILE_KEYS}
    assert added == {k: v for k, v in _ADDED_KEYS.items()}
