"""Intervals for the demo's claims: percentile bootstrap over independent units (prompts, pairs, edits).

Tokens of one completion are not independent, so every interval resamples whole units and recomputes the
statistic on everything the units hold. numpy only; seeded, so a run's intervals are reproducible.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

Interval = tuple[float, float, float]  # (estimate, lower, upper)


def bootstrap(stat: Callable[[np.ndarray], float], n_units: int, n_boot: int = 1000, alpha: float = 0.05,
              seed: int = 0) -> Interval:
    """stat(idx) on all units and on `n_boot` resamples of unit indices (with replacement):
    (stat(all), the alpha/2 and 1 - alpha/2 percentiles of the resampled values). NaN resamples are dropped."""
    if n_units < 1:
        return (float("nan"),) * 3  # type: ignore[return-value]
    rng = np.random.default_rng(seed)
    est = float(stat(np.arange(n_units)))
    vals = np.array([stat(rng.integers(0, n_units, n_units)) for _ in range(n_boot)], dtype=float)
    vals = vals[np.isfinite(vals)]
    if len(vals) == 0:
        return est, float("nan"), float("nan")
    lo, hi = np.quantile(vals, [alpha / 2, 1 - alpha / 2])
    return est, float(lo), float(hi)


def mean_ci(x: Sequence[float] | np.ndarray, n_boot: int = 1000, seed: int = 0) -> Interval:
    """Mean of x (one value per unit) with its bootstrap interval."""
    x = np.asarray(x, dtype=float)
    return bootstrap(lambda i: x[i].mean(), len(x), n_boot, seed=seed)


def paired_diff_ci(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, n_boot: int = 1000,
                   seed: int = 0) -> Interval:
    """mean(a - b) over units measured under both conditions (the same prompts), with its interval."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in shape: {a.shape} and {b.shape}")
    return mean_ci(a - b, n_boot, seed)


def wins(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> np.ndarray:
    """Per unit: 1 where a beats b, 0.5 on a tie, 0 where b wins (the mean is the win rate)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); NaN for fewer than 3 points or a constant side."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3 or np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan")
    return float(spearmanr(x, y).statistic)


def cluster_bootstrap(stat: Callable[[np.ndarray], float], clusters: Sequence[int] | np.ndarray, n_boot: int = 1000,
                      seed: int = 0) -> Interval:
    """stat(item indices) on all items, with an interval from resampling whole clusters (the items of one unit:
    the tokens of one pair, the edits of one source text), since items of a cluster are not independent."""
    _, g = np.unique(np.asarray(clusters), return_inverse=True)
    members = [np.flatnonzero(g == k) for k in range(g.max() + 1)] if len(g) else []

    def on_units(units: np.ndarray) -> float:
        idx = np.concatenate([members[u] for u in units]) if len(units) else np.zeros(0, int)
        return stat(idx)

    return bootstrap(on_units, len(members), n_boot, seed=seed)


def grouped_spearman_ci(x: Sequence[float], y: Sequence[float], group: Sequence[int], n_boot: int = 1000,
                        seed: int = 0) -> Interval:
    """Spearman correlation of (x, y) points that come in groups (the tokens of one pair), with an interval
    from resampling whole groups."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    return cluster_bootstrap(lambda i: spearman(x[i], y[i]), group, n_boot, seed)


def spearman_margin_ci(x: Sequence[float], nulls: Sequence[Sequence[float]], y: Sequence[float],
                       group: Sequence[int], n_boot: int = 1000, seed: int = 0) -> Interval:
    """Spearman(x, y) minus the largest Spearman(null_k, y), every one on the same points: paired, with groups
    resampled together, so the interval is of the margin over the best null on each resample."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ns = [np.asarray(n, dtype=float) for n in nulls]
    return cluster_bootstrap(lambda i: spearman(x[i], y[i]) - max(spearman(n[i], y[i]) for n in ns), group,
                             n_boot, seed)


def slope(x: np.ndarray, y: np.ndarray) -> float:
    """Least-squares slope of y on x; NaN when x is constant."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    dx = x - x.mean()
    den = float((dx * dx).sum())
    return float((dx * (y - y.mean())).sum() / den) if den > 0 else float("nan")


def distinct_n(tokens: Sequence[int], n: int = 2) -> float:
    """Distinct n-grams / n-grams in one sequence (1.0: no n-gram repeats; NaN if shorter than n)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")
