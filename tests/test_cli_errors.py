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


# ------------------------------------------------------------------ one line, exit 2: helpers
def _one_line_error(capsys, fn) -> str:
    """Run ``fn``; it must exit with status 2 after printing exactly one line ``error: ...`` on stderr."""
    import pytest

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        fn()
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def _tiny_run_dir(path, checkpoint=True):
    """A run directory with the tiny preset's config.json and (``checkpoint``) a damaged rolling checkpoint."""
    from experiments.configs import pgd_at

    path.mkdir()
    (path / "config.json").write_text(pgd_at.get_config("tiny").to_json())
    if checkpoint:
        (path / "checkpoints" / "latest" / "5" / "state").mkdir(parents=True)
        (path / "checkpoints" / "latest" / "5" / "state" / "x").write_text("not a checkpoint")
    return path


# ------------------------------------------------------------------ item 11: evaluate and flatness
def test_evaluate_and_flatness_bad_run_dirs_and_flags_are_one_line(tmp_path, capsys):
    from experiments import cli, evaluate, flatness

    def ev(*argv):
        return _one_line_error(capsys, lambda: cli.run_cli(evaluate.main, ["--attack", "pgd", *argv]))

    def fl(*argv):
        return _one_line_error(capsys, lambda: cli.run_cli(flatness.main, ["--measure", "avg", *argv]))

    missing = str(tmp_path / "missing")
    for command in (ev, fl):
        assert "is not a run directory (no config.json)" in command("--run-dir", missing)
        assert "--snapshot must be an epoch number" in command("--run-dir", missing, "--snapshot", "x")
        assert "eps must be > 0" in command("--run-dir", missing, "--eps", "0")
    assert "--xi must be >= 0" in fl("--run-dir", missing, "--xi", "-1")
    assert "--samples must be >= 1" in fl("--run-dir", missing, "--samples", "0")
    assert "--n-iter, --pgd-steps and --pgd-restarts must be >= 1" in ev("--run-dir", missing, "--pgd-steps", "0")

    damaged = _tiny_run_dir(tmp_path / "damaged")  # a checkpoint that fails to load (was 764 lines of traceback)
    for command in (ev, fl):
        assert "corrupt" in command("--run-dir", str(damaged))
        assert "no snapshot for epoch 3" in command("--run-dir", str(damaged), "--snapshot", "3")
    (damaged / "config.json").write_text('{"method": ')
    for command in (ev, fl):
        assert "config.json is unreadable" in command("--run-dir", str(damaged))
    (damaged / "config.json").write_text("{}")  # valid JSON, not a run's config: one line too (_one_line_error)
    for command in (ev, fl):
        assert str(damaged) in command("--run-dir", str(damaged))
    assert not (damaged / "evaluations").exists() and not (damaged / "flatness").exists()


# ------------------------------------------------------------------ issue 17 move 1: one typed parser per measure
def test_flatness_refuses_misspelt_options_and_options_of_another_measure(tmp_path, capsys):
    from experiments import cli, flatness

    missing = str(tmp_path / "missing")

    def fl(*argv):
        return _one_line_error(capsys, lambda: cli.run_cli(flatness.main, ["--run-dir", missing, *argv]))

    assert "unrecognized arguments: --lanczos-iter 10" in fl("--measure", "hessian", "--lanczos-iter", "10")
    assert "--num-directions is not an option of --measure hessian" in fl("--measure", "hessian",
                                                                           "--num-directions", "3")
    assert "--k is not an option of --measure avg" in fl("--measure", "avg", "--k", "4")
    assert "--distribution is not an option of --measure worst" in fl("--measure", "worst", "--distribution", "ball")
    assert "use --num-directions" in fl("--measure", "landscape", "--samples", "3")
    assert "unknown direction kind 'foo'" in fl("--measure", "landscape", "--directions", "random,foo")
    assert "--k and --lanczos-iters must be >= 1" in fl("--measure", "hessian", "--k", "0")
    assert not os.path.exists(missing)  # refused before the run is looked at
    text = " ".join(flatness.build_parser().format_help().split())  # every option of every measure, with its default
    for shown in ("--k K extreme eigenvalues at each end of the spectrum (default: 4)", "--steps STEPS",
                  "--hessian-select", "--surface-steps", "--attack-iters", "--xi XI", "(default: 80 for hessian"):
        assert shown in text


