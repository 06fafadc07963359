import itertools
import math

import numpy as np
import pytest

from mechsub import stats


def test_mean_ci95_matches_the_t_interval_by_hand():
    mean, (lo, hi) = stats.mean_ci95([1.0, 2.0, 3.0])
    half = 4.302652729911275 * 1.0 / math.sqrt(3)  # t(0.975, 2) × sd / √n
    assert mean == 2.0 and lo == pytest.approx(2 - half) and hi == pytest.approx(2 + half)
    assert all(math.isnan(v) for v in stats.mean_ci95([5.0])[1])


def test_ratio_bootstrap_covers_the_ratio_and_collapses_when_exact():
    rng = np.random.default_rng(0)
    den = rng.normal(1.0, 0.3, 40)
    num = 0.6 * den + rng.normal(0, 0.05, 40)
    lo, hi = stats.bootstrap_ratio_ci95(num, den)
    assert lo < num.mean() / den.mean() < hi and hi - lo < 0.2
    assert stats.bootstrap_ratio_ci95(den, den) == pytest.approx([1.0, 1.0])


def test_permutation_p_separates_shifted_groups():
    assert stats.permutation_p([5.0, 5.1, 4.9, 5.2], [0.0, 0.1, -0.1, 0.2], n_perm=2000) < 0.05
    assert stats.permutation_p([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], n_perm=2000) == 1.0


def test_one_sided_t_p_matches_the_closed_form_for_two_degrees_of_freedom():
    # t = mean / (sd/√n) = 2 / (1/√3); for 2 df, P(T > t) = 1/2 − t / (2 √(2 + t²))
    t = 2 * math.sqrt(3)
    mean, _, p = stats.one_sided_t([1.0, 2.0, 3.0])
    assert mean == 2.0 and p == pytest.approx(0.5 - t / (2 * math.sqrt(2 + t * t)), rel=1e-9)
    assert math.isnan(stats.one_sided_t([1.0])[2])


def test_two_sided_t_p_is_twice_the_one_sided_closed_form():
    # same data as above: two-sided p = 2 × (1/2 − t / (2 √(2 + t²))) = 1 − t / √(2 + t²)
    t = 2 * math.sqrt(3)
    mean, ci, p = stats.two_sided_t([1.0, 2.0, 3.0])
    assert mean == 2.0 and p == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-9)
    # the interval: mean ± t_{0.975, 2} · sd/√3 with t_{0.975, 2} = 4.302652729911275 (table value), sd = 1
    half = 4.302652729911275 / math.sqrt(3)
    assert ci == pytest.approx([2.0 - half, 2.0 + half], rel=1e-9)
    assert math.isnan(stats.two_sided_t([1.0])[2])


def test_wilson_interval_by_hand_including_zero_successes():
    z = 1.959963984540054
    lo, hi = stats.wilson_ci95(0, 200)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(z * z / (200 + z * z), rel=1e-9)
    k, n = 7, 40
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert stats.wilson_ci95(k, n) == pytest.approx([centre - half, centre + half], rel=1e-9)


