"""Representational geometry between two row-aligned sets of activations (row i of x and of y: the same item):
linear CKA, RSA on RDMs, an align-breaking permutation null for either, and ridge / nearest-centroid probes that
fit, choose and standardise on train rows only. Used per layer: do problems and answers share geometry?
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy import stats as st
from scipy.spatial.distance import pdist
from sklearn.linear_model import Ridge
from sklearn.metrics import r2_score
from sklearn.model_selection import GridSearchCV, KFold
from sklearn.neighbors import NearestCentroid
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

if TYPE_CHECKING:
    import torch

ALPHAS = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3)


def _as_2d(a: np.ndarray, name: str) -> np.ndarray:
    out = np.asarray(a, dtype=np.float64)  # float64: CKA's squared Frobenius norms lose digits in float32
    if out.ndim == 1:
        out = out[:, None]
    if out.ndim != 2:
        raise ValueError(f"{name}: expected (n, d), got shape {out.shape}")
    return out


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA (Kornblith et al. 2019) of x (n, d1) and y (n, d2), columns centred; 0.0 if either is constant.
    Feature form ||YᵀX||²_F / (||XᵀX||_F ||YᵀY||_F) when n ≥ d, the equal n × n Gram form otherwise (cheaper)."""
    a, b = _as_2d(x, "x"), _as_2d(y, "y")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"linear_cka: {a.shape[0]} rows in x but {b.shape[0]} in y")
    # ptp, not the centred norm: a constant column leaves float residue after centring, not exact zeros
    if not np.any(np.ptp(a, axis=0)) or not np.any(np.ptp(b, axis=0)):
        return 0.0
    a, b = a - a.mean(axis=0), b - b.mean(axis=0)
    if a.shape[0] >= max(a.shape[1], b.shape[1]):
        num, ka, kb = float(np.sum((b.T @ a) ** 2)), a.T @ a, b.T @ b
    else:  # centred Grams: HKH = K, so <K, L>_F is HSIC up to a factor that cancels
        ka, kb = a @ a.T, b @ b.T
        num = float(np.sum(ka * kb))
    return num / float(np.linalg.norm(ka) * np.linalg.norm(kb))


def rdm(x: np.ndarray, metric: str = "correlation") -> np.ndarray:
    """Condensed representational dissimilarity vector over the rows of x (scipy pdist order)."""
    return np.asarray(pdist(_as_2d(x, "x"), metric=metric))


def rsa(x: np.ndarray, y: np.ndarray, metric: str = "correlation") -> float:
    """Spearman correlation of the two RDMs' condensed vectors (rank-based: any monotone distance transform
    gives the same value). NaN when a row is constant under the correlation metric."""
    if len(x) != len(y):
        raise ValueError(f"rsa: {len(x)} rows in x but {len(y)} in y")
    return float(st.spearmanr(rdm(x, metric), rdm(y, metric)).statistic)


@dataclass(frozen=True)
class NullDistribution:
    """A statistic against its align-breaking null (the rows of y shuffled)."""

    observed: float
    null: list[float]  # the statistic with the rows of y permuted, n_perm draws
    p_value: float  # (1 + #{null >= observed}) / (1 + n_perm), one-sided; floor 1 / (1 + n_perm)
    null_mean: float
    null_ci95: list[float]  # 2.5 / 97.5 percentiles of the null


def permutation_null(
    stat: Callable[[np.ndarray, np.ndarray], float],
    x: np.ndarray,
    y: np.ndarray,
    n_perm: int = 200,
    seed: int = 0,
) -> NullDistribution:
    """Is the alignment of rows what makes ``stat(x, y)`` large? Shuffling y's rows keeps each set's own geometry
    and breaks only the pairing, so the null is the same statistic on mismatched items."""
    if len(x) != len(y):
        raise ValueError(f"permutation_null: {len(x)} rows in x but {len(y)} in y")
    if n_perm < 1:
        raise ValueError("permutation_null: n_perm must be at least 1")
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    observed = float(stat(x, y))
    null = [float(stat(x, y[rng.permutation(len(y))])) for _ in range(n_perm)]
    # tolerance: an identity-like permutation should tie with the observed value despite float reordering
    hits = int(np.sum(np.asarray(null) >= observed - 1e-12))
    lo, hi = np.percentile(null, [2.5, 97.5])
    return NullDistribution(
        observed, null, (1 + hits) / (1 + n_perm), float(np.mean(null)), [float(lo), float(hi)]
    )


@dataclass(frozen=True)
class ProbeResult:
    """A ridge probe scored once on held-out rows."""

    r2: float  # out-of-sample R², 1 − SSE/SST about the test mean (sklearn's r2_score)
    pearson_r: float  # prediction vs truth on the test rows; NaN if the predictions are constant
    alpha: float  # the ridge penalty chosen by cross-validation on the train rows
    n_train: int
    n_test: int