# ------------------------------------------------------------------ item 15: --n-target-classes
def test_evaluate_refuses_more_target_classes_than_the_model_has_before_running(tmp_path, capsys):
    from experiments import cli, evaluate
    from toy_task import load_toy_eval_set, load_toy_run

    def ev(*argv):
        return _one_line_error(capsys, lambda: cli.run_cli(
            evaluate.main, ["--run-dir", str(tmp_path), "--n-iter", "2", "--n-examples", "8", "--batch-size", "8",
                            "--no-progress", *argv], load_run=load_toy_run, load_eval_set=load_toy_eval_set))

    line = ev("--attack", "autoattack", "--version", "fast", "--n-target-classes", "10")  # the toy model: 10 classes
    assert "10 target classes asked for, but the model has 10 classes, so at most 9" in line
    assert not (tmp_path / "evaluations").exists()  # refused before any attack ran
    assert "applies to apgd-t and fab-t only" in ev("--attack", "apgd-ce", "--n-target-classes", "3")
    assert "--n-target-classes must be >= 1" in ev("--attack", "apgd-t", "--n-target-classes", "0")


# ------------------------------------------------------------------ item 13: OSError -> one line with the fix
def test_os_errors_are_one_line_with_the_fix(tmp_path, monkeypatch):
    import errno

    from experiments.cli import os_error_line
    from robust_flat.io import AtomicWriteError

    full = os_error_line(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "x")),
                         kept="checkpoints already written are intact")
    assert full == (f"error: cannot write {tmp_path / 'run' / 'x'}: No space left on device; free disk space and "
                    "rerun the same command; checkpoints already written are intact")
    atomic = AtomicWriteError(errno.ENOSPC, f"cannot write {tmp_path}/a.json: write failed (No space left on "
                                            "device); the previous file, if any, is unchanged", f"{tmp_path}/a.json")
    assert os_error_line(atomic).startswith(f"error: cannot write {tmp_path}/a.json: write failed")
    assert "free disk space and rerun the same command" in os_error_line(atomic)
    ro = os_error_line(OSError(errno.EROFS, "Read-only file system", "/mnt/ro/run"), elsewhere="pass another --run-dir")
    assert ro == ("error: cannot write /mnt/ro/run: Read-only file system; that file system is read-only; pass another "
                  "--run-dir on a writable disk")
    denied = os_error_line(PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "run")),
                           writes=[str(tmp_path / "run")], elsewhere="pass another --run-dir")
    assert denied == (f"error: cannot write {tmp_path / 'run'}: Permission denied; make {tmp_path} writable "
                      "(chmod u+w) or pass another --run-dir")
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as a user who may not read it (root may)
    train = tmp_path / "data" / "train"
    train.mkdir(parents=True)
    unreadable = os_error_line(PermissionError(errno.EACCES, "Permission denied", str(train)),
                               writes=[str(tmp_path / "run")])
    assert unreadable == f"error: cannot read {train}: Permission denied; make it readable (chmod -R u+rX {train})"


def _tiny_config():
    from experiments.configs import pgd_at

    return pgd_at.get_config("tiny")


def test_training_os_errors_are_one_line(tmp_path, capsys, monkeypatch):
    import errno

    from experiments import cifar10_at
    from robust_flat.training import trainer

    line = _one_line_error(capsys, lambda: cifar10_at.run(_tiny_config(), "/proc/x", progress=False))
    assert line.startswith("error: cannot write /proc/x: No such file or directory;") and "--run-dir" in line

    def no_space(config, run_dir, progress=True):
        raise OSError(errno.ENOSPC, "No space left on device", os.path.join(run_dir, "metrics.jsonl"))

    monkeypatch.setattr(trainer, "train", no_space)
    line = _one_line_error(capsys, lambda: cifar10_at.run(_tiny_config(), str(tmp_path / "run"), progress=False))
    assert line == (f"error: cannot write {tmp_path / 'run' / 'metrics.jsonl'}: No space left on device; free disk "
                    "space and rerun the same command; checkpoints already written are intact")


def test_unwritable_run_dir_and_unreadable_data_folder(tmp_path, capsys):
    import pytest

    if os.geteuid() == 0:
        pytest.skip("root ignores file permissions")
    from experiments import cifar10_at
    from experiments.configs import pgd_at

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    data = tmp_path / "data"
    (data / "train" / "a").mkdir(parents=True)
    (data / "test" / "a").mkdir(parents=True)
    (data / "train").chmod(0o000)
    try:
        line = _one_line_error(capsys, lambda: cifar10_at.run(_tiny_config(), str(ro / "run"), progress=False))
        assert line == (f"error: cannot write {ro / 'run'}: Permission denied; make {ro} writable (chmod u+w) or "
                        "pass another --run-dir")
        line = _one_line_error(capsys, lambda: cifar10_at.run(pgd_at.get_config("cpu"), str(tmp_path / "run"),
                                                              data_dir=str(data), progress=False))
        assert line == (f"error: cannot read {data / 'train'}: Permission denied; make it readable "
                        f"(chmod -R u+rX {data / 'train'})")
    finally:
        ro.chmod(0o755)
        (data / "train").chmod(0o755)


