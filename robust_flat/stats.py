"""Statistics for relating flatness to robust generalization: correlation coefficients with bootstrap confidence
intervals and permutation p-values, and the two-segment line fit of RErr against RLoss (the paper's kink at ln 10).

Pure numpy/scipy: no plotting, no file IO. Used by ``experiments.correlate`` and ``experiments.report``.

* :func:`correlation` -- Pearson, Spearman and Kendall (tau-b) coefficients as ``scipy.stats.pearsonr``,
  ``spearmanr`` and ``kendalltau`` compute them, each with a paired bootstrap confidence interval
  (``scipy.stats.bootstrap``, ``paired=True``, percentile method by default, fixed seed) and a two-sided permutation
  p-value (``scipy.stats.permutation_test``, ``permutation_type="pairings"``: the x values are shuffled against the
  fixed y values; exact when ``n!`` does not exceed the number of resamples). With fewer than ``min_points``
  points or a constant x or y the result holds ``n`` and a ``note`` instead of coefficients.
* :func:`two_segment_fit` -- separate least-squares lines (``scipy.stats.linregress``) for ``x < threshold`` and
  ``x >= threshold`` (default ``ln 10``), slopes with standard errors.
* :func:`pearson`, :func:`spearman`, :func:`kendall` -- the same coefficients vectorized along an axis (what the
  resampling evaluates; equal to scipy's up to rounding).
"""
from __future__ import annotations

import inspect
import math
import warnings
from typing import Callable, Optional, Sequence

import numpy as np
from scipy import stats as sps

LN10 = math.log(10.0)  # RLoss of a uniform prediction over 10 classes (the paper's kink, claim H7)
COEFFICIENTS = ("pearson", "spearman", "kendall")
CI_METHODS = ("percentile", "BCa")
DEFAULT_RESAMPLES = 9999
_ELEMENTS_PER_BATCH = 4_000_000  # resampled pairs evaluated at once (Kendall holds batch x n x n signs)


