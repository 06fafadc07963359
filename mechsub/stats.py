"""Small statistics used by every report: means with t-based 95% intervals, bootstrap and permutation tests."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats as _st


def mean_ci95(values: Sequence[float]) -> tuple[float, list[float]]:
    """Mean and a two-sided 95% t-interval [lo, hi] over independent replicates (models, seeds)."""
    a = np.asarray(values, dtype=float)
    if a.size == 0:
        raise ValueError("mean_ci95: no values")
    mean = float(a.mean())
    if a.size == 1:
        return mean, [math.nan, math.nan]
    half = float(_st.t.ppf(0.975, a.size - 1) * a.std(ddof=1) / math.sqrt(a.size))
    return mean, [mean - half, mean + half]


def bootstrap_ci95(values: Sequence[float] | np.ndarray, n_boot: int = 10_000, seed: int = 0) -> list[float]:
    """Percentile bootstrap 95% interval of the mean (for paired differences over questions)."""
    a = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = a[rng.integers(0, a.size, size=(n_boot, a.size))].mean(1)
    return [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]


def permutation_p(a: Sequence[float], b: Sequence[float], n_perm: int = 10_000, seed: int = 0) -> float:
    """Two-sided permutation p-value for a difference in means between two groups of replicates."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    pooled = np.concatenate([x, y])
    observed = abs(x.mean() - y.mean())
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(n_perm):
        p = rng.permutation(pooled)
        hits += abs(p[: x.size].mean() - p[x.size :].mean()) >= observed - 1e-12
    return (hits + 1) / (n_perm + 1)


def bootstrap_ratio_ci95(
    num: Sequence[float] | np.ndarray, den: Sequence[float] | np.ndarray, n_boot: int = 2_000, seed: int = 0
) -> list[float]:
    """Percentile bootstrap 95% interval of mean(num) / mean(den) over paired items (questions): e.g. the fraction
    of a gap a patch recovers, resampling the questions both means are taken over."""
    a, b = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    idx = np.random.default_rng(seed).integers(0, a.size, size=(n_boot, a.size))
    r = a[idx].mean(1) / b[idx].mean(1)
    return [float(np.nanquantile(r, 0.025)), float(np.nanquantile(r, 0.975))]
