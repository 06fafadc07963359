import math

import numpy as np
import pytest
import torch
from scipy import stats as st
from scipy.spatial.distance import pdist
from scipy.stats import special_ortho_group
from sklearn.preprocessing import StandardScaler

from mechsub import geometry as g


def _kernel_cka(x: np.ndarray, y: np.ndarray) -> float:
    """CKA from its definition: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with H = I − 11ᵀ/n, K = XXᵀ."""
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, lk = x @ x.T, y @ y.T

    def hsic(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.trace(a @ h @ b @ h))

    return hsic(k, lk) / math.sqrt(hsic(k, k) * hsic(lk, lk))


@pytest.mark.parametrize(("n", "d1", "d2"), [(40, 3, 5), (8, 20, 12)])  # feature form and Gram form
def test_linear_cka_matches_the_kernel_formula(n: int, d1: int, d2: int) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, d1)) + 3.0  # an offset: CKA must centre it away
    y = x[:, :1] @ rng.normal(size=(1, d2)) + rng.normal(size=(n, d2))
    assert g.linear_cka(x, y) == pytest.approx(_kernel_cka(x, y), rel=1e-10)
    assert g.linear_cka(x, x) == pytest.approx(1.0)


def test_linear_cka_invariances_and_a_case_by_hand() -> None:
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(60, 4)), rng.normal(size=(60, 4))
    y = y + x  # partly shared geometry, so the value is not trivially 0 or 1
    base = g.linear_cka(x, y)
    q = special_ortho_group.rvs(4, random_state=3)
    assert g.linear_cka(x, 7.5 * y @ q) == pytest.approx(base, rel=1e-10)
    # an anisotropic invertible map is not a similarity: CKA(X, XA) falls well below CKA(X, X) = 1
    assert g.linear_cka(x, x @ np.diag([1.0, 1.0, 1.0, 50.0])) < 0.6
    # independent data, n >> d: near 0
    assert g.linear_cka(rng.normal(size=(2000, 5)), rng.normal(size=(2000, 5))) < 0.02
    # 1-D: CKA is r²; x = [1,2,3], y = [1,0,0] centre to [-1,0,1], [2,-1,-1]/3, (x·y)² / (|x|²|y|²) = 1 / (2 · 2/3)
    assert g.linear_cka(np.array([[1.0], [2.0], [3.0]]), np.array([[1.0], [0.0], [0.0]])) == pytest.approx(
        0.75
    )
    assert g.linear_cka(np.full((5, 2), 0.1), rng.normal(size=(5, 2))) == 0.0


def test_rsa_is_spearman_on_pdist_and_rank_based() -> None:
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(15, 6)), rng.normal(size=(15, 3))
    y[:, 0] += x[:, 0]
    expected = st.spearmanr(pdist(x, "correlation"), pdist(y, "correlation")).statistic
    assert g.rsa(x, y) == pytest.approx(expected)
    np.testing.assert_allclose(g.rdm(x, "euclidean"), pdist(x))
    # squared (and rescaled) distances are a monotone transform of euclidean ones: same ranks, same RSA
    assert g.rsa(x, y, "sqeuclidean") == pytest.approx(g.rsa(3.0 * x, y, "euclidean"))
    assert g.rsa(x, x) == pytest.approx(1.0)


def test_permutation_null_on_an_enumerable_statistic() -> None:
    # stat = y's first entry: each permutation puts a uniform draw from {0..4} first, so the null mean is 2 and
    # the observed 4 (the largest) is matched by one draw in five
    x, y = np.zeros((5, 1)), np.arange(5.0)[::-1, None].copy()
    res = g.permutation_null(lambda _a, b: float(b[0, 0]), x, y, n_perm=2000, seed=0)
    assert res.observed == 4.0 and set(res.null) <= {0.0, 1.0, 2.0, 3.0, 4.0} and len(res.null) == 2000
    assert res.p_value == (1 + sum(v >= 4.0 for v in res.null)) / 2001
    assert res.p_value == pytest.approx(0.2, abs=0.03) and res.null_mean == pytest.approx(2.0, abs=0.15)
    assert res.null_ci95 == [0.0, 4.0]
    # a statistic only the identity alignment reaches: nothing in the null ties, p sits on its floor
    exact = g.permutation_null(lambda _a, b: float(np.array_equal(b, y)), x, y, n_perm=99, seed=0)
    assert exact.p_value == pytest.approx(1 / 100)
    again = g.permutation_null(lambda _a, b: float(b[0, 0]), x, y, n_perm=2000, seed=0)
    assert again == res


