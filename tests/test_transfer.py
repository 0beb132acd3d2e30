"""Kendall's tau-b and its bootstrap interval (kvcompress/eval/stats.py), the statistic of results/transfer/."""
from __future__ import annotations

import math

import numpy as np
import pytest

from kvcompress.eval.stats import kendall_tau, kendall_tau_ci


def brute_tau_b(x, y) -> float:
    """Concordant minus discordant pairs over sqrt(untied pairs in x * untied pairs in y), pair by pair."""
    n, num, nx, ny = len(x), 0, 0, 0
    for i in range(n):
        for j in range(i + 1, n):
            s, t = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
            num, nx, ny = num + s * t, nx + (s != 0), ny + (t != 0)
    return num / math.sqrt(nx * ny)


def test_tau_known_values():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)       # one discordant pair of six
    assert kendall_tau([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / math.sqrt(6))  # tau-b: a tie in x
    assert math.isnan(kendall_tau([1, 1, 1], [1, 2, 3]))                         # one ranking all ties


def test_tau_matches_pairwise_definition_with_ties():
    rng = np.random.default_rng(3)
    for _ in range(20):
        x, y = rng.integers(0, 4, 9).astype(float), rng.integers(0, 4, 9).astype(float)
        if len(set(x)) > 1 and len(set(y)) > 1:
            assert kendall_tau(x, y) == pytest.approx(brute_tau_b(x, y))


def test_tau_interval_covers_and_narrows():
    rng = np.random.default_rng(0)
    x = rng.normal(size=40)
    low, high = kendall_tau_ci(x, x + 0.3 * rng.normal(size=40), resamples=500)
    tau = kendall_tau(x, x + 0.3 * rng.normal(size=40))
    assert -1 <= low < high <= 1 and low > 0.3                       # strongly related: clearly positive
    lo2, hi2 = kendall_tau_ci(x, rng.normal(size=40), resamples=500)
    assert lo2 < 0 < hi2                                             # unrelated: the interval holds 0
    assert kendall_tau_ci(x, x, resamples=200) == pytest.approx((1.0, 1.0))
    assert math.isnan(kendall_tau_ci([1, 2], [2, 1], resamples=0)[0]) and not math.isnan(tau)


def test_tau_refuses_mismatched_items():
    with pytest.raises(ValueError, match="same items"):
        kendall_tau([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="NaN"):
        kendall_tau([1, 2, float("nan")], [1, 2, 3])


def test_transfer_preset_composes_every_axis():
    """experiment=transfer: every point composes (with eval=prefill_decode; eval=ruler too), each policy compresses
    at the prompt's end, and the points span every axis (a storage, a policy and a layout change each appear, and
    one triple)."""
    from hydra import compose, initialize_config_dir

    from kvcompress.run import CONF_DIR

    def job(*overrides):
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            return compose("config", overrides=["experiment=transfer", *overrides], return_hydra_config=True)

    points = job().hydra.sweeper.params["+experiment/point"].split(",")
    assert points[0] == "full" and len(points) >= 12
    changed = []
    assert job("+experiment/point=full", "eval=ruler").hydra.runtime.choices.eval == "ruler"
    for point in points:
        cfg = job(f"+experiment/point={point}", "eval=prefill_decode")
        choices = cfg.hydra.runtime.choices
        assert cfg.results_dir == "results/transfer" and choices.eval == "prefill_decode"
        if choices.policy != "none":
            assert cfg.policy.when == "prefill" and 0 < cfg.policy.budget < 1
        changed.append(tuple(c != d for c, d in zip((choices.storage, choices.policy, choices.layout),
                                                    ("dense", "none", "per_layer"), strict=False)))
    assert {(True, False, False), (False, True, False), (False, False, True), (True, True, True)} <= set(changed)
