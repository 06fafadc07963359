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