def test_evaluation_out_of_disk_space_is_one_line(tmp_path, capsys, monkeypatch):
    import errno

    from experiments import cli, evaluate
    from robust_flat import evaluation
    from robust_flat.io import AtomicWriteError
    from toy_task import load_toy_eval_set, load_toy_run

    def full_disk(path, state, fp):
        raise AtomicWriteError(errno.ENOSPC, f"cannot write {path}: write failed (No space left on device); the "
                                             "previous file, if any, is unchanged", path)

    monkeypatch.setattr(evaluation, "save_state", full_disk)
    line = _one_line_error(capsys, lambda: cli.run_cli(
        evaluate.main, ["--run-dir", str(tmp_path), "--attack", "apgd-ce", "--n-iter", "2", "--n-examples", "8",
                        "--batch-size", "8", "--no-progress"], load_run=load_toy_run, load_eval_set=load_toy_eval_set,
        kept="finished batches are kept in RUN/evaluations/*.examples.json"))
    assert "No space left on device" in line and line.endswith(
        "free disk space and rerun the same command; finished batches are kept in RUN/evaluations/*.examples.json")


# ------------------------------------------------------------------ item 14: the config, checked up front
def test_training_config_problems_are_all_reported_before_anything_is_written(tmp_path, capsys):
    import pytest

    from experiments import cifar10_at

    config = _tiny_config()
    with config.unlocked():
        config.train.epochs = -1  # was: exit 0, "DONE: -8 steps"
        config.checkpoint.every_steps = 0  # was: ZeroDivisionError
        config.optimizer.schedule = "cosine"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cifar10_at.run(config, str(tmp_path / "run"), progress=False)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 3 and all(ln.startswith("error: ") for ln in lines), err
    assert any("train.epochs must be an integer >= 1, got -1" in ln for ln in lines)
    assert any("checkpoint.every_steps must be an integer >= 1, got 0" in ln for ln in lines)
    assert any("optimizer.schedule must be one of multistep, constant, cyclic" in ln for ln in lines)
    assert not (tmp_path / "run").exists()


def test_training_command_line_unknown_fields_and_fractions():
    from experiments import cifar10_at

    tiny = "--config=experiments/configs/pgd_at.py:tiny"
    argv, problems = cifar10_at.check_command_line(["prog", tiny, "--config.train.epochz=3", "--config.trainn.epochs",
                                                    "2", "--config.train.epochs=1"])
    assert problems == ["unknown config field train.epochz (did you mean train.epochs?)",
                        "unknown config field trainn.epochs (did you mean train.epochs?)"]
    argv, problems = cifar10_at.check_command_line(["prog", "--config.attack.eps=8/255", "--config.attack.step_size",
                                                    "2/255", "--run-dir", "r"])
    assert problems == [] and argv[1] == f"--config={cifar10_at.DEFAULT_CONFIG}"  # the default config, made explicit
    assert argv[2:] == [f"--config.attack.eps={8 / 255!r}", "--config.attack.step_size", repr(2 / 255), "--run-dir", "r"]
    _, problems = cifar10_at.check_command_line(["prog", tiny, "--config.attack.eps=8/0", "--config.attack.step_size=0/255"])
    assert problems == ["cannot parse --config.attack.eps '8/0'; write e.g. 8/255 or 0.0314",
                        "--config.attack.step_size must be > 0, got '0/255'"]
    _, problems = cifar10_at.check_command_line(["prog", "--config=experiments/configs/pgd_at.py:smok"])
    assert problems == ["--config experiments/configs/pgd_at.py:smok: unknown preset 'smok'; choose paper, smoke, cpu "
                        "or tiny"]
    _, problems = cifar10_at.check_command_line(["prog", "--config", "experiments/configs/nope.py"])
    assert len(problems) == 1 and problems[0].startswith("--config experiments/configs/nope.py: no such file")


def test_training_command_line_end_to_end(tmp_path):
    """One process: no --config (the default is parsed at import, where a bad override used to be a traceback),
    fractions accepted through absl, then every config problem at once, nothing written."""
    run = tmp_path / "run"
    proc = _run("experiments.cifar10_at", "--config.attack.eps=8/255", "--config.attack.step_size", "2/255",
                "--config.train.epochs=-1", "--config.checkpoint.every_steps=0", f"--run-dir={run}")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert lines == ["error: train.epochs must be an integer >= 1, got -1",
                     "error: checkpoint.every_steps must be an integer >= 1, got 0"], proc.stderr
    assert not run.exists()


