"""The MNIST auxiliary-logit toy of subliminal learning (Cloud et al. 2025, §6), on real handwritten digits.

A teacher MLP is trained on the 10 digit logits from a reference initialisation. A student from the SAME
initialisation is distilled only on the teacher's m extra "auxiliary" logits (never trained by anyone), on
uniform-noise images: it never sees a digit or a digit logit, yet its digit accuracy rises. A student from a
different initialisation is the control. Many models are trained at once as one batched network.

MNIST cannot be downloaded here; the data are scikit-learn's 1,797 real 8×8 handwritten digits.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from mechsub.config import Config, check, doc
from mechsub.runs import stage
from mechsub.stats import mean_ci95

log = logging.getLogger(__name__)

N_CLASSES = 10
N_DIGITS = 1797  # scikit-learn's load_digits(): the whole data set, fixed


@dataclass(frozen=True)
class MnistConfig(Config):
    """The MNIST toy: sizes, training lengths and the sweep over the number of auxiliary logits."""

    stage = "mnist"

    n_models: int = doc(
        20, "models trained in parallel per condition (each with its own init and data order)"
    )
    m: int = doc(3, "auxiliary logits for the headline numbers; must be in m_sweep")
    m_sweep: tuple[int, ...] = doc((1, 2, 3, 5, 10), "numbers of auxiliary logits to sweep")
    hidden: int = doc(256, "width of both hidden layers (paper: 784-256-256-(10+m))")
    teacher_epochs: int = doc(20, "epochs of teacher training on the digit logits")
    distill_steps: int = doc(300, "steps of student distillation on fresh noise images")
    batch_size: int = doc(64, "digit images per teacher step per model")
    distill_batch_size: int = doc(128, "noise images per distillation step per model")
    lr: float = doc(1e-3, "Adam learning rate for teacher and students")
    test_fraction: float = doc(0.25, "share of the digits held out for every accuracy reported")
    noise: Literal["uniform"] = doc(
        "uniform", "distribution of the student's input images (pixels uniform in [-1, 1])"
    )
    seed: int = doc(0, "seed of every random choice (inits, splits, batches, noise)")

    def validate(self) -> None:
        # every count is checked by name: a zero here used to train on nothing and be stored as finished
        check(
            self.n_models >= 2,
            f"n_models: need at least 2 models for a confidence interval, got {self.n_models}",
        )
        for name in ("hidden", "teacher_epochs", "distill_steps", "batch_size", "distill_batch_size"):
            value = getattr(self, name)
            check(value >= 1, f"{name}: must be ≥ 1, got {value}")
        check(len(self.m_sweep) >= 1, "m_sweep: list at least one number of auxiliary logits")
        check(all(m >= 1 for m in self.m_sweep), f"m_sweep: every m must be ≥ 1, got {self.m_sweep}")
        check(len(set(self.m_sweep)) == len(self.m_sweep), f"m_sweep: {self.m_sweep} repeats an m")
        check(self.m in self.m_sweep, f"m: {self.m} must be one of m_sweep {self.m_sweep}")
        check(self.lr > 0, f"lr: must be > 0, got {self.lr}")
        check(
            0.0 < self.test_fraction < 1.0,
            f"test_fraction: must lie strictly between 0 and 1, got {self.test_fraction}",
        )
        n_test = round(N_DIGITS * self.test_fraction)
        check(
            1 <= n_test < N_DIGITS,
            f"test_fraction: {self.test_fraction} of the {N_DIGITS} digits leaves an empty split; use 0.05–0.5",
        )


# --- data -----------------------------------------------------------------------------------------------
def load_digits_split(test_fraction: float, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's real 8×8 digits scaled to [-1, 1], split by a seeded permutation."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 8.0 - 1.0  # pixels in [-1, 1], as the noise
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = round(len(x) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


# --- a batch of MLPs ------------------------------------------------------------------------------------
Params = list[Tensor]  # [W1, b1, W2, b2, W3, b3], each with a leading model axis


def init_mlps(n: int, sizes: tuple[int, ...], seed: int) -> Params:
    """Normal(0, 1/d_in) weights and zero biases for ``n`` independent MLPs (as the paper's public code).

    Each layer draws from its own generator seeded by (seed, layer), so MLPs that differ only in their last
    width (different m) share the same hidden layers: a sweep over m keeps the reference init.
    """
    params: Params = []
    for layer, (d_in, d_out) in enumerate(itertools.pairwise(sizes)):
        g = torch.Generator().manual_seed(seed * 7919 + layer)
        w = torch.randn(n, d_in, d_out, generator=g) / math.sqrt(d_in)
        b = torch.zeros(n, d_out)
        params += [w, b]
    return params


def forward(params: Params, x: Tensor) -> Tensor:
    """Logits of every model: x is (models, batch, d_in); returns (models, batch, d_out)."""
    h = x
    n_layers = len(params) // 2
    for i in range(n_layers):
        w, b = params[2 * i], params[2 * i + 1]
        h = torch.baddbmm(b[:, None, :], h, w)
        if i < n_layers - 1:
            h = F.relu(h)
    return h


def accuracy(params: Params, x: Tensor, y: Tensor) -> Tensor:
    """Per-model accuracy on the digit logits (the first 10 outputs)."""
    with torch.no_grad():
        logits = forward(params, x.expand(params[0].shape[0], *x.shape))[..., :N_CLASSES]
    return (logits.argmax(-1) == y).float().mean(-1)


def _train(params: Params, lr: float, steps: int, loss_fn: Any, desc: str) -> Params:
    """Adam on the sum of per-model losses; Adam is elementwise, so every model trains independently."""
    params = [p.clone().requires_grad_(True) for p in params]
    opt = torch.optim.Adam(params, lr=lr)
    for step in tqdm(range(steps), desc=desc, leave=False, mininterval=1.0):
        loss = loss_fn(params, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return [p.detach() for p in params]


def train_teacher(params: Params, x: Tensor, y: Tensor, cfg: MnistConfig, g: torch.Generator) -> Params:
    n = params[0].shape[0]
    steps_per_epoch = math.ceil(len(x) / cfg.batch_size)
    # every model gets its own shuffle of the training set each epoch
    order = torch.cat(
        [
            torch.stack([torch.randperm(len(x), generator=g) for _ in range(n)])
            for _ in range(cfg.teacher_epochs)
        ],
        dim=1,
    )

    def loss_fn(p: Params, step: int) -> Tensor:
        idx = order[:, step * cfg.batch_size : (step + 1) * cfg.batch_size]
        logits = forward(p, x[idx])[..., :N_CLASSES]
        return F.cross_entropy(logits.flatten(0, 1), y[idx].flatten(), reduction="sum") / idx.shape[1]

    return _train(params, cfg.lr, steps_per_epoch * cfg.teacher_epochs, loss_fn, "teacher")


STUDENTS = ("student_aux", "student_all", "cross_init_aux", "cross_init_all")
AUX_STUDENTS = ("student_aux", "cross_init_aux")


def distill_students(
    reference: Params,
    other_init: Params,
    teacher: Params,
    m: int,
    cfg: MnistConfig,
    g: torch.Generator,
    conditions: tuple[str, ...] = STUDENTS,
) -> dict[str, Params]:
    """Distil the students of one m at once, as one batch of len(conditions)·n models, on shared noise.

    aux students match softmax over the m auxiliary logits only; all-logit students over all 10 + m.
    Every student of model i sees the same noise batch as the others of model i: a paired comparison.
    """
    n, d_in = reference[0].shape[0], reference[0].shape[1]
    k = len(conditions)
    inits = {c: reference if c.startswith("student") else other_init for c in conditions}
    stacked = [torch.cat([inits[c][i] for c in conditions]) for i in range(len(reference))]
    outputs = [
        slice(N_CLASSES, N_CLASSES + m) if c.endswith("aux") else slice(0, N_CLASSES + m) for c in conditions
    ]

    def loss_fn(p: Params, step: int) -> Tensor:
        x = torch.rand(n, cfg.distill_batch_size, d_in, generator=g) * 2 - 1
        with torch.no_grad():
            t_logits = forward(teacher, x)
        s_logits = forward(p, x.repeat(k, 1, 1)).unflatten(0, (k, n))
        loss = torch.zeros(())
        for j, out in enumerate(outputs):
            target = F.log_softmax(t_logits[..., out], -1)
            pred = F.log_softmax(s_logits[j][..., out], -1)
            loss = loss + F.kl_div(pred, target, log_target=True, reduction="none").sum(-1).mean(-1).sum()
        return loss

    trained = _train(stacked, cfg.lr, cfg.distill_steps, loss_fn, f"m={m} students")
    return {c: [t.unflatten(0, (k, n))[j] for t in trained] for j, c in enumerate(conditions)}


def _sizes(cfg: MnistConfig, d_in: int) -> tuple[int, ...]:
    # one output layer wide enough for the largest m: the teacher's loss never touches the auxiliary
    # columns, so the teacher (and every init) for a smaller m is this network's first 10 + m outputs
    return (d_in, cfg.hidden, cfg.hidden, N_CLASSES + max(cfg.m_sweep))


def run_one_m(
    cfg: MnistConfig, m: int, teacher: Params, data: tuple[Tensor, Tensor, Tensor, Tensor]
) -> dict[str, list[float]]:
    """The students of one m; per-model held-out accuracies of all six conditions."""
    x_tr, _, x_te, y_te = data
    sizes = _sizes(cfg, x_tr.shape[1])
    reference = init_mlps(cfg.n_models, sizes, seed=cfg.seed)
    other_init = init_mlps(cfg.n_models, sizes, seed=cfg.seed + 10_000)
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + m)
    # the all-logit students matter only at the headline m; the sweep needs the aux-only pair
    conditions = STUDENTS if m == cfg.m else AUX_STUDENTS
    models = {
        "reference": reference,
        "teacher": teacher,
        **distill_students(reference, other_init, teacher, m, cfg, g, conditions),
    }
    return {name: accuracy(p, x_te, y_te).tolist() for name, p in models.items()}


def teacher_params(cfg: MnistConfig, data: tuple[Tensor, Tensor, Tensor, Tensor], path: Path) -> Params:
    """Train the teachers (or read them back from ``path``, saved as safetensors)."""
    from safetensors.torch import load_file, save

    from mechsub.runs import atomic_write_bytes

    if path.is_file():
        saved = load_file(path)
        return [saved[f"p{i}"] for i in range(len(saved))]
    x_tr, y_tr = data[0], data[1]
    reference = init_mlps(cfg.n_models, _sizes(cfg, x_tr.shape[1]), seed=cfg.seed)
    teacher = train_teacher(reference, x_tr, y_tr, cfg, torch.Generator().manual_seed(cfg.seed))
    atomic_write_bytes(path, save({f"p{i}": p.contiguous() for i, p in enumerate(teacher)}))
    return teacher


def run(cfg: MnistConfig, out: str | Path, force: bool = False) -> dict[str, Any]:
    """Run (or resume, or skip) the MNIST toy into folder ``out``; returns its metrics."""
    t0 = time.perf_counter()
    with stage(out, cfg, force=force) as r:
        if r.done:
            return r.metrics
        torch.manual_seed(cfg.seed)  # nothing should draw from it; this only makes a stray draw repeatable
        data = load_digits_split(cfg.test_fraction, cfg.seed)
        teacher = teacher_params(cfg, data, r.path("teacher.safetensors"))
        per_m: dict[int, dict[str, list[float]]] = {}
        for m in tqdm(cfg.m_sweep, desc="m sweep"):
            per_m[m] = r.unit(f"m{m}", partial(run_one_m, cfg, m, teacher, data))
        metrics: dict[str, Any] = {"n_models": cfg.n_models, "m": cfg.m, "chance": 1 / N_CLASSES}
        for name, accs in per_m[cfg.m].items():
            mean, ci = mean_ci95(accs)
            metrics[f"{name}_acc"] = mean
            metrics[f"{name}_acc_ci95"] = ci
        metrics["m_sweep"] = [
            {
                "m": m,
                **{f"{k}_acc": mean_ci95(per_m[m][k])[0] for k in AUX_STUDENTS},
                **{f"{k}_acc_ci95": mean_ci95(per_m[m][k])[1] for k in AUX_STUDENTS},
            }
            for m in cfg.m_sweep
        ]
        metrics["n_train"], metrics["n_test"] = len(data[0]), len(data[2])
        metrics["seconds"] = round(time.perf_counter() - t0, 1)
        metrics["resumed_units"] = r.resumed_units
        from mechsub.plots import plot_mnist

        plot_mnist(metrics, Path(out) / "mnist.png")
        r.finish(metrics)
        return metrics
