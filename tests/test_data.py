import io
import os
import pickle
import tarfile
import time

import jax
import numpy as np
import pytest

from robust_flat import data as D


def _fake_cifar_batches(n=6, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        y = rng.integers(0, 10, n).tolist()
        out[name] = pickle.dumps({b"data": x, b"labels": y})
    return out


def _write_archive(path, batches):
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in batches.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def test_cifar_archive_and_extracted_batches_agree(tmp_path):
    batches = _fake_cifar_batches()
    _write_archive(tmp_path / "cifar-10-python.tar.gz", batches)
    xa, ya = D.load_local(str(tmp_path), "train")
    assert xa.shape == (30, 32, 32, 3) and xa.dtype == np.uint8 and ya.dtype == np.int32
    # CHW rows -> HWC images: pixel (0, 0) of image 0 is bytes 0, 1024, 2048 of its row
    raw = pickle.loads(batches["data_batch_1"])[b"data"][0]
    np.testing.assert_array_equal(xa[0, 0, 0], [raw[0], raw[1024], raw[2048]])
    # the second load comes from the .npz cache and is identical
    xc, yc = D.load_local(str(tmp_path), "train")
    np.testing.assert_array_equal(xa, xc)
    assert any(f.endswith(".npz") for f in os.listdir(tmp_path / ".robust_flat_cache"))
    ext = tmp_path / "ext" / "cifar-10-batches-py"
    ext.mkdir(parents=True)
    for name, blob in batches.items():
        (ext / name).write_bytes(blob)
    xb, yb = D.load_local(str(tmp_path / "ext"), "test")
    assert xb.shape == (6, 32, 32, 3)
    np.testing.assert_array_equal(yb, pickle.loads(batches["test_batch"])[b"labels"])


def test_image_folder_tree(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls, n in (("cat", 2), ("airplane", 3)):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                    tmp_path / split / cls / f"{i:04d}.png")
    x, y = D.load_local(str(tmp_path), "train")
    assert x.shape == (5, 32, 32, 3)
    # labels: classes sorted by name; order: classes interleaved (i-th image of every class, then the next), so
    # the paper's first-N / last-N subsets of an image tree are not a single class
    np.testing.assert_array_equal(y, [0, 1, 0, 1, 0])
    img = np.asarray(Image.open(tmp_path / "train" / "cat" / "0001.png"))
    np.testing.assert_array_equal(x[3], img)
    img = np.asarray(Image.open(tmp_path / "train" / "airplane" / "0002.png"))
    np.testing.assert_array_equal(x[4], img)

    # a class folder missing from one split would shift that split's labels: refused, naming the class
    (tmp_path / "test" / "cat").rename(tmp_path / "cat_elsewhere")
    for split in ("train", "test"):
        with pytest.raises(D.DataError, match="test/ lacks cat"):
            D.load_local(str(tmp_path), split)


def test_npz_files_and_declared_pixel_scale(tmp_path):
    x = np.random.default_rng(0).uniform(0, 1, (5, 32, 32, 3)).astype(np.float32)
    np.savez(tmp_path / "train.npz", x=x, y=np.arange(5))
    out, y = D.load_local(str(tmp_path), "train", pixel_scale=1.0)
    np.testing.assert_allclose(out / 255.0, x, atol=0.5 / 255 + 1e-6)
    np.savez(tmp_path / "train.npz", x=x * 255.0, y=np.arange(5))
    with pytest.raises(D.DataError, match=r"\[0, 1\] as declared"):
        D.load_local(str(tmp_path), "train", pixel_scale=1.0)
    # images in [0, 1] read with the default scale 255 would be near-black: refused with the fix
    np.savez(tmp_path / "train.npz", x=x, y=np.arange(5))
    with pytest.raises(D.DataError, match="pixel_scale=1.0"):
        D.load_local(str(tmp_path), "train")


@pytest.mark.parametrize("x,y,match", [
    (np.zeros((4, 32, 32), np.uint8), np.zeros(4, int), "NHWC"),
    (np.zeros((4, 32, 32, 3), np.uint8), np.zeros(3, int), "labels must be"),
    (np.zeros((4, 32, 32, 3), np.float32) - 1, np.zeros(4, int), "pixel values"),
    (np.full((4, 32, 32, 3), np.nan, np.float32), np.zeros(4, int), "NaN"),
    (np.zeros((4, 32, 32, 3), np.uint8), np.zeros(4, float), "integers"),
])
def test_validation_errors(x, y, match):
    with pytest.raises(D.DataError, match=match):
        D.validate(x, y, "test")


def test_missing_or_corrupt_sources_fail_clearly(tmp_path):
    with pytest.raises(D.DataError, match="does not exist"):
        D.load_local(str(tmp_path / "nope"), "train")
    with pytest.raises(D.DataError, match="holds no train data"):
        D.load_local(str(tmp_path), "train")
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(D.DataError, match="cannot read the archive"):
        D.load_local(str(tmp_path), "train")


def test_offline_tfds_fails_fast_with_instructions(tmp_path, monkeypatch):
    pytest.importorskip("tensorflow_datasets")
    monkeypatch.setenv("HOME", str(tmp_path))  # no cached arrays
    monkeypatch.setattr(D, "_online", lambda *a, **k: False)
    t = time.time()
    with pytest.raises(D.DataError, match="--data-dir"):
        D.load_tfds("cifar10", "train", tfds_dir=str(tmp_path / "tfds"))
    assert time.time() - t < 30


def test_online_probe_times_out_quickly():
    t = time.time()
    D._online(host="10.255.255.1", port=9, timeout=0.5)  # unroutable: must give up within the timeout
    assert time.time() - t < 5


def test_subsets_are_the_papers():
    x = np.arange(10000)[:, None, None, None] * np.ones((1, 1, 1, 3))
    y = np.arange(10000)
    assert list(D.subset(x, y, "test_first1000")[1][[0, -1]]) == [0, 999]
    assert list(D.subset(x, y, "test_last500")[1][[0, -1]]) == [9500, 9999]


def test_batches_are_deterministic_and_cover_each_epoch():
    x = np.arange(40)[:, None, None, None].repeat(3, -1).astype(np.uint8)
    y = np.arange(40, dtype=np.int32)
    seen = np.concatenate([D.train_batch(x, y, 0, s, 8)["label"] for s in range(5)])
    assert sorted(seen) == list(range(40))
    np.testing.assert_array_equal(D.train_batch(x, y, 0, 7, 8)["label"], D.train_batch(x, y, 0, 7, 8)["label"])
    assert not np.array_equal(D.train_batch(x, y, 0, 0, 8)["label"], D.train_batch(x, y, 0, 5, 8)["label"])


def test_augment_crops_and_flips_within_padding():
    imgs = jax.random.uniform(jax.random.PRNGKey(0), (64, 32, 32, 3))
    out = np.asarray(D.augment(jax.random.PRNGKey(1), imgs))
    assert out.shape == imgs.shape
    # every output is a shifted (<= 4 px, zero filled) and possibly mirrored copy of its input
    ok = 0
    for i in range(8):
        src = np.pad(np.asarray(imgs[i]), ((4, 4), (4, 4), (0, 0)))
        cands = [src[a:a + 32, b:b + 32] for a in range(9) for b in range(9)]
        ok += any(np.array_equal(out[i], c) or np.array_equal(out[i], c[:, ::-1]) for c in cands)
    assert ok == 8


def test_synthetic_data_is_labelled_and_deterministic():
    a = D.synthetic("train", 100, 50)
    b = D.synthetic("train", 100, 50)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[0].shape == (100, 32, 32, 3) and set(np.unique(a[1])) <= set(range(10))
    # a run's config chooses the counts and the side; a config written before the side was an option gets 32
    data = {"synthetic_train": 30, "synthetic_test": 20, "synthetic_image_size": 16}
    x, y = D.load_split("synthetic", "test", **D.synthetic_config(data))
    assert x.shape == (20, 16, 16, 3) and y.shape == (20,)
    old = D.synthetic_config({"synthetic_train": 30, "synthetic_test": 20})
    assert old == {"synthetic_sizes": (30, 20), "synthetic_image_size": 32}
    with pytest.raises(ValueError, match="unknown dataset"):
        D.load_split("imagenet", "train")


def test_tfds_path_reads_prepared_data_without_network(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setenv("HOME", str(tmp_path))  # fresh array cache
    monkeypatch.setattr(D, "_online", lambda *a, **k: pytest.fail("must not touch the network"))
    with tfds.testing.mock_data(num_examples=12):
        x, y = D.load_split("cifar10", "train")
    assert x.shape == (12, 32, 32, 3) and x.dtype == np.uint8 and y.shape == (12,)
    # the decoded arrays are cached: a second load needs no TFDS at all
    x2, _ = D.load_tfds("cifar10", "train")
    np.testing.assert_array_equal(x, x2)