def _ridge_fit(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    """Coefficients and intercept of min ||y − xw − b||² + alpha ||w||² (intercept unpenalised)."""
    model = Ridge(alpha=alpha).fit(_as_2d(x, "x"), np.asarray(y, dtype=np.float64))
    return np.asarray(model.coef_), float(model.intercept_)


def _fit_probe(x_train: np.ndarray, y_train: np.ndarray, alphas: Sequence[float], seed: int) -> Pipeline:
    """Standardise-then-ridge, alpha by seeded k-fold CV; the scaler is refit inside each fold so no fold's
    validation rows inform its own standardisation. Sees train rows only, by signature."""
    y = np.asarray(y_train, dtype=np.float64)
    x, y = _as_2d(x_train, "x_train"), (y if y.ndim == 2 else y.ravel())  # a 2-D y: one ridge per column
    if len(x) != len(y) or len(x) < 3:
        raise ValueError(f"ridge_probe: need >= 3 aligned train rows, got x {len(x)}, y {len(y)}")
    folds = KFold(n_splits=min(5, len(x)), shuffle=True, random_state=seed)
    search = GridSearchCV(make_pipeline(StandardScaler(), Ridge()), {"ridge__alpha": [float(a) for a in alphas]},
                          cv=folds, scoring="neg_mean_squared_error", refit=True)  # fmt: skip
    return search.fit(x, y).best_estimator_


def ridge_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    alphas: Sequence[float] = ALPHAS,
    seed: int = 0,
) -> ProbeResult:
    """Linear decodability of a 1-D float target: standardise on train rows, choose alpha by 5-fold CV on train
    rows, refit on all train rows, then score once on the test rows (which nothing before scoring has seen)."""
    model = _fit_probe(x_train, y_train, alphas, seed)
    xt, yt = _as_2d(x_test, "x_test"), np.asarray(y_test, dtype=np.float64).ravel()
    if len(xt) != len(yt) or len(xt) < 2:
        raise ValueError(f"ridge_probe: need >= 2 aligned test rows, got x {len(xt)}, y {len(yt)}")
    pred = model.predict(xt)
    r = math.nan if np.ptp(pred) == 0 or np.ptp(yt) == 0 else float(st.pearsonr(pred, yt).statistic)
    alpha = float(model.named_steps["ridge"].alpha)
    return ProbeResult(float(r2_score(yt, pred)), r, alpha, len(x_train), len(xt))


@dataclass(frozen=True)
class RetrievalResult:
    """A vector-target ridge probe scored once by retrieval among the held-out rows."""

    accuracy: float  # share of test rows whose nearest target (cosine) carries their own label
    chance: float  # the same share for a pick at random: mean over test rows of (rows with its label) / rows
    alpha: float
    n_train: int
    n_test: int


def retrieval_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    labels_test: Sequence[str],
    alphas: Sequence[float] = ALPHAS,
    seed: int = 0,
) -> RetrievalResult:
    """Decodability of a vector target (e.g. the base's read of the correct answer): standardise-then-ridge from
    ``x`` to every column of ``y`` (one alpha for all, chosen by 5-fold CV on the train rows), then each test row's
    prediction picks the test row whose target is nearest in cosine (both centred on the train targets' mean).
    Accuracy: the share of test rows whose pick
    has the same label as the row (a repeated answer counts as found)."""
    model = _fit_probe(x_train, y_train, alphas, seed)
    xt, yt = _as_2d(x_test, "x_test"), _as_2d(y_test, "y_test")
    labels = np.asarray(labels_test)
    if len(xt) != len(yt) or len(xt) != len(labels) or len(xt) < 2:
        raise ValueError(f"retrieval_probe: need >= 2 aligned test rows, got x {len(xt)}, y {len(yt)}")
    pred = model.predict(xt)

    def unit(a: np.ndarray) -> np.ndarray:
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    # centred on the train targets' mean first: a residual read's large shared component would decide any cosine
    mu = np.asarray(y_train, dtype=np.float64).mean(0)
    pick = (unit(pred - mu) @ unit(yt - mu).T).argmax(1)
    chance = float(np.mean([np.mean(labels == lab) for lab in labels]))
    alpha = float(model.named_steps["ridge"].alpha)
    return RetrievalResult(float(np.mean(labels[pick] == labels)), chance, alpha, len(x_train), len(xt))


def probe_accuracy(
    x_train: np.ndarray,
    labels_train: Sequence[int] | np.ndarray,
    x_test: np.ndarray,
    labels_test: Sequence[int] | np.ndarray,
) -> float:
    """Test accuracy of a nearest-class-mean classifier in train-standardised space, for categorical targets
    (e.g. which antonym pair). No hyperparameters to choose, so nothing can be tuned towards the test rows."""
    scaler = StandardScaler().fit(_as_2d(x_train, "x_train"))
    clf = NearestCentroid().fit(scaler.transform(_as_2d(x_train, "x_train")), np.asarray(labels_train))
    pred = clf.predict(scaler.transform(_as_2d(x_test, "x_test")))
    return float(np.mean(pred == np.asarray(labels_test)))


def mean_pool(acts: torch.Tensor | np.ndarray, lengths: Sequence[int], skip_first: bool = True) -> np.ndarray:
    """Per-sequence means (n_seq, d) of concatenated per-position rows (sum(lengths), d). ``skip_first`` drops
    each sequence's position 0, the BOS / attention sink that is excluded everywhere in this project."""
    if hasattr(acts, "detach"):  # a torch tensor; .float() first because numpy has no bfloat16
        acts = acts.detach().float().cpu().numpy()
    a = np.asarray(acts, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != sum(lengths):
        raise ValueError(f"mean_pool: acts {a.shape} do not hold sum(lengths) = {sum(lengths)} rows")
    out, start = np.empty((len(lengths), a.shape[1])), 0
    for i, n in enumerate(lengths):
        first = start + 1 if skip_first else start
        if start + n <= first:
            raise ValueError(f"mean_pool: sequence {i} has length {n}, nothing left to pool")
        out[i] = a[first : start + n].mean(axis=0)
        start += n
    return out


def length_residual(x: np.ndarray, lengths: Sequence[int]) -> np.ndarray:
    """``x`` (n, d) minus its least-squares fit on [1, length]: what a read says beyond how many tokens were
    averaged (mean-pooled reads track length, which would align two sets of texts of matching lengths)."""
    a = np.column_stack([np.ones(len(lengths)), np.asarray(lengths, dtype=float)])
    x = np.asarray(x, dtype=float)
    coef, *_ = np.linalg.lstsq(a, x, rcond=None)
    return np.asarray(x - a @ coef)