def test_permutation_null_separates_aligned_from_independent() -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(30, 4))
    aligned = x @ special_ortho_group.rvs(4, random_state=6) + 0.3 * rng.normal(size=(30, 4))
    assert g.permutation_null(g.linear_cka, x, aligned, n_perm=200).p_value == pytest.approx(1 / 201)
    assert g.permutation_null(g.rsa, x, aligned, n_perm=200).p_value == pytest.approx(1 / 201)
    # independent pairs: the observed value is itself a null draw, so p is roughly uniform across pairs
    ps = [
        g.permutation_null(g.linear_cka, x, rng.normal(size=(30, 4)), n_perm=200).p_value for _ in range(20)
    ]
    assert 0.3 < np.mean(ps) < 0.7 and sum(p < 0.05 for p in ps) <= 4


def _probe_data(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(120, 20)),
        rng.normal(size=(60, 20)),
        rng.normal(size=20),
        rng.normal(size=120),
        rng.normal(size=60),
    )


def test_ridge_probe_recovers_a_linear_target_and_not_noise() -> None:
    xtr, xte, w, ntr, nte = _probe_data(7)
    fit = g.ridge_probe(xtr, xtr @ w + 2.0, xte, xte @ w + 2.0)
    assert fit.r2 > 0.99 and fit.pearson_r > 0.99 and (fit.n_train, fit.n_test) == (120, 60)
    noise = g.ridge_probe(xtr, ntr, xte, nte)
    assert noise.r2 < 0.05 and noise.alpha in g.ALPHAS


def test_ridge_probe_never_looks_at_test_rows() -> None:
    xtr, xte, w, _, nte = _probe_data(8)
    ytr = xtr @ w + 0.5 * np.random.default_rng(9).normal(size=120)
    a = g.ridge_probe(xtr, ytr, xte, xte @ w)
    b = g.ridge_probe(xtr, ytr, 5.0 * xte - 3.0, nte)  # other test rows, other targets: same choice of alpha
    assert a.alpha == b.alpha
    # the score is the train-only fit's score: recompute it from _fit_probe, which cannot see the test rows
    pred = g._fit_probe(xtr, ytr, g.ALPHAS, 0).predict(xte)
    sse, sst = np.sum((xte @ w - pred) ** 2), np.sum((xte @ w - np.mean(xte @ w)) ** 2)
    assert a.r2 == pytest.approx(1 - sse / sst)
    # shifting every test feature by 10 leaves a noiseless linear target exactly linear in the raw features:
    # a train-standardised probe still fits it, one standardised on the test rows would be off by 10 · Σw
    shifted = g.ridge_probe(xtr, xtr @ w, xte + 10.0, (xte + 10.0) @ w)
    assert shifted.r2 > 0.99


def test_ridge_fit_matches_lstsq_ridge() -> None:
    rng = np.random.default_rng(10)
    x, y, alpha = rng.normal(size=(30, 6)) + 1.0, rng.normal(size=30), 3.0
    # augmented least squares on centred data: [Xc; √α I] w = [yc; 0], intercept from the means
    xc, yc = x - x.mean(0), y - y.mean()
    aug_x = np.vstack([xc, math.sqrt(alpha) * np.eye(6)])
    w = np.linalg.lstsq(aug_x, np.concatenate([yc, np.zeros(6)]), rcond=None)[0]
    coef, intercept = g._ridge_fit(x, y, alpha)
    np.testing.assert_allclose(coef, w, rtol=1e-8)
    assert intercept == pytest.approx(y.mean() - x.mean(0) @ w)
    # and the probe at a single alpha is that fit on train-standardised features
    scaler = StandardScaler().fit(x)
    model = g._fit_probe(x, y, [alpha], 0)
    np.testing.assert_allclose(
        model.named_steps["ridge"].coef_, g._ridge_fit(scaler.transform(x), y, alpha)[0]
    )


