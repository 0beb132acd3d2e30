"""Bootstrap confidence intervals (Efron & Tibshirani, 1993), percentile method, seeded.

Given n per-sample values x_1..x_n and a statistic s, draw R resamples of n indices with replacement,
compute s on each, and report the (a/2, 1 - a/2) quantiles of those R values as the interval
(a = 1 - level, 0.05 for a 95% interval). Three statistics cover the evaluations here:

* ``mean_ci``: the mean of per-sample scores (accuracy over prompts);
* ``stratified_mean_ci``: the mean of group means, each group resampled on its own (an average over
  tasks or lengths, where every group is its own population);
* ``ratio_ci``: f(sum num / sum den) over units resampled as pairs (perplexity = exp(sum NLL / sum tokens)
  over windows of possibly different token counts).

``kendall_tau`` (Kendall's tau-b, 1945) compares two rankings of the same items (caches ranked on two models):
with s_ij = sign(x_i - x_j) and t_ij = sign(y_i - y_j) over the pairs i < j,

    tau_b = sum s_ij t_ij / sqrt(sum s_ij^2 * sum t_ij^2)

(concordant minus discordant pairs over the untied pairs of each ranking; 1 = same order, -1 = reversed).
``kendall_tau_ci`` resamples the items as (x_i, y_i) pairs, the usual bootstrap of a correlation; a resample
whose x or y is all ties has no tau and is left out of the quantiles.

Metrics with an interval are recorded as ``X``, ``X/ci_low``, ``X/ci_high`` (``interval_metrics``).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

LEVEL = 0.95


def bootstrap(statistic: Callable[[np.ndarray], np.ndarray], n: int, resamples: int, seed: int,
              level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval of ``statistic(idx)`` -> (R,) over R index resamples idx (R, n); none (NaN, NaN) for
    n < 2: one sample cannot estimate a spread (its resamples are all the same, a zero-width "interval")."""
    if n < 2 or resamples <= 0:
        return math.nan, math.nan
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    values = statistic(idx)
    alpha = (1.0 - level) / 2
    values = values[~np.isnan(values)]  # a statistic undefined on a resample (tau of all-tied items)
    if values.size == 0:
        return math.nan, math.nan
    low, high = np.quantile(values, [alpha, 1.0 - alpha])
    return float(low), float(high)


def mean_ci(values: Sequence[float], resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    x = np.asarray(values, dtype=np.float64)
    return bootstrap(lambda idx: x[idx].mean(1), len(x), resamples, seed)


def stratified_mean_ci(groups: Sequence[Sequence[float]], resamples: int = 1000, seed: int = 0
                       ) -> tuple[float, float]:
    """Interval of mean_g(mean(group g)): each group resampled independently (same seed stream)."""
    groups = [np.asarray(g, dtype=np.float64) for g in groups if len(g)]
    if all(len(g) < 2 for g in groups) or resamples <= 0:  # no group with a spread (none at all: no interval)
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = np.stack([g[rng.integers(0, len(g), size=(resamples, len(g)))].mean(1) for g in groups])
    alpha = (1.0 - LEVEL) / 2
    low, high = np.quantile(means.mean(0), [alpha, 1.0 - alpha])
    return float(low), float(high)


def ratio_ci(num: Sequence[float], den: Sequence[float], resamples: int = 1000, seed: int = 0,
             transform: Callable[[np.ndarray], np.ndarray] = lambda r: r) -> tuple[float, float]:
    """Interval of transform(sum num / sum den), units (num_i, den_i) resampled together."""
    a, b = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return bootstrap(lambda idx: transform(a[idx].sum(1) / b[idx].sum(1)), len(a), resamples, seed)


def _tau_b(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """tau_b of rows x, y (R, n) -> (R,); NaN where a row of x or y is all ties."""
    s = np.sign(x[:, :, None] - x[:, None, :])
    t = np.sign(y[:, :, None] - y[:, None, :])
    den = np.sqrt((s * s).sum((1, 2)) * (t * t).sum((1, 2)))  # each pair twice, as in the numerator
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (s * t).sum((1, 2)) / np.where(den > 0, den, 1.0), np.nan)


def _pairs(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"kendall_tau: x and y must be two scores of the same items, got shapes {a.shape}, {b.shape}")
    if np.isnan(a).any() or np.isnan(b).any():
        raise ValueError("kendall_tau: a score is NaN (an item without a value on one ranking)")
    return a, b


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b of two scores of the same n items (NaN if either ranks all items equal, or n < 2)."""
    a, b = _pairs(x, y)
    return float(_tau_b(a[None], b[None])[0])


def kendall_tau_ci(x: Sequence[float], y: Sequence[float], resamples: int = 1000, seed: int = 0
                   ) -> tuple[float, float]:
    """Percentile interval of tau_b over resamples of the items (pairs (x_i, y_i) drawn with replacement)."""
    a, b = _pairs(x, y)
    return bootstrap(lambda idx: _tau_b(a[idx], b[idx]), len(a), resamples, seed)


def interval_metrics(name: str, value: float, ci: tuple[float, float]) -> dict[str, float]:
    """``{name: value, name/ci_low: ..., name/ci_high: ...}``: the record's convention for error bars. No interval
    (``eval.bootstrap=0``, or no samples: both NaN) records the value alone, never a NaN (a non-finite metric
    fails the run)."""
    if all(math.isnan(c) for c in ci):
        return {name: value}
    return {name: value, f"{name}/ci_low": ci[0], f"{name}/ci_high": ci[1]}
