"""Statistics for every report, in one place and on scipy.stats: t intervals over independent replicates,
bootstrap intervals over paired items (questions), exact permutation tests with their p floor, Wilson intervals
for sampled rates (and, for shares pooled over replicates, a Wilson interval whose sample size is cut by the
design effect of the replicates: bounded to [0, 1] yet still over replicates).

The unit matters more than the formula: intervals and p-values here are over whatever the caller passes as
independent units (replicate teachers, seeds, questions); callers say which in their reports.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats as st


def mean_ci95(values: Sequence[float], level: float = 0.95) -> tuple[float, list[float]]:
    """Mean and a two-sided t-interval [lo, hi] (95% unless ``level`` says otherwise, e.g. 1 − 0.05 / m for a
    Bonferroni interval over m choices) over independent replicates (NaN with one replicate)."""
    a = np.asarray(values, dtype=float)
    if a.size == 0:
        raise ValueError("mean_ci95: no values")
    mean = float(a.mean())
    if a.size == 1:
        return mean, [math.nan, math.nan]
    if np.all(a == a[0]):  # every value equal: the interval is the point
        return mean, [mean, mean]
    lo, hi = st.t.interval(level, a.size - 1, loc=mean, scale=st.sem(a))
    return mean, [float(lo), float(hi)]


def one_sided_t(effects: Sequence[float]) -> tuple[float, list[float], float]:
    """Mean, 95% t-interval and the one-sided t-test p (H1: mean > 0) over independent replicates."""
    mean, ci = mean_ci95(effects)
    if len(effects) < 2:
        return mean, ci, math.nan
    return mean, ci, float(st.ttest_1samp(np.asarray(effects, float), 0.0, alternative="greater").pvalue)


def two_sided_t(values: Sequence[float]) -> tuple[float, list[float], float]:
    """Mean, 95% t-interval and the two-sided one-sample t-test p (H1: mean ≠ 0) over independent replicates."""
    mean, ci = mean_ci95(values)
    if len(values) < 2:
        return mean, ci, math.nan
    return mean, ci, float(st.ttest_1samp(np.asarray(values, float), 0.0).pvalue)


def bootstrap_ci95(values: Sequence[float] | np.ndarray, n_boot: int = 10_000, seed: int = 0) -> list[float]:
    """Percentile bootstrap 95% interval of the mean (for paired differences over questions)."""
    a = np.asarray(values, dtype=float)
    if a.size < 2 or np.all(a == a[0]):
        return [float(a.mean()), float(a.mean())] if a.size else [math.nan, math.nan]
    res = st.bootstrap(
        (a,), np.mean, n_resamples=n_boot, method="percentile", rng=np.random.default_rng(seed)
    )
    return [float(res.confidence_interval.low), float(res.confidence_interval.high)]


def bootstrap_ratio_ci95(
    num: Sequence[float] | np.ndarray, den: Sequence[float] | np.ndarray, n_boot: int = 2_000, seed: int = 0
) -> list[float]:
    """Percentile bootstrap 95% interval of mean(num) / mean(den) over paired items (questions): e.g. the fraction
    of a gap a patch recovers, resampling the questions both means are taken over."""
    a, b = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    if a.size < 2:
        return [math.nan, math.nan]

    def ratio(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.asarray(x.mean(axis=axis) / y.mean(axis=axis))

    if np.allclose(a, b):  # every resample gives exactly 1: scipy's degenerate-distribution warning aside
        return [1.0, 1.0]
    res = st.bootstrap((a, b), ratio, paired=True, vectorized=True, n_resamples=n_boot, method="percentile",
                       rng=np.random.default_rng(seed))  # fmt: skip
    return [float(res.confidence_interval.low), float(res.confidence_interval.high)]


def pearson(
    x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray
) -> dict[str, float | list[float]]:
    """Pearson r of paired values with scipy's 95% interval (Fisher z; needs n ≥ 4) and two-sided p:
    ``{"r", "ci95", "p", "n"}``, NaN where it is undefined (n < 3, or either side constant)."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"pearson: x and y must be 1-d and paired (got shapes {a.shape} and {b.shape})")
    out: dict[str, float | list[float]] = {
        "r": math.nan,
        "ci95": [math.nan, math.nan],
        "p": math.nan,
        "n": a.size,
    }
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return out
    res = st.pearsonr(a, b)
    out["r"], out["p"] = float(res.statistic), float(res.pvalue)
    if a.size >= 4:
        ci = res.confidence_interval(0.95)
        out["ci95"] = [float(ci.low), float(ci.high)]
    return out


