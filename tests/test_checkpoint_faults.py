"""Interruptions at every checkpoint boundary, damaged checkpoints, one writer per run directory, other image sizes.

The kills here are simulated in-process (an exception no handler catches, raised where the kill lands), so one
compilation serves the whole chain; ``python -m tests.faults`` does the same with real SIGKILLs at random moments.
"""
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint._src.path.atomicity as orbax_atomicity
import pytest

from experiments.configs import clean as clean_config
from experiments.configs import pgd_at as pgd_at_config
from faults import differences
from robust_flat.checkpoint import Checkpointer, CheckpointError
from robust_flat.run_lock import RunLock
from robust_flat.runs import load_run
from robust_flat.training.trainer import TrainingError, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Killed(BaseException):
    """Stands for SIGKILL: nothing catches it, nothing after it runs (only ``finally`` blocks)."""


def _config():
    c = pgd_at_config.get_config("tiny")  # 2 epochs x 8 steps, rolling checkpoint every 3 steps
    # cheaper per-epoch evaluation (early stopping, hence the best stream, stays): 16 curve images, 64 test images;
    # curves and early stopping run one compiled program (the preset's PGD-2 with one restart, batches of 16)
    c.data.synthetic_test, c.eval.n_examples, c.eval.batch_size = 64, 16, 16
    return c


def _recorded_saves(monkeypatch):
    real, seen = Checkpointer.save, []

    def save(self, which, step, state, meta):
        seen.append((which, int(step)))
        return real(self, which, step, state, meta)

    monkeypatch.setattr(Checkpointer, "save", save)
    return seen


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("ref") / "run")
    with pytest.MonkeyPatch.context() as mp:
        saves = _recorded_saves(mp)
        train(_config(), run_dir, progress=False)
    return run_dir, saves


def _assert_same_run(run_dir, ref_dir):
    assert differences(run_dir, ref_dir) == []


def test_killed_at_every_save_boundary_resumes_bit_identically(reference, tmp_path, monkeypatch):
    ref_dir, saves = reference
    spe = 8  # steps per epoch of the tiny preset
    # before the first checkpoint, before the first rolling one, and before each write at an epoch end (best,
    # snapshot, rolling: the metrics line of that epoch is already written when the later ones are killed)
    points = [saves[0], saves[1]] + [s for s in saves if s[0] != "latest" or s[1] % spe == 0][1:]
    assert ("best", 1) in points and ("snapshots", 1) in points and ("latest", 2 * spe) in points
    run_dir = str(tmp_path / "run")
    real = Checkpointer.save
    for point in points:
        def save(self, which, step, state, meta, point=point):
            if (which, int(step)) == point:
                raise _Killed(point)
            return real(self, which, step, state, meta)

        monkeypatch.setattr(Checkpointer, "save", save)
        with pytest.raises(_Killed):  # every point is reached again by the rerun
            train(_config(), run_dir, progress=False)
    monkeypatch.setattr(Checkpointer, "save", real)
    train(_config(), run_dir, progress=False)  # the same command once more: it finishes
    _assert_same_run(run_dir, ref_dir)


def test_killed_inside_saves_resumes_bit_identically(reference, tmp_path, monkeypatch):
    """Killed after a checkpoint's files are written and before orbax commits them (the temporary folder stays),
    first in the initial snapshot (no checkpoint exists yet), then in an epoch-end rolling checkpoint."""
    ref_dir, _ = reference
    run_dir = str(tmp_path / "run")
    real = orbax_atomicity.AtomicRenameTemporaryPath.finalize
    for target in ("/snapshots/0.", "/latest/8."):
        async def finalize(self, target=target):
            if target in str(self.get()):
                raise _Killed(target)
            return await real(self)

        monkeypatch.setattr(orbax_atomicity.AtomicRenameTemporaryPath, "finalize", finalize)
        with pytest.raises(_Killed):
            train(_config(), run_dir, progress=False)
        stream = os.path.join(run_dir, "checkpoints", target.split("/")[1])
        assert any("tmp" in name for name in os.listdir(stream))  # it did die inside the write
    monkeypatch.setattr(orbax_atomicity.AtomicRenameTemporaryPath, "finalize", real)
    train(_config(), run_dir, progress=False)
    _assert_same_run(run_dir, ref_dir)


