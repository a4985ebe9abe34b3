"""Bad input to the command-line entry points: one clear line on stderr, exit status 2, nothing written."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_data_dir_with_a_synthetic_config_is_refused(tmp_path):
    run = tmp_path / "run"
    proc = _run("experiments.cifar10_at", "--config=experiments/configs/pgd_at.py:tiny", f"--run-dir={run}",
                f"--data-dir={tmp_path}")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "synthetic" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    assert not run.exists()


def test_ctrl_c_during_start_up_is_one_line(tmp_path):
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "experiments.cifar10_at",
                             "--config=experiments/configs/pgd_at.py:tiny", f"--run-dir={tmp_path / 'run'}"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # wait until the process is importing jaxlib (past the early handler, long before the trainer's), however slowly
    # a loaded machine starts it
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/maps") as f:
                if "jaxlib" in f.read():
                    break
        except OSError:
            pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err and "interrupted" in err


def test_test_labels_out_of_range_are_refused(tmp_path):
    import numpy as np
    import pytest

    from experiments.configs import pgd_at
    from robust_flat.training.trainer import TrainingError, load_data

    rng = np.random.default_rng(0)
    for split, top in (("train", 10), ("test", 12)):
        np.savez(tmp_path / f"{split}.npz", x=rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8),
                 y=np.arange(20) % top)
    c = pgd_at.get_config("cpu")
    c.data.data_dir, c.data.train_examples = str(tmp_path), 0
    with pytest.raises(TrainingError, match="test labels go up to 11 but the model has 10 classes"):
        load_data(c, lambda m: None)


def test_flatness_eps_takes_fractions_and_refuses_nonpositive(capsys):
    import pytest

    from experiments import flatness

    p = flatness.build_parser()
    assert p.parse_args(["--run-dir", "r", "--measure", "avg", "--eps", "8/255"]).eps == 8 / 255
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--run-dir", "r", "--measure", "avg", "--eps", "0"])
    assert e.value.code == 2 and "eps must be > 0" in capsys.readouterr().err