def test_probe_accuracy_nearest_centroid() -> None:
    rng = np.random.default_rng(11)
    centres = np.array([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    lab_tr, lab_te = np.repeat([0, 1, 2], 20), np.repeat([0, 1, 2], 10)
    xtr = centres[lab_tr] + 0.3 * rng.normal(size=(60, 2))
    xte = centres[lab_te] + 0.3 * rng.normal(size=(30, 2))
    assert g.probe_accuracy(xtr, lab_tr, xte, lab_te) == 1.0
    # by hand: class means 0 and 4 (standardising rescales both sides alike); test
    # points at 1 and 3 go to a and b, the labels say a and a: half right
    xtr2, xte2 = np.array([[-1.0], [1.0], [3.0], [5.0]]), np.array([[1.0], [3.0]])
    assert g.probe_accuracy(xtr2, ["a", "a", "b", "b"], xte2, ["a", "a"]) == 0.5


def test_mean_pool_by_hand() -> None:
    acts = torch.tensor([[100.0, 0], [1, 2], [3, 4], [100, 0], [5, 6]], dtype=torch.bfloat16)
    np.testing.assert_allclose(g.mean_pool(acts, [3, 2]), [[2.0, 3.0], [5.0, 6.0]])
    np.testing.assert_allclose(g.mean_pool(acts.float().numpy(), [3, 2], skip_first=False),
                               [[104 / 3, 2.0], [52.5, 3.0]])  # fmt: skip
    with pytest.raises(ValueError, match="sequence 1"):
        g.mean_pool(np.ones((4, 2)), [3, 1])
    with pytest.raises(ValueError, match="sum"):
        g.mean_pool(np.ones((4, 2)), [3, 2])


def test_length_residual_removes_exactly_the_linear_length_part():
    rng = np.random.default_rng(0)
    lengths = np.array([3, 5, 5, 8, 10, 4])
    noise = rng.normal(size=(6, 4))
    x = 2.0 + np.outer(lengths, [1.0, -2.0, 0.5, 3.0]) + noise
    res = g.length_residual(x, lengths)
    # by hand: the residual of each column is orthogonal to the constant and to the lengths
    assert np.allclose(res.sum(0), 0, atol=1e-9) and np.allclose(lengths @ res, 0, atol=1e-9)
    # and equals the residual of the noise alone (the length part is linear)
    a = np.column_stack([np.ones(6), lengths])
    want = noise - a @ np.linalg.pinv(a) @ noise
    assert np.allclose(res, want)


def test_retrieval_probe_finds_a_linear_map_and_is_at_chance_without_one():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 5))
    x_train, x_test = rng.normal(size=(60, 8)), rng.normal(size=(12, 8))
    y_train, y_test = x_train @ w, x_test @ w
    labels = [f"a{i}" for i in range(12)]
    got = g.retrieval_probe(x_train, y_train, x_test, y_test, labels)
    assert got.accuracy == 1.0 and got.chance == pytest.approx(1 / 12) and got.n_test == 12
    # targets unrelated to x: accuracy over many draws averages to the chance share
    accs = [
        g.retrieval_probe(
            x_train, rng.normal(size=(60, 5)), x_test, rng.normal(size=(12, 5)), labels, seed=i
        ).accuracy
        for i in range(40)
    ]
    assert abs(np.mean(accs) - 1 / 12) < 0.06
    # chance by hand with a repeated label: rows labelled a, a, b: (2/3 + 2/3 + 1/3) / 3
    r = g.retrieval_probe(x_train, y_train, x_test[:3], y_test[:3], ["a", "a", "b"])
    assert r.chance == pytest.approx(5 / 9)