# ------------------------------------------------------------------------------------------ vectorized statistics
def pearson(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """Pearson's r along ``axis`` (broadcasting ``x`` against ``y``); NaN where x or y is constant."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    xm = x - x.mean(axis=axis, keepdims=True)
    ym = y - y.mean(axis=axis, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (xm * ym).sum(axis=axis) / np.sqrt((xm * xm).sum(axis=axis) * (ym * ym).sum(axis=axis))
    return np.clip(r, -1.0, 1.0)


def spearman(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """Spearman's rho along ``axis``: Pearson's r of the average ranks (ties share their mean rank, as scipy)."""
    return pearson(sps.rankdata(x, axis=axis), sps.rankdata(y, axis=axis), axis=axis)


def kendall(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """Kendall's tau-b along ``axis``: sum of sign(dx) sign(dy) over pairs / sqrt(#pairs untied in x * #untied in y)
    (the tie-corrected tau of ``scipy.stats.kendalltau``); NaN where x or y is constant."""
    x, y = np.moveaxis(np.asarray(x, np.float64), axis, -1), np.moveaxis(np.asarray(y, np.float64), axis, -1)
    sx = np.sign(x[..., :, None] - x[..., None, :])
    sy = np.sign(y[..., :, None] - y[..., None, :])
    with np.errstate(invalid="ignore", divide="ignore"):
        tau = (sx * sy).sum(axis=(-2, -1)) / np.sqrt((sx * sx).sum(axis=(-2, -1)) * (sy * sy).sum(axis=(-2, -1)))
    return np.clip(tau, -1.0, 1.0)


VECTORIZED: dict[str, Callable[..., np.ndarray]] = {"pearson": pearson, "spearman": spearman, "kendall": kendall}
SCIPY: dict[str, Callable] = {"pearson": sps.pearsonr, "spearman": sps.spearmanr, "kendall": sps.kendalltau}


def _rng_kwarg(fn: Callable, seed: int) -> dict:
    """``rng=Generator(seed)`` (scipy >= 1.15) or ``random_state=`` (older scipy) for the resampling functions."""
    name = "rng" if "rng" in inspect.signature(fn).parameters else "random_state"
    return {name: np.random.default_rng(seed)}


def resample_batch(n: int, n_resamples: int) -> int:
    """How many resamples :func:`correlation` evaluates at once for ``n`` points (passed to scipy as ``batch``;
    the resamples drawn depend on it, so a reproduction must pass the same value)."""
    return int(max(1, min(n_resamples, _ELEMENTS_PER_BATCH // max(n * n, 1))))


# ------------------------------------------------------------------------------------------------ correlation
def _clean_pairs(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y differ in length: {x.shape[0]} vs {y.shape[0]}")
    ok = np.isfinite(x) & np.isfinite(y)
    return x[ok], y[ok]


def _bootstrap_ci(x: np.ndarray, y: np.ndarray, fn: Callable, n_resamples: int, confidence_level: float,
                  method: str, seed: int) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DegenerateDataWarning / constant resamples: handled below
        res = sps.bootstrap((x, y), fn, paired=True, vectorized=True, n_resamples=n_resamples,
                            confidence_level=confidence_level, method=method, batch=resample_batch(len(x), n_resamples),
                            **_rng_kwarg(sps.bootstrap, seed))
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    dist = np.asarray(res.bootstrap_distribution)
    undefined = int(np.count_nonzero(~np.isfinite(dist)))
    out = {"ci": [lo, hi], "ci_level": confidence_level, "ci_method": method, "bootstrap_resamples": n_resamples,
           "bootstrap_undefined": undefined, "bootstrap_seed": seed}
    if undefined and method == "percentile" and undefined < len(dist):
        alpha = (1.0 - confidence_level) / 2.0
        lo, hi = np.nanquantile(dist, [alpha, 1.0 - alpha])
        out["ci"] = [float(lo), float(hi)]
        out["ci_note"] = (f"{undefined} of {n_resamples} resamples had a constant column (coefficient undefined); "
                          "the interval is over the other resamples")
    elif not (math.isfinite(lo) and math.isfinite(hi)):
        out["ci"] = [None, None]
        out["ci_note"] = "bootstrap interval undefined (degenerate resamples; too few distinct points)"
    return out


def _permutation_p(x: np.ndarray, y: np.ndarray, fn: Callable, n_resamples: int, seed: int) -> dict:
    res = sps.permutation_test((x,), lambda xs, axis=-1: fn(xs, y, axis=axis), permutation_type="pairings",
                               vectorized=True, n_resamples=n_resamples, alternative="two-sided",
                               batch=resample_batch(len(x), n_resamples), **_rng_kwarg(sps.permutation_test, seed))
    exact = math.factorial(len(x)) <= n_resamples
    return {"p_permutation": float(res.pvalue), "permutations": math.factorial(len(x)) if exact else n_resamples,
            "permutation_exact": exact, "permutation_seed": seed}


def correlation(x: Sequence[float], y: Sequence[float], *, n_resamples: int = DEFAULT_RESAMPLES,
                confidence_level: float = 0.95, ci_method: str = "percentile", seed: int = 0,
                coefficients: Sequence[str] = COEFFICIENTS, min_points: int = 3) -> dict:
    """Pearson, Spearman and Kendall coefficients of the paired points ``(x[i], y[i])`` (non-finite pairs dropped).

    Returns ``{"n": n, "pearson": {...}, "spearman": {...}, "kendall": {...}}``; each coefficient holds
    ``estimate`` (scipy's value), ``p_scipy`` (scipy's asymptotic/exact p-value), ``ci`` ``[low, high]`` with
    ``ci_level``, ``ci_method``, ``bootstrap_resamples``, ``bootstrap_seed``, ``bootstrap_undefined`` (resamples in
    which x or y was constant), and ``p_permutation`` with ``permutations``, ``permutation_exact``,
    ``permutation_seed``. With fewer than ``min_points`` points, or a constant x or y: ``{"n": n, "note": ...}``.
    Every call with the same arguments gives the same numbers (the resampling generators are seeded with ``seed``).
    """
    if ci_method not in CI_METHODS:
        raise ValueError(f"unknown ci_method {ci_method!r}; choose one of {', '.join(CI_METHODS)}")
    unknown = [c for c in coefficients if c not in VECTORIZED]
    if unknown:
        raise ValueError(f"unknown coefficients {unknown}; choose from {', '.join(COEFFICIENTS)}")
    x, y = _clean_pairs(x, y)
    n = int(len(x))
    if n < max(min_points, 3):
        return {"n": n, "note": f"{n} point{'s' if n != 1 else ''}: at least {max(min_points, 3)} are needed for "
                                "a correlation"}
    constant = [name for name, v in (("x", x), ("y", y)) if np.all(v == v[0])]
    if constant:
        return {"n": n, "note": f"{' and '.join(constant)} constant over the {n} points: correlation undefined"}
    out: dict = {"n": n}
    for name in coefficients:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = SCIPY[name](x, y)
        entry = {"estimate": float(res.statistic), "p_scipy": float(res.pvalue)}
        entry.update(_bootstrap_ci(x, y, VECTORIZED[name], n_resamples, confidence_level, ci_method, seed))
        entry.update(_permutation_p(x, y, VECTORIZED[name], n_resamples, seed))
        out[name] = entry
    return out


# ------------------------------------------------------------------------------------------------ line fits
def linear_fit(x: Sequence[float], y: Sequence[float], min_points: int = 3) -> dict:
    """Least-squares line ``y = intercept + slope x`` (``scipy.stats.linregress``) with standard errors; with fewer
    than ``min_points`` finite points or a constant x, ``{"n": n, "note": ...}``."""
    x, y = _clean_pairs(x, y)
    n = int(len(x))
    if n < max(min_points, 2):
        return {"n": n, "note": f"{n} point{'s' if n != 1 else ''}: at least {max(min_points, 2)} are needed "
                                "for a line fit"}
    if np.all(x == x[0]):
        return {"n": n, "note": "x constant: no line fit"}
    res = sps.linregress(x, y)
    return {"n": n, "slope": float(res.slope), "slope_stderr": float(res.stderr), "intercept": float(res.intercept),
            "intercept_stderr": float(res.intercept_stderr), "r": float(res.rvalue), "p": float(res.pvalue)}


def two_segment_fit(x: Sequence[float], y: Sequence[float], threshold: float = LN10, min_points: int = 3) -> dict:
    """Separate lines for ``x < threshold`` (``below``) and ``x >= threshold`` (``above``), as the paper's notebook
    fits RErr against RLoss on either side of ln 10 (claim H7). ``slope_difference`` = below - above slope and
    ``slope_difference_stderr`` = sqrt(se_below^2 + se_above^2) when both segments have a fit."""
    x, y = _clean_pairs(x, y)
    below, above = x < threshold, x >= threshold
    out: dict = {"threshold": float(threshold), "n": int(len(x)), "below": linear_fit(x[below], y[below], min_points),
                 "above": linear_fit(x[above], y[above], min_points)}
    if "slope" in out["below"] and "slope" in out["above"]:
        out["slope_difference"] = out["below"]["slope"] - out["above"]["slope"]
        out["slope_difference_stderr"] = math.hypot(out["below"]["slope_stderr"], out["above"]["slope_stderr"])
    return out


def first_argmin(values: Sequence[Optional[float]]) -> Optional[int]:
    """Index of the smallest finite value, the first one on ties; ``None`` if there is none."""
    best = None
    for i, v in enumerate(values):
        if v is not None and math.isfinite(v) and (best is None or v < values[best]):
            best = i
    return best


__all__ = ["LN10", "COEFFICIENTS", "CI_METHODS", "DEFAULT_RESAMPLES", "pearson", "spearman", "kendall",
           "VECTORIZED", "SCIPY", "resample_batch", "correlation", "linear_fit", "two_segment_fit", "first_argmin"]
