"""Extra pseudo-labelled training data (``data.extra_path``, ``data.extra_fraction``): the configured share of every
(mini-)batch comes from it, which extra examples a step sees is a function of (seed, step), a resumed run sees the
same ones, and every malformed file is refused with one line."""
import os
import signal

import jax
import numpy as np
import pytest

from experiments.configs import pgd_at as pgd_at_config
from robust_flat import data as D
from robust_flat.training.config_check import check_config

EXTRA_LABEL = 9


def _sources(n_train=40, n_extra=30, size=4):
    """Training images with labels 0..8 and pixel value 0; extra images labelled 9 whose first two pixels encode
    their index (and 255 in the last channel: the mark)."""
    x = np.zeros((n_train, size, size, 3), np.uint8)
    y = (np.arange(n_train) % EXTRA_LABEL).astype(np.int32)
    ex = np.zeros((n_extra, size, size, 3), np.uint8)
    ex[:, 0, 0, 0], ex[:, 0, 0, 1], ex[..., 2] = np.arange(n_extra) % 256, np.arange(n_extra) // 256, 255
    return x, y, ex, np.full(n_extra, EXTRA_LABEL, np.int32)


def test_every_mini_batch_holds_the_configured_share_of_extra_examples():
    x, y, ex, ey = _sources()
    seen = []
    for step in range(12):
        b = D.mixed_train_batch(x, y, ex, ey, seed=0, step=step, batch_size=16, fraction=0.25, chunk=8)
        extra = b["label"] == EXTRA_LABEL
        np.testing.assert_array_equal(extra, b["image"][:, 1, 1, 2] == 255)  # labels travel with their images
        assert list(extra.reshape(2, 8).sum(1)) == [2, 2]  # 0.25 of each mini-batch of 8
        seen.append(b["image"][extra, 0, 0, 0].astype(int) + 256 * b["image"][extra, 0, 0, 1].astype(int))
    seen = np.concatenate(seen)
    assert len(set(seen[:28])) == 28  # the 30 extra images in a permutation (7 steps of 4), then the next one
    assert D.extra_count(128, 0.5) == 64 and D.extra_count(128, 0.7) == 90
    b = D.mixed_train_batch(x, y, ex, ey, 0, 0, 16, 0.5)  # one mini-batch: half of it
    assert (b["label"] == EXTRA_LABEL).sum() == 8


def test_which_extra_examples_a_step_sees_is_a_function_of_seed_and_step():
    x, y, ex, ey = _sources()
    batch = lambda seed, step, rows=None: D.mixed_train_batch(x, y, ex, ey, seed, step, 16, 0.5, rows=rows)
    for key in ("image", "label"):
        np.testing.assert_array_equal(batch(0, 5)[key], batch(0, 5)[key])
        np.testing.assert_array_equal(batch(0, 5, np.arange(8, 16))[key], batch(0, 5)[key][8:])  # one process's rows
    assert not np.array_equal(batch(0, 5)["image"], batch(0, 6)["image"])
    assert not np.array_equal(batch(0, 5)["image"], batch(1, 5)["image"])


def _write(path, images, labels, **more):
    np.savez(path, images=images, labels=labels, **more)
    return str(path)


def _tiny_config(extra_path, fraction=0.5):
    c = pgd_at_config.get_config("tiny")  # the synthetic set: 256 training images of 16 x 16, 10 classes
    c.train.epochs = 1
    c.eval.n_examples, c.eval.batch_size, c.eval.early_stopping = 32, 32, False
    c.data.extra_path, c.data.extra_fraction = extra_path, fraction
    return c


