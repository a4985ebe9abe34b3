"""experiments.show on fake run directories with known numbers (no training, no model)."""
import json
import os
import subprocess
import sys

import pytest

from experiments import show
from experiments.configs import pgd_at as pgd_at_config
from experiments.configs import trades as trades_config
from robust_flat.training.trainer import config_to_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(obj if isinstance(obj, str) else json.dumps(obj))


def _epoch(e, **extra):
    base = {"epoch": e, "step": 8 * e, "time_s": 1.0, "batch_loss": 2.0 - e / 10, "batch_error": 0.8 - e / 100,
            "train_loss": 1.0 + e / 100, "train_error": 0.3 + e / 1000, "train_robust_loss": 1.5 + e / 100,
            "train_robust_error": 0.5 + e / 1000, "test_loss": 1.1 + e / 100, "test_error": 0.35 + e / 1000,
            "test_robust_loss": 1.6 + e / 100, "test_robust_error": 0.55 + e / 1000}
    return json.dumps({**base, **extra})


def make_run(path, config, epochs_done=4, es=((2, 0.61), (4, 0.6))):
    es = dict(es)
    _write(os.path.join(path, "config.json"), config_to_dict(config))
    lines = [_epoch(e, **({"es_robust_error": es[e]} if e in es else {})) for e in range(1, epochs_done + 1)]
    _write(os.path.join(path, "metrics.jsonl"), "\n".join(lines) + "\n")
    return path


@pytest.fixture
def run(tmp_path):
    c = pgd_at_config.get_config("tiny")
    c.train.epochs = 6
    path = make_run(str(tmp_path / "at"), c)
    ev = os.path.join(path, "evaluations")
    _write(os.path.join(ev, "autoattack-standard_linf_eps8_test_first1000_n100_last.json"),
           {"robust_error": 0.6234, "robust_accuracy": 0.3766, "finished": True, "epoch": 4})
    _write(os.path.join(ev, "autoattack-standard_linf_eps8_test_first1000_n100_last.examples.json"),
           {"robust_error": 0.9999})  # per-example state: never shown
    _write(os.path.join(ev, "rloss_pgd20x1_test_first1000_n100_ep4.json"),
           {"kind": "robust_loss", "clean_loss": 0.9123, "clean_error": 0.312, "robust_loss": 1.8765,
            "robust_error": 0.5432, "epoch": 4, "finished": True})
    fl = os.path.join(path, "flatness")
    _write(os.path.join(fl, "avg_xi0.5_ep4.json"),
           {"measure": "average", "loss": "robust", "flatness": 0.5712, "epoch": 4,
            "config": {"neighbourhood": {"xi": 0.5, "granularity": "layer"}, "samples": 10}})
    _write(os.path.join(fl, "worst_xi0.003_ep4.json"),
           {"measure": "worst", "loss": "robust", "flatness": 0.0421, "epoch": 4,
            "config": {"attack": {"neighbourhood": {"xi": 0.003}, "steps": 20}}})
    _write(os.path.join(fl, "hessian_ep4.json"), {"measure": "hessian", "eigenvalues": [3.0, 2.0], "epoch": 4})
    return path


def _row(out, label):
    lines = [ln for ln in out.splitlines() if ln.strip().startswith(label)]
    assert len(lines) == 1, (label, out)
    return lines[0].strip()[len(label):].split()


def test_one_run(run, capsys):
    assert show.main([run]) == 0
    out = capsys.readouterr().out
    assert _row(out, "method") == ["pgd_at"]
    assert _row(out, "model.name") == ["small_cnn"]
    assert _row(out, "data.dataset") == ["synthetic"]
    assert _row(out, "attack.steps") == ["2"]
    assert _row(out, "attack.eps") == ["0.03137"]
    assert _row(out, "epochs done / total") == ["4", "/", "6"]
    assert _row(out, "best epoch (early stopping)") == ["4"]
    assert _row(out, "its ES robust error") == ["0.6000"]
    assert _row(out, "last epoch") == ["4"]
    assert _row(out, "train clean loss / error") == ["1.0400", "/", "0.3040"]
    assert _row(out, "train robust loss / error") == ["1.5400", "/", "0.5040"]
    assert _row(out, "test clean loss / error") == ["1.1400", "/", "0.3540"]
    assert _row(out, "test robust loss / error") == ["1.6400", "/", "0.5540"]
    assert _row(out, "training batches loss / error") == ["1.6000", "/", "0.7600"]
    assert _row(out, "autoattack-standard_linf_eps8_test_first1000_n100_last: robust error") == ["0.6234"]
    assert _row(out, "rloss_pgd20x1_test_first1000_n100_ep4: clean loss / error") == ["0.9123", "/", "0.3120"]
    assert _row(out, "rloss_pgd20x1_test_first1000_n100_ep4: robust loss / error") == ["1.8765", "/", "0.5432"]
    assert _row(out, "average xi=0.5 epoch 4") == ["0.5712"]
    assert _row(out, "worst xi=0.003 epoch 4") == ["0.0421"]
    assert "0.9999" not in out and "hessian" not in out


def test_runs_side_by_side_show_the_config_differences(run, tmp_path, capsys):
    c = trades_config.get_config("tiny")
    c.train.epochs = 6
    c.optimizer.lr = 0.1
    c.data.data_dir = "/elsewhere"  # where the data lives is no difference worth a row
    other = make_run(str(tmp_path / "trades"), c, epochs_done=3, es=((1, 0.7), (2, 0.65), (3, 0.65)))
    assert show.main([run, other]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["at", "trades"]
    assert _row(out, "method") == ["pgd_at", "trades"]
    assert _row(out, "optimizer.lr") == ["0.05", "0.1"]
    assert _row(out, "trades.beta") == ["-", "6"]
    assert "data.data_dir" not in out and "model.name" not in out  # equal fields are not listed
    assert _row(out, "epochs done / total") == ["4", "/", "6", "3", "/", "6"]
    assert _row(out, "best epoch (early stopping)") == ["4", "2"]  # a tie keeps the first, as the trainer
    assert _row(out, "its ES robust error") == ["0.6000", "0.6500"]
    assert _row(out, "test robust loss / error") == ["1.6400", "/", "0.5540", "1.6300", "/", "0.5530"]
    assert _row(out, "autoattack-standard_linf_eps8_test_first1000_n100_last: robust error") == ["0.6234", "-"]


def test_a_run_without_epochs_yet(tmp_path, capsys):
    path = make_run(str(tmp_path / "new"), pgd_at_config.get_config("tiny"), epochs_done=0)
    assert show.main([path]) == 0
    out = capsys.readouterr().out
    assert _row(out, "epochs done / total") == ["0", "/", "2"]
    assert _row(out, "best epoch (early stopping)") == ["-"]


def test_not_a_run_is_one_line_and_exit_2(run, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert show.main([run, str(empty)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip().splitlines() == [f"error: {empty} is not a training run directory (no config.json; "
                                                 "make one with python -m experiments.cifar10_at --run-dir DIR)"]
    (empty / "config.json").write_text("{not json")
    assert show.main([str(empty)]) == 2
    assert "is not a readable JSON config" in capsys.readouterr().err
    proc = subprocess.run([sys.executable, "-m", "experiments.show", str(tmp_path / "missing")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == f"error: {tmp_path / 'missing'}: no such directory"