def test_permutation_p_is_exact_on_a_small_case_counted_by_hand():
    # C(6,3) = 20 relabellings; only the observed split and its mirror reach |Δmean| = 3
    assert stats.permutation_p([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == pytest.approx(2 / 20)


def test_label_permutation_enumerates_every_labeling_and_reports_the_floor():
    labels = [0, 0, 1, 1, 2, 2]
    assert stats.n_labelings(labels) == 90  # 6! / (2! 2! 2!)
    seen = stats._distinct_labelings(labels)
    assert len(seen) == len(set(seen)) == 90
    # one unit per trait far above the rest on its own trait: only the true labeling reaches the statistic
    rows = np.zeros((6, 3))
    for u, t in enumerate(labels):
        rows[u, t] = 1.0 + u * 0.01
    res = stats.label_permutation_test(labels, stats.diagonal_statistic(rows))
    assert res.exact and res.p_floor == pytest.approx(1 / 90) and res.p_value == pytest.approx(1 / 90)
    # a statistic that ignores the labels: every labeling ties, p = 1
    assert stats.label_permutation_test(labels, lambda lab: 0.0).p_value == 1.0


def test_monte_carlo_labels_agree_with_exact_enumeration():
    rng = np.random.default_rng(1)
    m = rng.normal(0, 1, size=(3, 3, 3)) + np.eye(3)[:, None, :] * 0.6
    for within in (
        False,
        True,
    ):  # across all 9 teachers: 9!/(3!)^3 = 1680; within 3 blocks of 3: (3!)^3 = 216
        exact = stats.specificity_test(m, within_units=within)
        mc = stats.specificity_test(m, within_units=within, max_exact=10, n_random=20_000)
        assert exact.exact and not mc.exact and exact.n_labelings == (216 if within else 1680)
        assert mc.p_value == pytest.approx(exact.p_value, abs=0.01)


def test_block_permutation_by_brute_force():
    """Within-block relabelings against an independent enumeration: every permutation of each block's units."""
    rng = np.random.default_rng(4)
    m = rng.normal(0, 1, size=(3, 2, 3)) + np.eye(3)[:, None, :] * 0.4  # 3 traits × 2 blocks
    res = stats.specificity_test(m)
    rows = m.reshape(6, 3)
    labels = np.repeat(np.arange(3), 2)
    stat = stats.diagonal_statistic(rows)
    blocks = [[0, 2, 4], [1, 3, 5]]  # unit index = trait * 2 + block
    vals = []
    for p0 in itertools.permutations(blocks[0]):
        for p1 in itertools.permutations(blocks[1]):
            perm = labels.copy()
            perm[blocks[0]] = labels[list(p0)]
            perm[blocks[1]] = labels[list(p1)]
            vals.append(stat(perm))
    assert res.n_labelings == 36 and res.p_floor == pytest.approx(1 / 36)
    assert res.p_value == pytest.approx(np.mean(np.asarray(vals) >= stat(labels) - 1e-12))


def test_bootstrap_matches_an_independent_numpy_percentile_bootstrap():
    a = np.random.default_rng(3).normal(0.5, 1.0, 30)
    idx = np.random.default_rng(9).integers(0, a.size, size=(20_000, a.size))
    means = a[idx].mean(1)
    ref = [np.quantile(means, 0.025), np.quantile(means, 0.975)]
    assert stats.bootstrap_ci95(a, n_boot=20_000) == pytest.approx(ref, abs=0.03)
    assert stats.bootstrap_ci95([2.0, 2.0, 2.0]) == [2.0, 2.0]


def test_pearson_is_scipys_with_its_interval_and_nan_where_undefined():
    from scipy import stats as st

    rng = np.random.default_rng(0)
    x = rng.normal(size=12)
    y = x + rng.normal(size=12)
    r = stats.pearson(x, y)
    ref = st.pearsonr(x, y)
    ci = ref.confidence_interval(0.95)
    assert r["r"] == pytest.approx(ref.statistic) and r["p"] == pytest.approx(ref.pvalue) and r["n"] == 12
    assert r["ci95"] == pytest.approx([ci.low, ci.high])
    assert math.isnan(stats.pearson([1, 2], [2, 1])["r"])  # too few
    assert math.isnan(stats.pearson([1, 1, 1, 1], [1, 2, 3, 4])["r"])  # constant
    three = stats.pearson([1, 2, 3], [1, 3, 2])
    assert three["r"] == pytest.approx(0.5) and math.isnan(three["ci95"][0])  # Fisher z needs 4
    with pytest.raises(ValueError, match="paired"):
        stats.pearson([1, 2, 3], [1, 2])


def test_random_control_ranks_the_real_value_among_the_draws():
    draws = np.arange(1, 100, dtype=float)  # 1 … 99
    c = stats.random_control(99.5, draws)
    assert c["rank"] == 1 and c["p_value"] == pytest.approx(1 / 100) and c["n"] == 99
    assert c["mean"] == pytest.approx(50.0) and c["p2_5"] == pytest.approx(np.percentile(draws, 2.5))
    mid = stats.random_control(50.0, draws)  # 49 draws above, 50 at or above
    assert mid["rank"] == 50 and mid["p_value"] == pytest.approx(51 / 100)
    with pytest.raises(ValueError, match="no draws"):
        stats.random_control(1.0, [])


def test_clustered_share_by_hand():
    # three seeds, ten items each: 3, 7 and 5 right. p = 0.5, cluster shares 0.3, 0.7, 0.5 with sample variance
    # s² = (0.04 + 0.04 + 0) / 2 = 0.04, so deff = m s² / (p (1 − p)) = 10 · 0.04 / 0.25 = 1.6 and n_eff = 30 / 1.6
    z = 1.959963984540054
    n_eff = 18.75
    centre = (0.5 + z * z / (2 * n_eff)) / (1 + z * z / n_eff)
    half = z / (1 + z * z / n_eff) * math.sqrt(0.25 / n_eff + z * z / (4 * n_eff * n_eff))
    e = stats.clustered_share_ci95([3, 7, 5], [10, 10, 10])
    assert (
        e["mean"] == pytest.approx(0.5)
        and e["deff"] == pytest.approx(1.6)
        and e["n_eff"] == pytest.approx(n_eff)
    )
    assert e["ci95"] == pytest.approx([centre - half, centre + half], rel=1e-9)
    assert e["ci95"] == pytest.approx(
        [0.29382, 0.70618], abs=1e-4
    )  # the same, to four places from a calculator
    # wider than the plain Wilson interval over all 30 items, which ignores that the seeds disagree
    plain = stats.wilson_ci95(15, 30)
    assert e["ci95"][0] < plain[0] and e["ci95"][1] > plain[1]


def test_clustered_share_reduces_to_wilson():
    # the seeds spread exactly as binomial sampling would: shares 1/4, 2/4, 3/4 have s² = 1/16 = p (1 − p) / m
    e = stats.clustered_share_ci95([1, 2, 3], [4, 4, 4])
    assert e["deff"] == pytest.approx(1.0) and e["ci95"] == pytest.approx(stats.wilson_ci95(6, 12), rel=1e-9)
    # seeds that agree more closely than that (here exactly) never get a narrower interval than plain Wilson
    assert stats.clustered_share_ci95([5, 5, 5], [10, 10, 10])["ci95"] == pytest.approx(
        stats.wilson_ci95(15, 30)
    )
    # one seed: nothing to estimate a between-seed spread from
    assert stats.clustered_share_ci95([7], [40])["ci95"] == pytest.approx(stats.wilson_ci95(7, 40), rel=1e-9)
    # all right or all wrong: the plain Wilson interval, not the point
    assert stats.clustered_share_ci95([16, 16, 16], [16, 16, 16])["ci95"] == pytest.approx(
        stats.wilson_ci95(48, 48)
    )
    assert stats.clustered_share_ci95([0, 0], [16, 16])["ci95"][1] > 0


def test_clustered_share_stays_in_the_unit_interval_where_t_does_not():
    # the case that prompted it: seeds at 15/16, 16/16 and 14/16 give a t-interval past 100%
    k, n = [15, 16, 14], [16, 16, 16]
    assert stats.mean_ci95([a / b for a, b in zip(k, n, strict=True)])[1][1] > 1
    lo, hi = stats.clustered_share_ci95(k, n)["ci95"]
    assert 0 <= lo < 45 / 48 < hi <= 1


def test_clustered_share_unequal_clusters_by_hand():
    # ratio estimator: Var(p) = Σ (n_j / n̄)² (p_j − p)² / (J (J − 1)), p = 12 / 30 = 0.4
    k, n = [2, 10], [10, 20]
    var = ((10 / 15) ** 2 * (0.2 - 0.4) ** 2 + (20 / 15) ** 2 * (0.5 - 0.4) ** 2) / 2
    deff = var / (0.4 * 0.6 / 30)
    assert stats.clustered_share_ci95(k, n)["deff"] == pytest.approx(max(1.0, deff))
    with pytest.raises(ValueError):
        stats.clustered_share_ci95([3], [2])


def test_two_way_share_interval_against_hand_computed_design_effects():
    """Cluster variances by hand (equal clusters: Σ (p_j − p)² / (J (J − 1))), each over the binomial p (1 − p) / n,
    floored at 1, summed minus 1; the Wilson interval written out."""
    import math

    z = 1.959963984540054

    def wilson(p, n):
        c = (p + z * z / (2 * n)) / (1 + z * z / n)
        h = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        return [c - h, c + h]

    # rows 3/4, 0, 3/4 and columns 2/3, 2/3, 2/3, 0 around p = 1/2 (V_bin = 1/48): V_rows = 0.375 / 6 = 1/16,
    # deff_rows = 3; V_cols = (3/36 + 1/4) / 12 = 1/36, deff_cols = 4/3; two-way 3 + 4/3 − 1 = 10/3
    e = stats.two_way_share_ci95([[1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 0]])
    assert e["mean"] == 0.5 and e["deff_rows"] == pytest.approx(3) and e["deff_cols"] == pytest.approx(4 / 3)
    assert e["deff"] == pytest.approx(10 / 3) and e["ci95"] == pytest.approx(wilson(0.5, 12 / (10 / 3)))
    # p = 7/12: rows 3/4, 1/2, 1/2 agree more than binomial (floored at 1); columns 1, 2/3, 0, 2/3 give
    # V_cols = (19/36) / 12 against V_bin = 35/1728: deff_cols = 76/35, which is then the two-way deff
    e = stats.two_way_share_ci95([[1, 1, 0, 1], [1, 0, 0, 1], [1, 1, 0, 0]])
    assert e["deff_rows"] == 1.0 and e["deff"] == pytest.approx(76 / 35)
    assert e["ci95"] == pytest.approx(wilson(7 / 12, 12 / (76 / 35)))
    for bad in ([1, 0, 1], [[0, 2], [1, 1]], [[]]):
        with pytest.raises(ValueError, match="0/1 outcomes"):
            stats.two_way_share_ci95(bad)
