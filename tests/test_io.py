"""Atomic writers (robust_flat.io) and partial-result units (robust_flat.partial)."""
import errno
import json
import os
import stat

import numpy as np
import pytest

from robust_flat import io as rio
from robust_flat.partial import PartialResults, array_digest, finished_result, fingerprint


def _no_temp_files(d):
    return [f for f in os.listdir(d) if f.startswith(rio.TMP_PREFIX)] == []


def test_round_trips(tmp_path):
    rio.atomic_write_bytes(str(tmp_path / "a.bin"), b"\x00\x01abc")
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01abc"
    rio.atomic_write_text(str(tmp_path / "sub" / "dir" / "t.txt"), "h\u00e9llo\n")  # creates the directories
    assert (tmp_path / "sub" / "dir" / "t.txt").read_text(encoding="utf-8") == "h\u00e9llo\n"
    obj = {"a": [1, 2.5, None], "b": {"c": "x"}, "nan": float("nan")}
    rio.atomic_write_json(str(tmp_path / "o.json"), obj, indent=1)
    back = json.loads((tmp_path / "o.json").read_text())
    assert back["a"] == obj["a"] and back["b"] == obj["b"] and np.isnan(back["nan"])
    arr = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    rio.atomic_save_npy(str(tmp_path / "a.npy"), arr)
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), arr)
    for compressed in (False, True):
        rio.atomic_save_npz(str(tmp_path / "z.npz"), compressed=compressed, x=arr, y=np.int32(3))
        with np.load(tmp_path / "z.npz") as z:
            np.testing.assert_array_equal(z["x"], arr)
            assert z["y"] == 3 and z["y"].dtype == np.int32
    assert _no_temp_files(tmp_path)


def test_figure_format_follows_the_extension(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    rio.atomic_save_figure(str(tmp_path / "f.png"), fig, dpi=50)
    rio.atomic_save_figure(str(tmp_path / "f.pdf"), fig)
    plt.close(fig)
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "f.pdf").read_bytes()[:5] == b"%PDF-"
    assert _no_temp_files(tmp_path)


def test_ordinary_permissions(tmp_path):
    old = os.umask(0o027)
    try:
        rio.atomic_write_bytes(str(tmp_path / "p.bin"), b"x")
        rio.atomic_write_bytes(str(tmp_path / "p.bin"), b"y")  # replacing keeps ordinary permissions too
        assert stat.S_IMODE(os.stat(tmp_path / "p.bin").st_mode) == 0o640
        os.umask(0o022)
        rio.atomic_save_npy(str(tmp_path / "q.npy"), np.zeros(2))
        assert stat.S_IMODE(os.stat(tmp_path / "q.npy").st_mode) == 0o644  # not mkstemp's 0600
    finally:
        os.umask(old)


def test_unserializable_object_leaves_the_old_file(tmp_path):
    path = str(tmp_path / "r.json")
    rio.atomic_write_json(path, {"ok": 1})
    with pytest.raises(TypeError):
        rio.atomic_write_json(path, {"bad": object()})
    assert json.loads(open(path).read()) == {"ok": 1}
    assert sorted(os.listdir(tmp_path)) == ["r.json"]


@pytest.mark.parametrize("failing", ["write", "fsync", "replace"])
def test_disk_full_names_the_file_and_leaves_the_old_one(tmp_path, monkeypatch, failing):
    path = str(tmp_path / "r.npy")
    rio.atomic_save_npy(path, np.ones(3))

    def enospc(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if failing == "write":
        class Full:  # the temp file fills the disk half-way through
            def __init__(self, f):
                self.f = f

            def write(self, data):
                self.f.write(data[:5])
                enospc()

        real = rio._atomic_write
        monkeypatch.setattr(rio, "_atomic_write", lambda p, w: real(p, lambda f: w(Full(f))))
    elif failing == "fsync":
        monkeypatch.setattr(rio.os, "fsync", enospc)
    else:
        monkeypatch.setattr(rio.os, "replace", enospc)
    with pytest.raises(rio.AtomicWriteError) as info:
        rio.atomic_save_npy(path, np.zeros(1000))
    err = info.value
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC and err.filename == path
    step = {"write": "writing failed", "fsync": "fsync failed", "replace": "renaming the temporary file failed"}
    assert path in str(err) and "No space left" in str(err) and step[failing] in str(err)
    monkeypatch.undo()
    np.testing.assert_array_equal(np.load(path), np.ones(3))
    assert _no_temp_files(tmp_path)


def test_unwritable_directory_is_reported(tmp_path, monkeypatch):
    def denied(*a, **k):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(rio.tempfile, "mkstemp", denied)  # (the tests may run as root, which ignores chmod)
    with pytest.raises(rio.AtomicWriteError, match="temporary file") as info:
        rio.atomic_write_text(str(tmp_path / "x.txt"), "x")
    assert info.value.errno == errno.EACCES and str(tmp_path / "x.txt") in str(info.value)
    assert not (tmp_path / "x.txt").exists()


def test_interrupt_during_write_removes_the_temp_file(tmp_path, monkeypatch):
    path = str(tmp_path / "k.txt")
    rio.atomic_write_text(path, "old")

    def interrupted(p, write):
        return real(p, lambda f: (f.write(b"par"), (_ for _ in ()).throw(KeyboardInterrupt())))

    real = rio._atomic_write
    monkeypatch.setattr(rio, "_atomic_write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        rio.atomic_write_text(path, "new")
    assert open(path).read() == "old" and _no_temp_files(tmp_path)


def test_partial_results(tmp_path):
    out = str(tmp_path)
    fp = fingerprint({"a": 1, "b": [1, 2]})
    assert fp == fingerprint({"b": [1, 2], "a": 1}) and fp != fingerprint({"a": 2, "b": [1, 2]})
    assert array_digest(np.zeros(3, np.float32)) != array_digest(np.zeros(3, np.float64))
    assert array_digest({"w": np.ones(2)}, np.arange(3)) == array_digest({"w": np.ones(2)}, np.arange(3))
    p = PartialResults(out, "m", fp)
    assert p.path == os.path.join(out, ".partial", f"m-{fp}")
    p.save_array("reference", np.arange(4.0))
    p.save("unit_1", a=np.arange(3), b=np.float64(0.25))
    assert p.load_array("reference").tolist() == [0, 1, 2, 3] and p.load_array("reference", (5,)) is None
    assert p.load_array("missing") is None and p.load("missing") is None
    with open(os.path.join(p.path, "broken.npz"), "wb") as f:  # e.g. a file damaged outside this module
        f.write(b"PK\x03\x04garbage")
    units = PartialResults(out, "m", fp).load_all()
    assert list(units) == ["unit_1"] and units["unit_1"]["b"] == 0.25
    with pytest.raises(ValueError):
        p.save("../escape", a=np.zeros(1))
    assert PartialResults(out, "m", fp, fresh=True).load_all() == {}
    p.remove()
    assert not os.path.exists(os.path.join(out, ".partial"))
    rio.atomic_write_json(os.path.join(out, "r.json"), {"fingerprint": fp, "v": 1})
    assert finished_result(os.path.join(out, "r.json"), fp) == {"fingerprint": fp, "v": 1}
    assert finished_result(os.path.join(out, "r.json"), "other") is None
    assert finished_result(os.path.join(out, "none.json"), fp) is None