def test_a_bad_extra_file_is_refused_with_one_line(tmp_path, run_module):
    from robust_flat.training.trainer import load_extra

    good = np.zeros((20, 32, 32, 3), np.uint8), np.arange(20) % 10
    cases = {
        "missing": (str(tmp_path / "nope.npz"), "does not exist"),
        "keys": (str(tmp_path / "keys.npz"), "expected arrays 'images' and 'labels'"),
        "shape": (_write(tmp_path / "shape.npz", np.zeros((20, 16, 16, 3), np.uint8), good[1]),
                  r"images are \(16, 16, 3\) but the training images are \(32, 32, 3\)"),
        "rank": (_write(tmp_path / "rank.npz", np.zeros((20, 32, 32), np.uint8), good[1]), r"\[N, H, W, 3\]"),
        "dtype": (_write(tmp_path / "dtype.npz", good[0], good[1].astype(np.float32)), "labels must be integers"),
        "range": (_write(tmp_path / "range.npz", np.full((20, 32, 32, 3), 300.0), good[1]),
                  r"pixel values must lie in \[0, 255\]"),
        "count": (_write(tmp_path / "count.npz", good[0], good[1][:5]), "labels must be"),
        "label_high": (_write(tmp_path / "high.npz", good[0], np.full(20, 10)), r"labels must lie in \[0, 10\)"),
        "label_low": (_write(tmp_path / "low.npz", good[0], np.full(20, -1)), "labels must be >= 0"),
        "not_npz": (str(tmp_path / "text.npz"), "cannot read it as an .npz file"),
    }
    (tmp_path / "text.npz").write_text("not a zip file")
    np.savez(tmp_path / "keys.npz", x=good[0], y=good[1])
    for name, (path, message) in cases.items():
        with pytest.raises(D.DataError, match=message) as e:
            load_extra(_tiny_config(path), (32, 32, 3), lambda m: None)
        assert "\n" not in str(e.value) and path in str(e.value), name
    problems = check_config(_tiny_config(cases["missing"][0]))
    assert any("data.extra_path" in p and "does not exist" in p for p in problems)
    assert any("data.extra_fraction" in p for p in check_config(_tiny_config("", fraction=1.0)))
    assert not check_config(_tiny_config(cases["shape"][0]))  # its content is checked when the data is loaded
    for path in (cases["missing"][0], cases["label_high"][0]):  # the CLI: one line, status 2, nothing trained
        proc = run_module("experiments.cifar10_at", "--config=experiments/configs/pgd_at.py:tiny",
                          f"--run-dir={tmp_path / 'cli'}", "--no-progress", f"--config.data.extra_path={path}")
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "data.extra_path" in lines[0], proc.stderr


def test_training_with_extra_data_resumes_with_the_same_extra_examples(tmp_path, monkeypatch):
    from robust_flat.runs import load_run
    from robust_flat.training.trainer import train

    rng = np.random.default_rng(0)
    side = pgd_at_config.get_config("tiny").data.synthetic_image_size  # the extra images have the training images' shape
    path = _write(tmp_path / "extra.npz", rng.integers(0, 256, (50, side, side, 3), dtype=np.uint8),
                  rng.integers(0, 10, 50))
    c = _tiny_config(path)
    real, seen = D.mixed_train_batch, {}

    def recording(*args, **kwargs):
        batch = real(*args, **kwargs)
        seen.setdefault(args[5], []).append(batch["image"].copy())
        if args[5] == interrupt_at[0]:
            os.kill(os.getpid(), signal.SIGINT)  # the trainer saves after this step and exits with status 130
        return batch

    monkeypatch.setattr(D, "mixed_train_batch", recording)
    interrupt_at = [-1]
    reference = jax.device_get(train(c, str(tmp_path / "ref"), progress=False))
    assert int(reference.step) == 8 and sorted(seen) == list(range(8))
    interrupt_at[0] = 2
    with pytest.raises(SystemExit):
        train(c, str(tmp_path / "resumed"), progress=False)
    assert load_run(str(tmp_path / "resumed"), "last").step == 3
    interrupt_at[0] = -1
    resumed = jax.device_get(train(c, str(tmp_path / "resumed"), progress=False))
    for step, images in seen.items():  # every step saw the same batch in all three runs
        assert len(images) == 2 and np.array_equal(images[0], images[1])  # reference, then interrupted or resumed
    for a, b in zip(jax.tree.leaves(reference.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_array_equal(a, b)
