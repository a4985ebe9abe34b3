"""``python -m experiments.robust_loss``: clean and PGD robust loss/error of a snapshot, skip when done, bad input."""
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import robust_loss as cli
from robust_flat.attacks.common import cross_entropy
from robust_flat.models import make_logits_fn
from toy_task import load_toy_eval_set, load_toy_run, make_data, trained_model

SIZE = 16
ARGS = ["--eps", "3/255", "--pgd-steps", "3", "--restarts", "2", "--n-examples", "40", "--batch-size", "16"]


def _run(run_dir, *extra):
    return cli.main(["--run-dir", str(run_dir), *ARGS, *extra], load_run=load_toy_run, load_eval_set=load_toy_eval_set)


def test_values_file_and_skip_when_done(tmp_path, monkeypatch):
    out = _run(tmp_path)
    path = tmp_path / "evaluations" / "rloss_pgd3x2_test_first1000_n40_last-ep7.json"
    on_disk = json.loads(path.read_text())
    assert on_disk["robust_loss"] == out["robust_loss"] and on_disk["epoch"] == 7 and on_disk["finished"]
    assert on_disk["attack"]["restarts"] == 2 and on_disk["attack"]["step_size"] == pytest.approx(0.007 * 3 / 8)
    # clean numbers equal a direct forward pass
    model, params, state = trained_model(SIZE)
    x, y = make_data(48, SIZE, seed=21)
    logits = make_logits_fn(model)(params, state, x[:40])
    assert out["clean_error"] == pytest.approx(float(np.mean(np.argmax(logits, -1) != y[:40])))
    assert out["clean_loss"] == pytest.approx(float(np.mean(cross_entropy(logits, y[:40]))), rel=1e-5)
    # the attack raises the loss and the error (robust error counts clean errors too)
    assert out["robust_loss"] > out["clean_loss"] and out["clean_error"] <= out["robust_error"] <= 1.0
    assert out["robust_error"] > out["clean_error"]

    # a finished result is not recomputed; other settings give another file
    monkeypatch.setattr("robust_flat.training.monitor.evaluate", lambda *a, **k: pytest.fail("recomputed"))
    assert _run(tmp_path)["robust_loss"] == out["robust_loss"]
    monkeypatch.undo()
    more = _run(tmp_path, "--restarts", "4", "--name", "custom")
    assert (tmp_path / "evaluations" / "custom.json").exists() and more["attack"]["restarts"] == 4
    assert more["robust_loss"] >= out["robust_loss"] - 1e-6  # more restarts: worst case over a superset
    fixed = _run(tmp_path, "--pgd-step-rule", "fixed", "--name", "fixed")  # the released code's step at any eps
    assert fixed["attack"]["step_size"] == 0.007 and fixed["robust_loss"] != out["robust_loss"]


@pytest.mark.parametrize("extra,msg", [(["--snapshot", "latest"], "--snapshot must be"), (["--eps", "0"], "eps"),
                                       (["--restarts", "0"], "must be >= 1")])
def test_bad_arguments_are_one_line(tmp_path, extra, msg, run_module):
    proc = run_module("experiments.robust_loss", "--run-dir", str(tmp_path), *extra)  # in-process: the CLI's code
    assert proc.returncode == 2 and msg in proc.stderr and "Traceback" not in proc.stderr


def test_missing_run_is_one_line(tmp_path):  # as a process
    proc = subprocess.run([sys.executable, "-m", "experiments.robust_loss", "--run-dir", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=120,
                          cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
