"""``python -m experiments.evaluate`` and :mod:`robust_flat.evaluation`: outputs, resuming, eps parsing, bad input."""
import json
import os

import numpy as np
import pytest

from experiments import evaluate as cli
from robust_flat import evaluation as ev
from toy_task import load_toy_eval_set, load_toy_run

ARGS = ["--attack", "apgd-ce", "--eps", "3/255", "--n-iter", "10", "--n-examples", "40", "--batch-size", "16",
        "--shape-buckets", "1", "--no-progress"]


def _run(run_dir, *extra):
    return cli.main(["--run-dir", str(run_dir), *ARGS, *extra], load_run=load_toy_run, load_eval_set=load_toy_eval_set)


def test_outputs_and_resume(tmp_path, monkeypatch):
    full = _run(tmp_path / "a")
    name = "apgd-ce_linf_eps3-255_test_first1000_n40_last-ep7"
    assert full["name"] == name
    with open(tmp_path / "a" / "evaluations" / f"{name}.json") as f:
        on_disk = json.load(f)
    assert on_disk["robust_accuracy"] == full["robust_accuracy"]
    assert on_disk["eps"] == pytest.approx(3 / 255) and on_disk["n_examples"] == 40 and on_disk["seed"] == 0
    assert on_disk["attacks"][0]["config"]["n_iter"] == 10 and "jax" in on_disk["versions"]
    assert 0 < full["robust_accuracy"] < full["clean_accuracy"]
    with open(tmp_path / "a" / "evaluations" / f"{name}.examples.json") as f:
        examples = json.load(f)["state"]
    broken = np.array(examples["broken_by"], dtype=object)
    assert full["robust_accuracy"] == pytest.approx(np.mean(broken == None))  # noqa: E711
    assert full["broken_by_counts"]["apgd-ce"] == int(np.sum(broken == "apgd-ce"))
    assert np.all(np.array(examples["perturbation_norm"])[broken == "apgd-ce"] > 0)

    # interrupt after the clean pass and one attack batch, then start again: same per-example results
    real_save = ev.save_state

    def flaky_save(path, state, fp):
        real_save(path, state, fp)
        if state.attempted[0].sum() >= 16:  # clean pass and one attack batch written
            raise KeyboardInterrupt

    monkeypatch.setattr(ev, "save_state", flaky_save)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "b")
    monkeypatch.setattr(ev, "save_state", real_save)
    with open(tmp_path / "b" / "evaluations" / f"{name}.examples.json") as f:
        partial = json.load(f)["state"]
    assert 0 < sum(partial["attempted"]["apgd-ce"]) < sum(examples["attempted"]["apgd-ce"])
    resumed = _run(tmp_path / "b")
    with open(tmp_path / "b" / "evaluations" / f"{name}.examples.json") as f:
        assert json.load(f)["state"]["broken_by"] == examples["broken_by"]
    assert resumed["accuracy_after"] == full["accuracy_after"]
    # finished: a third call does not recompute
    assert _run(tmp_path / "b")["written"] == resumed["written"]


def test_other_settings_do_not_resume_a_foreign_state(tmp_path):
    _run(tmp_path)
    with pytest.raises(SystemExit, match="different evaluation"):
        os.unlink(tmp_path / "evaluations" / "apgd-ce_linf_eps3-255_test_first1000_n40_last-ep7.json")
        _run(tmp_path, "--seed", "1")


def test_parse_eps():
    assert ev.parse_eps("8/255") == pytest.approx(8 / 255)
    assert ev.parse_eps("0.0314") == pytest.approx(0.0314)
    assert ev.parse_eps(0.5) == 0.5
    assert ev.eps_tag("8/255") == "8-255"
    for bad in ("0", "-1/255", "abc", "1/0", "nan"):
        with pytest.raises(ValueError):
            ev.parse_eps(bad)


def test_bad_arguments(tmp_path):
    with pytest.raises(SystemExit):
        _run(tmp_path, "--eps", "0")  # overrides the earlier --eps
    with pytest.raises(SystemExit):
        cli.main(["--run-dir", str(tmp_path), "--attack", "cw"], load_run=load_toy_run, load_eval_set=load_toy_eval_set)
    with pytest.raises(SystemExit):
        cli.main(["--run-dir", str(tmp_path), "--attack", "autoattack", "--version", "custom", "--attacks",
                  "apgd-ce,cw"], load_run=load_toy_run, load_eval_set=load_toy_eval_set)
    with pytest.raises(SystemExit):
        cli.main(["--run-dir", str(tmp_path), "--attack", "pgd", "--version", "fast"], load_run=load_toy_run,
                 load_eval_set=load_toy_eval_set)
    with pytest.raises(ValueError, match="unknown attack"):
        ev.make_components("cw", 0.03)
