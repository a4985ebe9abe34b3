"""The Hessian and landscape CLIs (``experiments.flatness --measure hessian|landscape``) resume interrupted runs:
finished units are not recomputed and the final result equals an uninterrupted run's."""
import json
import os
import types

import numpy as np
import pytest

from robust_flat import hessian as H
from robust_flat import landscape as L
from robust_flat.partial import PartialResults

from flatness_toy import make_data, random_params, tiny_model


@pytest.fixture(scope="module")
def run():
    model = tiny_model()
    params, state = random_params(model, seed=3)
    return types.SimpleNamespace(model=model, params=params, model_state=state, ema_params=None, epoch=3, step=30,
                                 config=None)


def _interrupt_after(monkeypatch, n_saves):
    """Make PartialResults.save raise KeyboardInterrupt right after its ``n_saves``-th unit was written."""
    real, saved = PartialResults.save, []

    def save(self, unit, **arrays):
        real(self, unit, **arrays)
        saved.append(unit)
        if len(saved) == n_saves:
            raise KeyboardInterrupt

    monkeypatch.setattr(PartialResults, "save", save)
    return saved


def _count(monkeypatch, owner, name):
    real, calls = getattr(owner, name), []

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(owner, name, counted)
    return calls


def _main(tmp_path, run, x, y, *argv):
    from experiments import flatness as cli

    return cli.main(["--run-dir", str(tmp_path), "--snapshot", "last", "--no-progress", "--n-examples", str(len(x)),
                     *argv], load_run=lambda d, s: run, load_eval_set=lambda cfg, subset, data_dir: (x, y))


def _partials(out):
    return sorted(os.listdir(os.path.join(out, ".partial"))) if os.path.isdir(os.path.join(out, ".partial")) else []


HESSIAN = ("--measure", "hessian", "--k", "2", "--lanczos-iters", "8", "--trace-probes", "3", "--density-probes", "2",
           "--batch-size", "16", "--hessian-loss", "robust", "--pgd-steps", "1")
LANDSCAPE = ("--measure", "landscape", "--directions", "random", "--num-directions", "2", "--steps", "3",
             "--pgd-steps", "1", "--surface", "random,random", "--surface-steps", "3")


def test_hessian_cli_resumes_without_recomputing(run, tmp_path, monkeypatch):
    x, y = make_data(24, seed=5)
    out = str(tmp_path / "resumed" / "flatness")
    hvps = _count(monkeypatch, H.HessianOperator, "__call__")
    attacks = _count(monkeypatch, H, "adversarial_examples")
    saved = _interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        _main(tmp_path / "resumed", run, x, y, *HESSIAN)
    assert saved == ["eigen", "trace_0000"] and len(hvps) == 8 + 1 and len(attacks) == 1
    (part,) = _partials(out)
    assert part.startswith("hessian_robust_last-ep3-")
    assert sorted(os.listdir(os.path.join(out, ".partial", part))) == \
        ["adversarial_examples.npy", "eigen.npz", "trace_0000.npz"]

    monkeypatch.undo()
    hvps = _count(monkeypatch, H.HessianOperator, "__call__")
    attacks = _count(monkeypatch, H, "adversarial_examples")
    resumed = _main(tmp_path / "resumed", run, x, y, *HESSIAN)
    assert len(hvps) == 2 + 2 * 8 and resumed["num_hvps"] == 18 and attacks == []  # nothing done twice
    assert resumed["resumed_units"] == ["eigen", "trace_0000"] and _partials(out) == []
    assert json.loads(open(os.path.join(out, "hessian_robust_last-ep3.json")).read())["lambda_max"] == \
        resumed["lambda_max"]
    assert os.path.getsize(os.path.join(out, "hessian_robust_last-ep3_density.png")) > 1000

    again = _main(tmp_path / "resumed", run, x, y, *HESSIAN)  # finished: read back, not recomputed
    assert again["fingerprint"] == resumed["fingerprint"] and len(hvps) == 18

    full = _main(tmp_path / "full", run, x, y, *HESSIAN)
    assert full["num_hvps"] == 8 + 3 + 2 * 8 and full["resumed_units"] == []
    assert full["fingerprint"] == resumed["fingerprint"]  # the same settings, uninterrupted
    timing = ("seconds", "num_hvps", "seconds_per_hvp", "resumed_units")
    assert {k: v for k, v in full.items() if k not in timing} == {k: v for k, v in resumed.items()
                                                                  if k not in timing}


def test_landscape_cli_resumes_curves_and_surface_rows(run, tmp_path, monkeypatch):
    x, y = make_data(8, seed=6)
    out = str(tmp_path / "resumed" / "flatness")
    points = _count(monkeypatch, L, "_eval")
    saved = _interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        _main(tmp_path / "resumed", run, x, y, *LANDSCAPE)
    assert saved == ["unperturbed", "random_000"] and len(points) == 1 + 3
    monkeypatch.undo()

    # A changed setting gets a fresh fingerprint: nothing is taken from the first run's units.
    points = _count(monkeypatch, L, "_eval")
    saved = _interrupt_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        _main(tmp_path / "resumed", run, x, y, *LANDSCAPE, "--span", "0.5")
    assert saved == ["unperturbed"] and len(points) == 1
    assert len([p for p in _partials(out) if not p.startswith("landscape_last-ep3_surface")]) == 2
    monkeypatch.undo()

    points = _count(monkeypatch, L, "_eval")
    saved = _interrupt_after(monkeypatch, 2)  # the second curve, then the first row of the surface
    with pytest.raises(KeyboardInterrupt):
        _main(tmp_path / "resumed", run, x, y, *LANDSCAPE)
    assert saved == ["random_001", "row_000"] and len(points) == 3 + 3
    monkeypatch.undo()

    points = _count(monkeypatch, L, "_eval")
    resumed = _main(tmp_path / "resumed", run, x, y, *LANDSCAPE)
    assert len(points) == 2 * 3  # the two missing rows only
    assert resumed["resumed_units"] == ["random_000", "random_001", "unperturbed"]
    surf = json.loads(open(os.path.join(out, "landscape_last-ep3_surface.json")).read())
    assert surf["resumed_rows"] == [0]
    for f in ("landscape_last-ep3.png", "landscape_last-ep3_surface.png"):
        assert os.path.getsize(os.path.join(out, f)) > 1000
    left = _partials(out)  # only the abandoned span=0.5 run's directories
    assert len(left) == 2 and not any(p.endswith(resumed["fingerprint"]) for p in left)

    full = _main(tmp_path / "full", run, x, y, *LANDSCAPE)
    assert len(points) == 2 * 3 + 1 + 2 * 3 + 9
    assert full["fingerprint"] == resumed["fingerprint"]
    for key in ("s", "unperturbed", "kinds", "num_examples"):
        assert full[key] == resumed[key]
    full_surf = np.load(tmp_path / "full" / "flatness" / "landscape_last-ep3_surface.npz")
    resumed_surf = np.load(os.path.join(out, "landscape_last-ep3_surface.npz"))
    for m in L.METRICS:
        np.testing.assert_array_equal(full_surf[m], resumed_surf[m])
    assert np.ptp(resumed_surf["robust_loss"]) > 0
    assert np.ptp(resumed["kinds"]["random"]["aggregate"]["clean_loss"]) > 0
