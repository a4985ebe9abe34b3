"""Datasets as NumPy arrays, deterministic batches, and on-device augmentation.

Every source returns ``(x, y)`` with ``x`` uint8 ``[N, H, W, 3]`` and ``y`` int32 ``[N]``; models get float32 in
[0, 1] and normalize inside (the paper's whitening). Sources:

* ``--data-dir DIR`` (local files, no network): the standard ``cifar-10-python.tar.gz`` archive or its extracted
  ``cifar-10-batches-py/`` pickles (CIFAR-100: ``cifar-100-python``), an image-folder tree
  ``DIR/{train,test}/<class>/*.png|jpg``, or ``.npz`` arrays (``DIR/{train,test}.npz`` with ``x``/``y``, or one
  ``DIR/<anything>.npz`` with ``x_train, y_train, x_test, y_test``).
* tensorflow-datasets (``cifar10``, ``cifar100``, ``svhn_cropped``): a prepared TFDS directory is read without
  network; otherwise TFDS downloads, which needs network *and* TensorFlow. An offline machine fails within seconds
  with a message naming the ``--data-dir`` formats above, instead of minutes of DNS retries.
* ``synthetic``: a small, learnable, generated 10-class dataset for the offline smoke run and tests. It is *not*
  CIFAR-10, and logs say so.

Decoded arrays are cached as ``.npz`` (next to the data, or in ``~/.cache/robust_flat``), so a second run starts in
seconds. Cache writes are atomic.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import io
import os
import pickle
import socket
import tarfile
from typing import Optional, Tuple

import numpy as np

from robust_flat.io import atomic_save_npz

Arrays = Tuple[np.ndarray, np.ndarray]

TFDS_NAMES = {"cifar10": "cifar10", "cifar100": "cifar100", "svhn": "svhn_cropped"}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "svhn": 10, "synthetic": 10}

# Per-channel mean and std of each dataset's training images in [0, 1]: the models' input whitening (the
# ``model.whitening`` config option; robust_flat.models.layers.whitening_options).
PIXEL_STATS = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
               "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
               "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970))}


def default_whitening(dataset: str) -> str:
    """The ``model.whitening`` of a config on ``dataset`` unless it names one: the dataset's own constants, CIFAR-10's
    for a dataset without (``synthetic``: generated images, with the CIFAR-10 whitening every model had before)."""
    return dataset if dataset in PIXEL_STATS else "cifar10"


# The paper's evaluation subsets, as the released code defines them (docs/paper-vs-code.md#subsets).
SUBSETS = {
    "test_first1000": ("test", slice(0, 1000)),   # RErr (AA), RLoss (PGD-20x10), all flatness measures
    "test_last500": ("test", slice(-500, None)),  # early stopping; Hessian
    "test_last100": ("test", slice(-100, None)),  # visualization directions
    "train_first1000": ("train", slice(0, 1000)),  # "train" RErr/RLoss and train-set flatness
    "test": ("test", slice(None)),
    "train": ("train", slice(None)),
}


class DataError(RuntimeError):
    """Data could not be found or is malformed. The message says what to do."""


HOW_TO_GET_DATA = (
    "pass --data-dir DIR with one of: the cifar-10-python.tar.gz archive (https://www.cs.toronto.edu/~kriz/"
    "cifar.html) or its extracted cifar-10-batches-py/, an image tree DIR/{train,test}/<class>/*.png|jpg, or "
    "DIR/{train,test}.npz with arrays x (uint8 NHWC) and y; or run with --config.data.dataset=synthetic for the "
    "offline smoke run")


# ------------------------------------------------------------------------------------------------ validation
def validate(x: np.ndarray, y: np.ndarray, source: str, scale: float = 255.0) -> Arrays:
    """Check shapes/dtypes/ranges; return uint8 NHWC images and int32 labels.

    Float images must lie in ``[0, scale]`` (``scale`` 1.0 or 255.0 as declared); uint8 images are taken as-is.
    """
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise DataError(f"{source}: images must be [N, H, W, 3] (NHWC, RGB), got shape {x.shape}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise DataError(f"{source}: labels must be [N] with N = {x.shape[0]} images, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{source}: labels must be integers, got dtype {y.dtype}")
    if y.size and y.min() < 0:
        raise DataError(f"{source}: labels must be >= 0, got min {y.min()}")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x), y.astype(np.int32)
    if not np.issubdtype(x.dtype, np.floating) and not np.issubdtype(x.dtype, np.integer):
        raise DataError(f"{source}: images must be uint8 or float, got dtype {x.dtype}")
    xf = x.astype(np.float64)
    if not np.all(np.isfinite(xf)):
        raise DataError(f"{source}: images contain NaN or inf")
    lo, hi = float(xf.min()), float(xf.max())
    if scale == 255.0 and hi <= 1.0 and hi > 0:
        raise DataError(f"{source}: float images in [{lo:.4g}, {hi:.4g}] read with pixel_scale 255 would be near-black;"
                        " set --config.data.pixel_scale=1.0 for images in [0, 1]")
    if lo < 0 or hi > scale:
        raise DataError(f"{source}: pixel values must lie in [0, {scale:g}] as declared, got [{lo:.4g}, {hi:.4g}]; "
                        f"set --config.data.pixel_scale to 1.0 or 255.0 to match the data")
    return np.round(xf / scale * 255.0).astype(np.uint8), y.astype(np.int32)


# ----------------------------------------------------------------------------------------------- local files
def _cache_path(data_dir: str, key: str) -> str:
    base = os.path.join(data_dir, ".robust_flat_cache")
    try:
        os.makedirs(base, exist_ok=True)
        probe = os.path.join(base, ".write_test")
        open(probe, "w").close()
        os.remove(probe)
    except OSError:
        base = os.path.join(os.path.expanduser("~"), ".cache", "robust_flat")
        os.makedirs(base, exist_ok=True)
    return os.path.join(base, hashlib.sha1(key.encode()).hexdigest()[:16] + ".npz")


def _save_npz_atomic(path: str, **arrays) -> None:
    try:
        atomic_save_npz(path, **arrays)
    except OSError:
        pass  # a full disk leaves no truncated cache behind (atomic) and costs nothing: the data was decoded anyway


def _load_cached(path: str) -> Optional[Arrays]:
    if not os.path.exists(path):
        return None
    try:
        with np.load(path) as z:
            return z["x"], z["y"]
    except Exception:  # a corrupt cache is rebuilt, never trusted
        os.remove(path)
        return None


def _read_cifar_pickles(members, split: str, dataset: str) -> Arrays:
    """``members``: name -> bytes loader for the files of cifar-10-batches-py / cifar-100-python."""
    if dataset == "cifar100":
        names, label_key = [split], b"fine_labels"
    else:
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        label_key = b"labels"
    xs, ys = [], []
    for name in names:
        blob = members(name)
        d = pickle.load(io.BytesIO(blob), encoding="bytes")
        xs.append(np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(np.asarray(d[label_key], np.int32))
    return np.concatenate(xs), np.concatenate(ys)


def _load_cifar_archive(path: str, split: str, dataset: str) -> Arrays:
    try:
        with tarfile.open(path, "r:gz") as tar:
            index = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}

            def members(name):
                if name not in index:
                    raise DataError(f"{path}: archive has no member {name!r}; is it the python version of "
                                    f"{dataset.upper()}?")
                return tar.extractfile(index[name]).read()

            return _read_cifar_pickles(members, split, dataset)
    except (tarfile.TarError, EOFError, OSError, pickle.UnpicklingError) as e:
        raise DataError(f"{path}: cannot read the archive ({e}); re-download it or extract it and pass the folder")


def _load_cifar_batches(folder: str, split: str, dataset: str) -> Arrays:
    def members(name):
        p = os.path.join(folder, name)
        if not os.path.exists(p):
            raise DataError(f"{folder}: missing {name}; the folder must be an extracted cifar-10-batches-py")
        with open(p, "rb") as f:
            return f.read()

    try:
        return _read_cifar_pickles(members, split, dataset)
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError) as e:
        raise DataError(f"{folder}: corrupt CIFAR batch file ({e}); re-extract the archive")


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")


def _class_folders(folder: str) -> list[str]:
    return sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))


def check_class_folders(data_dir: str) -> None:
    """An image tree's labels are its sorted class folder names, so ``train/`` and ``test/`` must have the same ones:
    a class missing from one split would shift the labels of every later class there."""
    train, test = os.path.join(data_dir, "train"), os.path.join(data_dir, "test")
    if not (os.path.isdir(train) and os.path.isdir(test)):
        return
    a, b = set(_class_folders(train)), set(_class_folders(test))
    if a != b:
        parts = [f"{split}/ lacks {', '.join(sorted(missing))}"
                 for split, missing in (("test", a - b), ("train", b - a)) if missing]
        raise DataError(f"{data_dir}: train/ and test/ must have the same class folders (labels are their sorted "
                        f"names): {'; '.join(parts)}")


def _load_image_folder(folder: str, source: str) -> Arrays:
    """``folder/<class>/*`` with classes in sorted order as labels. An image tree has no canonical example order,
    and class by class would make every prefix one class (the paper's "first 1000 test images" would all be
    airplanes): the images are interleaved instead, the i-th file (sorted names) of every class, then the
    (i+1)-th, so every prefix and suffix is class-balanced. CIFAR-10's own archive keeps its original order."""
    from PIL import Image

    classes = _class_folders(folder)
    if not classes:
        raise DataError(f"{folder}: no class folders; expected {folder}/<class>/*.png|jpg")
    entries = []  # (position within its class, label, file name)
    for label, cls in enumerate(classes):
        files = sorted(f for f in os.listdir(os.path.join(folder, cls)) if f.lower().endswith(IMAGE_EXTENSIONS))
        entries += [(i, label, fname) for i, fname in enumerate(files)]
    xs, ys = [], []
    for _, label, fname in sorted(entries):
        path = os.path.join(folder, classes[label], fname)
        try:
            with Image.open(path) as im:
                xs.append(np.asarray(im.convert("RGB"), np.uint8))
        except Exception as e:
            raise DataError(f"{path}: cannot decode image ({e}); remove or replace the file")
        ys.append(label)
    if not xs:
        raise DataError(f"{folder}: class folders contain no {'/'.join(IMAGE_EXTENSIONS)} files")
    shapes = {a.shape for a in xs}
    if len(shapes) != 1:
        raise DataError(f"{folder}: images have different sizes {sorted(shapes)[:3]}...; resize them first")
    return np.stack(xs), np.asarray(ys, np.int32)


def _load_npz(folder: str, split: str, scale: float) -> Optional[Arrays]:
    path = os.path.join(folder, f"{split}.npz")
    if os.path.isfile(path):
        with np.load(path) as z:
            if "x" not in z or "y" not in z:
                raise DataError(f"{path}: expected arrays 'x' and 'y', found {sorted(z.files)}")
            return validate(z["x"], z["y"], path, scale)
    for path in sorted(glob.glob(os.path.join(folder, "*.npz"))):
        with np.load(path) as z:
            if f"x_{split}" in z and f"y_{split}" in z:
                return validate(z[f"x_{split}"], z[f"y_{split}"], path, scale)
    return None


def load_local(data_dir: str, split: str, dataset: str = "cifar10", pixel_scale: float = 255.0) -> Arrays:
    """Load a split from local files (formats in the module docstring). Raises :class:`DataError`."""
    if not os.path.exists(data_dir):
        raise DataError(f"--data-dir {data_dir!r} does not exist; {HOW_TO_GET_DATA}")
    if not os.access(data_dir, os.R_OK):
        raise DataError(f"--data-dir {data_dir!r} is not readable; fix its permissions")
    if os.path.isfile(data_dir):
        if data_dir.endswith((".tar.gz", ".tgz")):
            return _with_cache(data_dir, split, dataset, lambda: _load_cifar_archive(data_dir, split, dataset))
        if data_dir.endswith(".npz"):
            return _load_npz(os.path.dirname(data_dir) or ".", split, pixel_scale) or _raise(
                f"{data_dir}: no x_{split}/y_{split} arrays")
        raise DataError(f"--data-dir {data_dir!r} is a file of unknown type; {HOW_TO_GET_DATA}")
    batches = "cifar-100-python" if dataset == "cifar100" else "cifar-10-batches-py"
    archive = "cifar-100-python.tar.gz" if dataset == "cifar100" else "cifar-10-python.tar.gz"
    for folder in (os.path.join(data_dir, batches), data_dir):
        marker = "test" if dataset == "cifar100" else "test_batch"
        if os.path.isfile(os.path.join(folder, marker)):
            return validate(*_load_cifar_batches(folder, split, dataset), folder)
    if os.path.isfile(os.path.join(data_dir, archive)):
        path = os.path.join(data_dir, archive)
        return _with_cache(path, split, dataset, lambda: _load_cifar_archive(path, split, dataset))
    npz = _load_npz(data_dir, split, pixel_scale)
    if npz is not None:
        return npz
    split_dir = os.path.join(data_dir, split)
    if os.path.isdir(split_dir):
        check_class_folders(data_dir)
        return _with_cache(split_dir, split, dataset, lambda: _load_image_folder(split_dir, split_dir))
    raise DataError(f"--data-dir {data_dir!r} holds no {split} data that robust-flat can read; {HOW_TO_GET_DATA}")


def _raise(msg):
    raise DataError(msg)


def _with_cache(path: str, split: str, dataset: str, load) -> Arrays:
    stat = os.stat(path)
    key = f"{os.path.abspath(path)}|{stat.st_mtime_ns}|{split}|{dataset}|v2"  # v2: image trees interleaved
    cache = _cache_path(os.path.dirname(os.path.abspath(path)), key)
    cached = _load_cached(cache)
    if cached is not None:
        return validate(*cached, path)
    x, y = validate(*load(), path)
    _save_npz_atomic(cache, x=x, y=y)
    return x, y


# ----------------------------------------------------------------------------------------------------- TFDS
def _online(host: str = "storage.googleapis.com", port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def load_tfds(dataset: str, split: str, tfds_dir: Optional[str] = None) -> Arrays:
    """Load through tensorflow-datasets; fail fast and clearly when that cannot work here."""
    name = TFDS_NAMES[dataset]
    cache = os.path.join(os.path.expanduser("~"), ".cache", "robust_flat", f"tfds_{name}_{split}.npz")
    cached = _load_cached(cache)
    if cached is not None:
        return validate(*cached, cache)
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(f"tensorflow-datasets is not installed (pip install -e '.[tfds]'); or {HOW_TO_GET_DATA}")
    try:  # a prepared ArrayRecord/Parquet copy: random access, no TensorFlow, no network
        source = tfds.data_source(name, split=split, data_dir=tfds_dir, download=False)
        x = np.stack([np.asarray(ex["image"]) for ex in source])
        y = np.asarray([ex["label"] for ex in source], np.int32)
    except Exception:
        if not _online():
            raise DataError(f"{name} is not prepared in the TFDS data dir and this machine is offline; "
                            f"{HOW_TO_GET_DATA}") from None
        x, y = _tfds_numpy(tfds, name, split, tfds_dir, download=True)
    x, y = validate(x, y, f"tfds:{name}")
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    _save_npz_atomic(cache, x=x, y=y)
    return x, y


def _tfds_numpy(tfds, name, split, tfds_dir, download):
    try:
        data = tfds.as_numpy(tfds.load(name, split=split, data_dir=tfds_dir, batch_size=-1, download=download))
    except ImportError as e:
        raise DataError(f"tensorflow-datasets needs TensorFlow to download/decode {name} ({e}); "
                        f"pip install -e '.[tfds]', or {HOW_TO_GET_DATA}")
    except Exception as e:
        raise DataError(f"tensorflow-datasets could not load {name} ({type(e).__name__}: {e}); {HOW_TO_GET_DATA}")
    return data["image"], data["label"]


# ------------------------------------------------------------------------------------------------ synthetic
def synthetic(split: str, n_train: int = 2560, n_test: int = 1024, image_size: int = 32, seed: int = 0,
              num_classes: int = 10) -> Arrays:
    """A generated, learnable 10-class image dataset (NOT CIFAR-10): each class is a smooth random template;
    examples are template + per-example smooth noise + a random brightness shift. Fixed given ``seed``."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 2, (num_classes, 4, 4, 3)).astype(np.float64)  # binary colour blocks per class
    templates = np.kron(coarse, np.ones((image_size // 4, image_size // 4, 1)))
    n = n_train if split == "train" else n_test
    rng = np.random.default_rng(seed + (1 if split == "train" else 2))
    y = rng.integers(0, num_classes, n).astype(np.int32)
    noise = np.kron(rng.normal(0, 0.12, (n, 8, 8, 3)), np.ones((1, image_size // 8, image_size // 8, 1)))
    shift = rng.uniform(-0.1, 0.1, (n, 1, 1, 1))
    x = np.clip(0.2 + 0.6 * templates[y] + noise + shift, 0, 1)
    return (x * 255).round().astype(np.uint8), y


def synthetic_config(data_config) -> dict:
    """:func:`load_split`'s ``synthetic_*`` arguments from a config's ``data`` block (a run written before an option
    existed gets the value it ran with)."""
    d = data_config
    return {"synthetic_sizes": (int(d.get("synthetic_train", 2560)), int(d.get("synthetic_test", 1024))),
            "synthetic_image_size": int(d.get("synthetic_image_size", 32))}


# ------------------------------------------------------------------------------------------------- front end
def load_split(dataset: str, split: str, data_dir: Optional[str] = None, pixel_scale: float = 255.0,
               tfds_dir: Optional[str] = None, synthetic_sizes: Tuple[int, int] = (2560, 1024),
               synthetic_image_size: int = 32) -> Arrays:
    """``(x uint8 [N,H,W,3], y int32 [N])`` for ``split`` in {"train", "test"} (see module docstring);
    ``synthetic_sizes`` (training, test images) and ``synthetic_image_size`` (the side) shape the ``synthetic`` data."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if dataset == "synthetic":
        return synthetic(split, *synthetic_sizes, image_size=synthetic_image_size)
    if dataset not in TFDS_NAMES:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(NUM_CLASSES)}")
    if data_dir:
        return load_local(data_dir, split, dataset, pixel_scale)
    return load_tfds(dataset, split, tfds_dir)


def subset(x: np.ndarray, y: np.ndarray, name: str) -> Arrays:
    _, sl = SUBSETS[name]
    return x[sl], y[sl]


def load_eval_set(config_or_dataset, subset_name: str = "test_first1000", data_dir: Optional[str] = None,
                  n_examples: Optional[int] = None):
    """Float32 images in [0, 1] and int32 labels of a named evaluation subset (:data:`SUBSETS`).

    ``config_or_dataset``: a dataset name or a run's config (its ``data`` block is used; ``data_dir`` overrides).
    """
    if subset_name not in SUBSETS:
        raise ValueError(f"unknown subset {subset_name!r}; choose one of {', '.join(SUBSETS)}")
    pixel_scale, synthetic_options = 255.0, {}
    if isinstance(config_or_dataset, str):
        dataset = config_or_dataset
    else:
        d = config_or_dataset.data
        dataset = d.dataset
        data_dir = data_dir or d.get("data_dir") or None
        pixel_scale = d.get("pixel_scale", 255.0)
        synthetic_options = synthetic_config(d)
    split, _ = SUBSETS[subset_name]
    x, y = load_split(dataset, split, data_dir, pixel_scale, **synthetic_options)
    x, y = subset(x, y, subset_name)
    if n_examples is not None:
        if n_examples > len(x):
            raise ValueError(f"asked for {n_examples} examples but {subset_name} has {len(x)}")
        x, y = x[:n_examples], y[:n_examples]
    return x.astype(np.float32) / 255.0, y


# -------------------------------------------------------------------------------------------------- batching
def epoch_permutation(seed: int, epoch: int, n: int, stream: Tuple[int, ...] = ()) -> np.ndarray:
    """The order of training examples in ``epoch``; a pure function of (seed, epoch), so resuming is exact.
    ``stream``: another, independent order of the same seed (the extra data's: :data:`EXTRA_STREAM`). The last
    few orders are cached (read-only): a permutation of the 500,000 extra images costs ~10 ms per step otherwise."""
    return _permutation(seed, epoch, n, tuple(stream))


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, n: int, stream: Tuple[int, ...]) -> np.ndarray:
    order = np.random.default_rng([seed, epoch, *stream]).permutation(n)
    order.setflags(write=False)
    return order


def _stream_indices(n: int, seed: int, step: int, batch_size: int, stream: Tuple[int, ...] = ()) -> np.ndarray:
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise DataError(f"batch size {batch_size} is larger than the training set ({n} examples)")
    epoch, i = divmod(step, per_epoch)
    return epoch_permutation(seed, epoch, n, stream)[i * batch_size:(i + 1) * batch_size]


def train_batch(x: np.ndarray, y: np.ndarray, seed: int, step: int, batch_size: int,
                rows: Optional[np.ndarray] = None) -> dict:
    """Batch number ``step`` (global step, counting from 0) of the deterministic stream; drops the last partial
    batch of every epoch so all batches have one shape (one compilation). ``rows``: only these positions of the
    batch (one process's share in multi-host training); default all."""
    idx = _stream_indices(len(x), seed, step, batch_size)
    if rows is not None:
        idx = idx[rows]
    return {"image": x[idx], "label": y[idx]}


# ----------------------------------------------------------------------------------- extra pseudo-labelled data
EXTRA_STREAM = (1,)  # epoch_permutation's stream of the extra data (the training set's is ())


def extra_count(batch_size: int, fraction: float) -> int:
    """How many of ``batch_size`` examples come from the extra data at share ``fraction``: rounded, and at least one
    example of each kind (so the configured share is exact for batch sizes where ``batch_size * fraction`` is)."""
    return min(max(int(round(batch_size * fraction)), 1), batch_size - 1)


def mixed_train_batch(x: np.ndarray, y: np.ndarray, extra_x: np.ndarray, extra_y: np.ndarray, seed: int, step: int,
                      batch_size: int, fraction: float, chunk: Optional[int] = None,
                      rows: Optional[np.ndarray] = None) -> dict:
    """Batch ``step`` of training examples mixed with extra (pseudo-labelled) ones, a pure function of
    (seed, step): every ``chunk`` rows (default the whole batch; a multi-batch step passes its mini-batch size) hold
    :func:`extra_count` ``(chunk, fraction)`` extra examples at positions drawn per step. Both sources are read in
    their own deterministic streams (:func:`train_batch`'s, at their per-step counts), each wrapping into a new
    permutation when it runs out. ``rows``: only these positions of the batch."""
    chunk = chunk or batch_size
    if batch_size % chunk:
        raise ValueError(f"batch size {batch_size} is not a multiple of the mini-batch size {chunk}")
    n_chunks, k = batch_size // chunk, extra_count(chunk, fraction)
    base = _stream_indices(len(x), seed, step, n_chunks * (chunk - k))
    ext = _stream_indices(len(extra_x), seed, step, n_chunks * k, EXTRA_STREAM)
    place = np.random.default_rng([seed, step, *EXTRA_STREAM])
    is_extra = np.zeros(batch_size, bool)
    for j in range(n_chunks):
        is_extra[j * chunk + place.permutation(chunk)[:k]] = True
    src = np.empty(batch_size, np.int64)  # row -> index into its source
    src[~is_extra], src[is_extra] = base, ext
    if rows is not None:
        src, is_extra = src[rows], is_extra[rows]
    image, label = np.empty((len(src),) + x.shape[1:], x.dtype), np.empty(len(src), np.int32)
    image[~is_extra], label[~is_extra] = x[src[~is_extra]], y[src[~is_extra]]
    image[is_extra], label[is_extra] = extra_x[src[is_extra]], extra_y[src[is_extra]]
    return {"image": image, "label": label}


def load_extra(path: str, image_shape: Tuple[int, ...], num_classes: int, pixel_scale: float = 255.0) -> Arrays:
    """The extra (pseudo-labelled) training data of ``data.extra_path``: an ``.npz`` with ``images`` (uint8
    ``[N, H, W, 3]`` of the training images' ``H, W``; float images must lie in ``[0, pixel_scale]``) and ``labels``
    (integers in ``[0, num_classes)``), e.g. the 500,000 pseudo-labelled Tiny Images of Carmon et al. (2019), the
    paper's "+unlabeled" model (docs/paper-vs-code.md#unlabeled).
    Raises :class:`DataError` with one line naming the file and the problem."""
    if not os.path.isfile(path):
        raise DataError(f"data.extra_path {path!r} does not exist (an .npz file with arrays 'images' and 'labels')")
    try:
        with np.load(path) as z:
            missing = [k for k in ("images", "labels") if k not in z.files]
            if missing:
                raise DataError(f"data.extra_path {path}: expected arrays 'images' and 'labels', found "
                                f"{sorted(z.files)}")
            x, y = z["images"], z["labels"]
    except DataError:
        raise
    except Exception as e:  # not a zip / npz, truncated, pickled objects
        raise DataError(f"data.extra_path {path}: cannot read it as an .npz file ({type(e).__name__}: {e})")
    x, y = validate(x, y, f"data.extra_path {path}", pixel_scale)
    if tuple(x.shape[1:]) != tuple(image_shape):
        raise DataError(f"data.extra_path {path}: images are {tuple(x.shape[1:])} but the training images are "
                        f"{tuple(image_shape)}")
    if len(y) == 0:
        raise DataError(f"data.extra_path {path}: holds no images")
    if int(y.max()) >= num_classes:
        raise DataError(f"data.extra_path {path}: labels must lie in [0, {num_classes}), got max {int(y.max())}")
    return x, y


def augment(key, images, pad: int = 4, flip: bool = True):
    """Random crop after zero padding by ``pad`` pixels, and horizontal flip, per example, on device (jittable).

    The paper's "random crop (<= 4 px)" with the usual pad-and-crop; the released code used imgaug's
    CropAndPad + resize (docs/paper-vs-code.md#crop), which is not reproduced.
    """
    import jax
    import jax.numpy as jnp

    n, h, w, c = images.shape
    k_crop, k_flip = jax.random.split(key)
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = jax.random.randint(k_crop, (n, 2), 0, 2 * pad + 1)

    def crop(img, off):
        return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))

    out = jax.vmap(crop)(padded, offsets)
    if flip:
        do_flip = jax.random.bernoulli(k_flip, 0.5, (n,))
        out = jnp.where(do_flip[:, None, None, None], out[:, :, ::-1, :], out)
    return out
