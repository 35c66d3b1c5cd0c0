"""Bootstrap intervals and the small statistics behind the demo's claims, against direct computations."""

import numpy as np
import pytest
from scipy.stats import spearmanr

from r2q.stats import bootstrap, distinct_n, grouped_spearman_ci, mean_ci, paired_diff_ci, wins


def test_mean_ci_covers_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 1.0, 400)
    est, lo, hi = mean_ci(x, seed=1)
    assert est == pytest.approx(x.mean()) and lo < est < hi
    # the normal approximation: half-width ~ 1.96 sd / sqrt(n)
    assert (hi - lo) / 2 == pytest.approx(1.96 * x.std() / 20, rel=0.15)
    est2, lo2, hi2 = mean_ci(x[:100], seed=1)
    assert hi2 - lo2 > 1.5 * (hi - lo)
    assert mean_ci(np.full(10, 3.0)) == (3.0, 3.0, 3.0)


def test_paired_difference_uses_the_pairing():
    rng = np.random.default_rng(0)
    base = rng.normal(0, 5, 200)  # large per-prompt spread shared by both conditions
    a, b = base + 0.5 + rng.normal(0, 0.1, 200), base
    est, lo, hi = paired_diff_ci(a, b)
    assert est == pytest.approx(0.5, abs=0.03) and lo > 0.4 and hi < 0.6
    with pytest.raises(ValueError, match="shape"):
        paired_diff_ci(a, b[:10])


def test_wins_count_ties_half():
    assert wins([1, 2, 3], [0, 2, 5]).tolist() == [1.0, 0.5, 0.0]


def test_grouped_spearman_equals_scipy_and_resamples_groups():
    rng = np.random.default_rng(0)
    x = rng.normal(size=300)
    y = 0.5 * x + rng.normal(size=300)
    groups = np.repeat(np.arange(30), 10)
    est, lo, hi = grouped_spearman_ci(x, y, groups, n_boot=300)
    assert est == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    assert lo < est < hi
    # one group holding every point: each resample is the same data, so no spread
    est1, lo1, hi1 = grouped_spearman_ci(x, y, np.zeros(300, int), n_boot=20)
    assert lo1 == pytest.approx(est1) and hi1 == pytest.approx(est1)


def test_bootstrap_resamples_units_with_replacement():
    seen = []
    bootstrap(lambda i: seen.append(np.asarray(i).copy()) or 0.0, 5, n_boot=50, seed=0)
    assert seen[0].tolist() == [0, 1, 2, 3, 4]  # the estimate uses every unit once
    assert any(len(set(s.tolist())) < 5 for s in seen[1:])  # resamples repeat units


def test_distinct_n():
    assert distinct_n([1, 2, 3, 4], 2) == 1.0
    assert distinct_n([1, 1, 1, 1], 2) == pytest.approx(1 / 3)
    assert np.isnan(distinct_n([1], 2))
