"""The study's statistics over replicates, against values computed by hand and by brute force."""

import itertools

import numpy as np
import pytest

from mechsub.summary import specific_effects


def _matrix():
    # 3 traits × 2 replicates × 3 evaluated traits, small integers so every number below is exact by hand
    m = np.zeros((3, 2, 3))
    m[0, :, 0] = [3.0, 1.0]  # owl's students on owl, replicates 0 and 1
    m[1, :, 0] = [1.0, 0.0]  # dog's students on owl
    m[2, :, 0] = [0.0, -1.0]  # cat's students on owl
    m[1, :, 1] = [2.0, 2.0]
    m[0, :, 1] = [0.0, 1.0]
    m[2, :, 1] = [1.0, 0.0]
    m[2, :, 2] = [1.0, 3.0]
    return m


def test_specific_effects_by_hand():
    s = specific_effects(_matrix(), ["owl", "dog", "cat"])
    # owl, replicate 0: 3 − (1 + 0)/2 = 2.5; replicate 1: 1 − (0 − 1)/2 = 1.5
    assert s["effects"]["owl"]["per_replicate"] == pytest.approx([2.5, 1.5])
    assert s["effects"]["owl"]["delta_logp"] == pytest.approx(2.0)
    # a t-interval with 1 degree of freedom: mean ± t(0.975, 1) · sd/√2 = 2 ± 12.706 · 0.5
    assert s["effects"]["owl"]["ci95"] == pytest.approx([2 - 12.7062047 * 0.5, 2 + 12.7062047 * 0.5])
    # dog: 2 − (0 + 1)/2 = 1.5; 2 − (1 + 0)/2 = 1.5. cat: 1 − 0 = 1; 3 − 0 = 3
    assert s["effects"]["dog"]["per_replicate"] == pytest.approx([1.5, 1.5])
    assert s["effects"]["cat"]["per_replicate"] == pytest.approx([1.0, 3.0])
    # pooled per replicate: (2.5 + 1.5 + 1)/3, (1.5 + 1.5 + 3)/3
    assert s["pooled"]["per_replicate"] == pytest.approx([5 / 3, 2.0])
    assert s["pooled"]["unit"] == "replicates" and s["pooled"]["n"] == 2
    assert s["matrix_delta_logp"]["owl"]["owl"] == pytest.approx(2.0)
    # the generic shift on owl: the other students' mean, (1 + 0 + 0 − 1)/4
    assert s["generic_delta_logp"]["owl"] == pytest.approx(0.0)


def test_permutation_p_by_brute_force_within_replicates():
    mat = _matrix()
    s = specific_effects(mat, ["owl", "dog", "cat"])
    rows = mat.reshape(6, 3)  # unit = trait * 2 + replicate
    labels = np.repeat(np.arange(3), 2)

    def stat(lab):
        return np.mean([rows[lab == e, e].mean() - rows[lab != e, e].mean() for e in range(3)])

    # the teachers of one replicate share its prompts: labels move only within a replicate, 3! × 3! = 36 ways
    obs = stat(labels)
    vals = []
    for p0 in itertools.permutations([0, 2, 4]):
        for p1 in itertools.permutations([1, 3, 5]):
            lab = labels.copy()
            lab[[0, 2, 4]], lab[[1, 3, 5]] = labels[list(p0)], labels[list(p1)]
            vals.append(stat(lab))
    assert s["permutation"]["p_value"] == pytest.approx(np.mean(np.asarray(vals) >= obs - 1e-12))
    assert s["permutation"]["n_labelings"] == 36 and s["permutation"]["p_floor"] == pytest.approx(1 / 36)
    assert s["permutation"]["statistic"] == pytest.approx(obs)


def test_one_replicate_pools_over_traits():
    s = specific_effects(_matrix()[:, :1], ["owl", "dog", "cat"])
    assert s["pooled"]["unit"].startswith("traits") and s["pooled"]["n"] == 3
    assert s["pooled"]["delta_logp"] == pytest.approx((2.5 + 1.5 + 1.0) / 3)
    assert s["effects"]["owl"]["p_value"] is None or np.isnan(s["effects"]["owl"]["p_value"])


def test_within_minus_cross_is_the_paired_difference_of_pooled_effects():
    from mechsub.summary import within_minus_cross

    within = {"prefill": specific_effects(_matrix(), ["owl", "dog", "cat"])}
    cross_mat = _matrix() * 0.5  # the other family's students move half as much, replicate by replicate
    cross = {"prefill": specific_effects(cross_mat, ["owl", "dog", "cat"])}
    d = within_minus_cross(within, cross)["prefill"]
    # pooled per replicate: within (5/3, 2), cross half of it: differences (5/6, 1)
    assert d["per_replicate"] == pytest.approx([5 / 6, 1.0])
    assert d["delta_logp"] == pytest.approx(11 / 12)
    # two-sided t with 1 df: t = mean / (sd/√2), sd = (1 − 5/6)/√2; p = 1 − 2·atan(t)/π (Cauchy)
    t = (11 / 12) / ((1 / 6) / np.sqrt(2) / np.sqrt(2))
    assert d["p_value_two_sided"] == pytest.approx(1 - 2 * np.arctan(t) / np.pi, rel=1e-9)
