"""Bootstrap confidence intervals (Efron & Tibshirani, 1993), percentile method, seeded.

Given n per-sample values x_1..x_n and a statistic s, draw R resamples of n indices with replacement,
compute s on each, and report the (a/2, 1 - a/2) quantiles of those R values as the interval
(a = 1 - level, 0.05 for a 95% interval). Three statistics cover the evaluations here:

* ``mean_ci``: the mean of per-sample scores (accuracy over prompts);
* ``stratified_mean_ci``: the mean of group means, each group resampled on its own (an average over
  tasks or lengths, where every group is its own population);
* ``ratio_ci``: f(sum num / sum den) over units resampled as pairs (perplexity = exp(sum NLL / sum tokens)
  over windows of possibly different token counts).

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


def interval_metrics(name: str, value: float, ci: tuple[float, float]) -> dict[str, float]:
    """``{name: value, name/ci_low: ..., name/ci_high: ...}``: the record's convention for error bars. No interval
    (``eval.bootstrap=0``, or no samples: both NaN) records the value alone, never a NaN (a non-finite metric
    fails the run)."""
    if all(math.isnan(c) for c in ci):
        return {name: value}
    return {name: value, f"{name}/ci_low": ci[0], f"{name}/ci_high": ci[1]}