# ------------------------------------------------------------------ item 17: one parser for every epsilon
def test_every_entry_points_eps_takes_fractions(tmp_path, capsys):
    import pytest

    from experiments import evaluate, flatness, robust_loss

    class Loaded(Exception):
        pass

    def stop(*args):
        raise Loaded

    clis = {evaluate: ["--attack", "pgd"], flatness: ["--measure", "avg"], robust_loss: []}
    for cli, extra in clis.items():
        argv = ["--run-dir", str(tmp_path), *extra]
        with pytest.raises(Loaded):  # 8/255 is accepted: the command goes on to load the run
            cli.main(argv + ["--eps", "8/255"], load_run=stop, load_eval_set=stop)
        for bad, message in (("0", "eps must be > 0"), ("8/0", "cannot parse eps '8/0'")):
            capsys.readouterr()
            with pytest.raises(SystemExit) as e:
                cli.main(argv + ["--eps", bad], load_run=stop, load_eval_set=stop)
            assert e.value.code == 2 and message in capsys.readouterr().err
    assert flatness.build_parser().parse_args(["--run-dir", "r", "--measure", "avg", "--eps", "2/255"]).eps == 2 / 255


# ------------------------------------------------------------------ issue 17 move 5: one copy of each check
def test_the_measuring_entry_points_check_their_options_and_inputs_alike(tmp_path, capsys):
    from experiments import cli, evaluate, flatness, robust_loss
    from toy_task import load_toy_eval_set, load_toy_run

    missing = str(tmp_path / "missing")
    clis = {evaluate: ["--attack", "pgd"], flatness: ["--measure", "avg"], robust_loss: []}

    def line(module, *argv, **loaders):
        return _one_line_error(capsys, lambda: cli.run_cli(module.main, [*clis[module], *argv], **loaders))

    see = "; see python -m experiments.{} --help"
    assert line(evaluate, "--run-dir", missing, "--n-examples", "0") == (
        "error: --n-examples, --batch-size and --shape-buckets must be >= 1" + see.format("evaluate"))
    assert line(evaluate, "--run-dir", missing, "--attack", "apgd-t", "--n-target-classes", "-2") == (
        "error: --n-target-classes must be >= 1 (default: min(9, classes - 1)), got -2" + see.format("evaluate"))
    assert line(robust_loss, "--run-dir", missing, "--batch-size", "0") == (
        "error: --n-examples, --pgd-steps, --restarts and --batch-size must be >= 1" + see.format("robust_loss"))
    assert line(flatness, "--run-dir", missing, "--xi", "nan") == (  # NaN is refused like a negative radius
        "error: --xi must be >= 0 (a relative radius, e.g. 0.5 or 0.003), got nan" + see.format("flatness"))
    assert line(flatness, "--run-dir", missing, "--n-examples", "0") == (
        "error: --n-examples must be >= 1, got 0" + see.format("flatness"))
    for module in clis:  # the same line from each, before the run is looked at
        assert line(module, "--run-dir", missing, "--snapshot", "x").startswith("error: --snapshot must be an epoch")
    assert not os.path.exists(missing)

    toy = dict(load_run=load_toy_run, load_eval_set=load_toy_eval_set)  # 48 examples, no averaged weights
    run = ["--run-dir", str(tmp_path), "--batch-size", "8"]
    for module in clis:
        assert line(module, *run, "--n-examples", "49", **toy) == (
            "error: --n-examples 49 but subset test_first1000 has only 48 examples")
        assert "no weight-averaged parameters" in line(module, *run, "--weights", "ema", **toy)
    assert not (tmp_path / "evaluations").exists() and not (tmp_path / "flatness").exists()


def test_a_measuring_entry_point_started_as_a_command(monkeypatch, capsys):
    import pytest

    from experiments import cli

    def interrupted(argv):
        assert argv == ["--run-dir", "R"]
        raise KeyboardInterrupt

    def refused(argv):
        raise ValueError("bad\ninput")

    monkeypatch.setattr("sys.argv", ["prog", "--run-dir", "R"])
    with pytest.raises(SystemExit) as e:
        cli.run_measure_cli(interrupted, "flatness", "interrupted: run it again")
    assert e.value.code == 130 and capsys.readouterr().err == "\ninterrupted: run it again\n"
    with pytest.raises(SystemExit) as e:
        cli.run_measure_cli(refused, "flatness", "interrupted")
    assert e.value.code == 2 and capsys.readouterr().err == "error: bad\n"


def test_an_entry_point_run_in_process_can_be_imported_afterwards(run_module):
    """The run_module fixture leaves no absl flags behind: after an in-process run of experiments.cifar10_at (whose
    flags absl files under the module's path), importing the module defines them again without a clash (a
    DuplicateFlagError failed whichever test of the same xdist worker imported it next)."""
    import importlib

    assert run_module("experiments.cifar10_at", "--list").returncode == 0
    sys.modules.pop("experiments.cifar10_at", None)
    module = importlib.import_module("experiments.cifar10_at")  # executes the module: defines its flags
    assert module._CONFIG.name == "config" and module._RUN_DIR.name == "run-dir"