def _flip_a_byte_of_the_largest_data_file(step_dir):
    files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs]
    path = max(files, key=os.path.getsize)
    raw = bytearray(open(path, "rb").read())
    raw[len(raw) // 2] ^= 0x10
    with open(path, "wb") as f:
        f.write(bytes(raw))


def test_a_flipped_bit_is_caught_by_the_checksum(tmp_path):
    state = {"w": np.arange(4096, dtype=np.float32), "b": np.ones((3,), np.float32)}
    ckpt = Checkpointer(str(tmp_path))
    ckpt.save("latest", 1, state, {"epoch": 1})
    ckpt.close()
    _flip_a_byte_of_the_largest_data_file(str(tmp_path / "latest" / "1"))
    raw, _ = Checkpointer(str(tmp_path)).restore("latest", 1)  # without the check, it loads other weights silently
    assert not np.array_equal(raw["w"], state["w"])
    with pytest.raises(CheckpointError, match="differ from the checksum"):
        Checkpointer(str(tmp_path)).restore("latest", 1, target=state)


def test_a_damaged_newest_checkpoint_falls_back_and_the_rerun_repairs_it(reference, tmp_path, capsys):
    ref_dir, _ = reference
    run_dir = str(tmp_path / "run")
    shutil.copytree(ref_dir, run_dir)
    _flip_a_byte_of_the_largest_data_file(os.path.join(run_dir, "checkpoints", "latest", "16"))
    with pytest.raises(CheckpointError, match="corrupt") as err:
        load_run(run_dir, "last")
    assert "delete" not in str(err.value) and "rerun the training command" in str(err.value)
    # a rerun of the finished run resumes from step 15 (the previous rolling checkpoint), redoes one step and
    # writes step 16 again, equal to the undamaged one
    train(_config(), run_dir, progress=False)
    out = capsys.readouterr().out
    assert "resuming from the previous intact checkpoint instead (step 15): 1 steps are redone" in out
    _assert_same_run(run_dir, ref_dir)


def test_one_writer_per_run_directory(tmp_path):
    run_dir = str(tmp_path / "run")
    os.makedirs(run_dir)
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from robust_flat.run_lock import RunLock; "
                               f"RunLock({run_dir!r}).acquire(); print('held', flush=True); sys.stdin.read()"],
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(TrainingError, match=rf"being written by PID {holder.pid} on .*; wait for that job"):
            train(_config(), run_dir, progress=False)
        assert not os.path.exists(os.path.join(run_dir, "config.json"))  # refused before writing anything
    finally:
        holder.kill()
        holder.wait()
    with RunLock(run_dir):  # the holder is gone (killed): its lock is taken over
        pass


def test_a_model_trained_on_other_image_sizes_loads(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 64), ("test", 32)):
        for cls in ("a", "b"):
            os.makedirs(tmp_path / "data" / split / cls)
            for i in range(n // 2):
                Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(
                    tmp_path / "data" / split / cls / f"{i}.png")
    c = clean_config.get_config("tiny")
    c.data.dataset, c.data.data_dir = "cifar10", str(tmp_path / "data")
    c.train.epochs, c.eval.n_examples, c.eval.early_stopping = 1, 0, False
    state = train(c, str(tmp_path / "run"), progress=False)
    loaded = load_run(str(tmp_path / "run"), "last")
    assert all(np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(state.params)))


def test_a_full_disk_during_a_checkpoint_write_is_one_line_and_keeps_the_earlier_ones(tmp_path, monkeypatch):
    import errno

    import orbax.checkpoint as ocp

    state = {"w": np.arange(8, dtype=np.float32)}
    ckpt = Checkpointer(str(tmp_path))
    ckpt.save("latest", 1, state, {"epoch": 1})

    def full(self, step, *args, **kwargs):  # what orbax raised: a ValueError wrapping the OSError
        raise ValueError("tensorstore write failed") from OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ocp.CheckpointManager, "save", full)
    with pytest.raises(CheckpointError) as err:
        ckpt.save("latest", 2, {"w": state["w"] + 1}, {"epoch": 2})
    assert len(str(err.value).splitlines()) == 1
    assert str(err.value).startswith("no space left on the device while writing the latest checkpoint at step 2")
    assert "free disk space and rerun the same command" in str(err.value)
    monkeypatch.undo()
    restored, meta = Checkpointer(str(tmp_path)).restore("latest", target=state)
    assert meta["epoch"] == 1 and np.array_equal(restored["w"], state["w"])


def test_a_run_checkpointed_before_the_state_had_ema_model_state_resumes(tmp_path, monkeypatch):
    """Rolling checkpoints written in the layout of earlier versions (no ``TrainState.ema_model_state``) resume:
    the trainer falls back to that layout as load_run does (the CPU grid's at_wd5e-3 refused to resume)."""
    import dataclasses

    from robust_flat.training.state import LegacyTrainState

    real = Checkpointer.save

    def save_legacy(self, which, step, state, meta):
        old = LegacyTrainState(**{f.name: getattr(state, f.name) for f in dataclasses.fields(LegacyTrainState)})
        return real(self, which, step, old, meta)

    c = _config()
    c.train.epochs = 1
    run_dir = str(tmp_path / "run")
    monkeypatch.setattr(Checkpointer, "save", save_legacy)
    train(c, run_dir, progress=False)  # every checkpoint in the old layout
    monkeypatch.setattr(Checkpointer, "save", real)
    c.train.epochs = 2
    with pytest.raises(TrainingError, match="different config"):  # a finished 1-epoch run is not a 2-epoch run
        train(c, run_dir, progress=False)
    shutil.rmtree(os.path.join(run_dir, "checkpoints", "latest", "8"))  # the end of epoch 1: resume mid-epoch
    c.train.epochs = 1
    state = train(c, run_dir, progress=False)
    assert int(state.step) == 8 and "RESUME: step 6" in open(os.path.join(run_dir, "log.txt")).read()