def random_control(real: float, draws: Sequence[float] | np.ndarray) -> dict[str, float]:
    """Where a real value stands among random-control draws: their mean and 2.5/97.5 percentiles, the real
    value's rank (1: above every draw) and its one-sided empirical p, (1 + #draws ≥ real) / (1 + n)."""
    d = np.asarray(draws, dtype=float)
    if d.size == 0:
        raise ValueError("random_control: no draws")
    lo, hi = np.percentile(d, [2.5, 97.5])
    return {"real": float(real), "mean": float(d.mean()), "p2_5": float(lo), "p97_5": float(hi),
            "rank": int(1 + np.sum(d > real)), "p_value": float((1 + np.sum(d >= real)) / (1 + d.size)),
            "n": int(d.size)}  # fmt: skip


def permutation_p(a: Sequence[float], b: Sequence[float], n_perm: int = 10_000, seed: int = 0) -> float:
    """Two-sided permutation p-value for a difference in means between two groups of independent replicates;
    exact (every relabelling enumerated) when there are at most ``n_perm`` of them."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)

    def diff(u: np.ndarray, v: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.asarray(u.mean(axis=axis) - v.mean(axis=axis))

    res = st.permutation_test((x, y), diff, permutation_type="independent", alternative="two-sided",
                              n_resamples=n_perm, vectorized=True, rng=np.random.default_rng(seed))  # fmt: skip
    return float(res.pvalue)


def wilson_ci95(k: int, n: int) -> list[float]:
    """Wilson score 95% interval for a sampled rate k/n (never the degenerate [0, 0] of a normal interval)."""
    if n <= 0:
        return [math.nan, math.nan]
    ci = st.binomtest(int(k), int(n)).proportion_ci(confidence_level=0.95, method="wilson")
    return [float(ci.low), float(ci.high)]


def _wilson(p: float, n: float, z: float) -> list[float]:
    """The Wilson score interval for a proportion p over n (not necessarily whole) trials, clipped to [0, 1]."""
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(max(p * (1 - p), 0.0) / n + z * z / (4 * n * n))
    return [max(0.0, centre - half), min(1.0, centre + half)]


def clustered_share_ci95(successes: Sequence[int], trials: Sequence[int]) -> dict[str, Any]:
    """A share pooled over clusters (e.g. teacher seeds, each scored on the same held-out items) with a bounded
    95% interval that keeps the cluster as the unit: the Wilson score interval at the pooled share p = Σk / Σn
    with the effective sample size n_eff = Σn / deff, where the Kish design effect deff = Var_cluster(p) /
    Var_binomial(p) compares the between-cluster variance of p (the ratio estimator over clusters,
    Σ (n_j / n̄)² (p_j − p)² / (J (J − 1))) with the binomial p (1 − p) / Σn; for equal clusters of m items this is
    deff = m s² / (p (1 − p)), s² the sample variance of the cluster shares, i.e. 1 + (m − 1) ICC.

    deff is floored at 1: clusters that agree more closely than binomial sampling would (or a single cluster, or
    p at 0 or 1, where no spread is estimable) give the plain Wilson interval over every item, never a narrower
    one. Unlike a t-interval over cluster means it never leaves [0, 1], and at p = 0 or 1 it is not the
    degenerate point. Returns ``{"mean", "ci95", "deff", "n_eff"}``."""
    k, n = np.asarray(successes, dtype=float), np.asarray(trials, dtype=float)
    if k.shape != n.shape or k.ndim != 1 or k.size == 0:
        raise ValueError("clustered_share_ci95: one success count and one trial count per cluster")
    if np.any(n <= 0) or np.any(k < 0) or np.any(k > n):
        raise ValueError("clustered_share_ci95: need 0 ≤ successes ≤ trials and trials > 0 in every cluster")
    big_n, j = float(n.sum()), k.size
    p = float(k.sum() / big_n)
    deff = 1.0
    if j >= 2 and 0.0 < p < 1.0:
        var_cluster = float(np.sum((n / n.mean()) ** 2 * (k / n - p) ** 2) / (j * (j - 1)))
        deff = max(1.0, var_cluster / (p * (1 - p) / big_n))
    n_eff = big_n / deff
    return {"mean": p, "ci95": _wilson(p, n_eff, float(st.norm.ppf(0.975))), "deff": deff, "n_eff": n_eff}


def two_way_share_ci95(hits: Any) -> dict[str, Any]:
    """A share over a crossed design: every row (e.g. a teacher seed) scored 0/1 on every column (e.g. a held-out
    problem, the same for every seed). The 95% Wilson interval at n_eff = n / deff with deff = deff_rows +
    deff_cols − 1: the two-way cluster-robust variance of the mean (Cameron, Gelbach & Miller 2011), V_rows +
    V_cols − V_cells, where each cell holds one outcome, so V_cells is the binomial variance; each one-way design
    effect is `clustered_share_ci95`'s (floored at 1), so the two-way one is never below either. Returns
    ``{"mean", "ci95", "deff", "n_eff", "deff_rows", "deff_cols", "ci95_cols"}`` (ci95_cols: the columns alone
    as the cluster)."""
    h = np.asarray(hits, dtype=float)
    if h.ndim != 2 or h.size == 0 or not np.isin(h, (0.0, 1.0)).all():
        raise ValueError("two_way_share_ci95: a non-empty (rows, columns) array of 0/1 outcomes")
    rows = clustered_share_ci95(h.sum(1), [h.shape[1]] * h.shape[0])
    cols = clustered_share_ci95(h.sum(0), [h.shape[0]] * h.shape[1])
    deff = rows["deff"] + cols["deff"] - 1.0
    n_eff = h.size / deff
    return {"mean": rows["mean"], "ci95": _wilson(rows["mean"], n_eff, float(st.norm.ppf(0.975))), "deff": deff,
            "n_eff": n_eff, "deff_rows": rows["deff"], "deff_cols": cols["deff"], "ci95_cols": cols["ci95"]}  # fmt: skip


@dataclass(frozen=True)
class LabelTest:
    """An exact (or Monte-Carlo) permutation test over the labels of independent units."""

    observed: float
    p_value: float
    p_floor: float  # the smallest p this design can give: 1 / (number of distinct labelings)
    n_labelings: int
    exact: bool
    n_sampled: int = (
        0  # random relabelings drawn when not exact: p = (hits + 1) / (n_sampled + 1) ≥ its inverse
    )


def _distinct_labelings(labels: Sequence[int]) -> list[tuple[int, ...]]:
    """Every distinct assignment of the multiset ``labels`` to positions (multinomial many)."""
    counts: dict[int, int] = {}
    for v in labels:
        counts[v] = counts.get(v, 0) + 1
    n = len(labels)
    out: list[tuple[int, ...]] = []

    def fill(pos_left: tuple[int, ...], kinds: list[int], assign: dict[int, int]) -> None:
        if not kinds:
            out.append(tuple(assign[i] for i in range(n)))
            return
        kind, rest = kinds[0], kinds[1:]
        for chosen in itertools.combinations(pos_left, counts[kind]):
            left = tuple(p for p in pos_left if p not in chosen)
            fill(left, rest, {**assign, **dict.fromkeys(chosen, kind)})

    fill(tuple(range(n)), sorted(counts), {})
    return out


def n_labelings(labels: Sequence[int]) -> int:
    """How many distinct relabelings a design has (n! / Π count!)."""
    counts: dict[int, int] = {}
    for v in labels:
        counts[v] = counts.get(v, 0) + 1
    return math.factorial(len(labels)) // math.prod(math.factorial(c) for c in counts.values())


def label_permutation_test(
    labels: Sequence[int] | np.ndarray,
    statistic: Callable[[np.ndarray], float],
    max_exact: int = 200_000,
    n_random: int = 20_000,
    seed: int = 0,
) -> LabelTest:
    """One-sided test that ``statistic(labels)`` is larger than under exchangeable labels.

    Units (e.g. replicate teachers with their data) keep their measurements; only their labels move. Every
    distinct labeling is enumerated when there are at most ``max_exact`` (p = share of labelings at least as
    large as the observed one, the observed included; the floor is 1 / their number); otherwise ``n_random``
    random labelings give (hits + 1) / (n_random + 1).
    """
    return block_permutation_test(
        labels, np.zeros(len(labels), dtype=int), statistic, max_exact, n_random, seed
    )


def diagonal_statistic(rows: np.ndarray) -> Callable[[np.ndarray], float]:
    """For a (units, evaluated traits) array of Δ log P: the mean over traits e of (units labelled e on e − the
    other units on e). Large when each unit raises its own trait most."""
    n_traits = rows.shape[1]

    def stat(labels: np.ndarray) -> float:
        out = 0.0
        for e in range(n_traits):
            own, other = rows[labels == e, e], rows[labels != e, e]
            if own.size == 0 or other.size == 0:
                return -math.inf
            out += own.mean() - other.mean()
        return out / n_traits

    return stat


def block_permutation_test(
    labels: Sequence[int] | np.ndarray,
    blocks: Sequence[int] | np.ndarray,
    statistic: Callable[[np.ndarray], float],
    max_exact: int = 400_000,
    n_random: int = 20_000,
    seed: int = 0,
) -> LabelTest:
    """One-sided label test for a blocked design: labels are permuted only within each block (the units of one
    block share something, e.g. the number prompts of a replicate). Every within-block relabeling is enumerated
    when there are at most ``max_exact`` distinct ones, else ``n_random`` random ones give (hits + 1) / (n + 1);
    the floor is 1 / (the number of distinct relabelings: the product over blocks of n_b! / Π count!)."""
    lab, blk = np.asarray(labels), np.asarray(blocks)
    observed = float(statistic(lab))
    groups = [np.flatnonzero(blk == b) for b in np.unique(blk)]
    total = math.prod(n_labelings(list(lab[g])) for g in groups)
    if total <= max_exact:
        per_block = [_distinct_labelings(list(lab[g])) for g in groups]
        values = []
        for combo in itertools.product(*per_block):
            perm = lab.copy()
            for g, assign in zip(groups, combo, strict=True):
                perm[g] = assign
            values.append(statistic(perm))
        p = float(np.mean(np.asarray(values) >= observed - 1e-12))
        return LabelTest(observed, p, 1.0 / total, total, True)
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(n_random):
        perm = lab.copy()
        for g in groups:
            perm[g] = rng.permutation(lab[g])
        hits += statistic(perm) >= observed - 1e-12
    return LabelTest(observed, (hits + 1) / (n_random + 1), 1.0 / total, total, False, n_random)


def specificity_test(matrix: np.ndarray, within_units: bool = True, **kw: int) -> LabelTest:
    """Permutation test that the diagonal dominates a (trait, unit, evaluated trait) array of Δ log P, shuffling
    the trait labels of the teachers (exact where feasible). The units must be independent: replicate teachers
    with their own data, not students of one teacher. ``within_units``: unit j is a block (the teachers of one
    replicate share its prompts) and labels move only inside it, as the design assigned them; otherwise across
    all teachers."""
    n_t, n_u, _ = matrix.shape
    rows = matrix.reshape(n_t * n_u, matrix.shape[2])
    labels = np.repeat(np.arange(n_t), n_u)
    if within_units and n_u > 1:
        return block_permutation_test(labels, np.tile(np.arange(n_u), n_t), diagonal_statistic(rows), **kw)
    return label_permutation_test(labels, diagonal_statistic(rows), **kw)
