"""Model diffing: what a fine-tune changed, read from activations alone.

Two tools. The Activation Difference Lens (Minder et al., arXiv 2510.13900): the mean student − base residual on
the first tokens of number data, read through the logit lens and added to the base as a steering vector on
neutral prompts, each readout ranking the candidate traits; `identification` scores such rankings blind over a
study's students against chance. And a dictionary built for the change: a BatchTopK crosscoder on paired
base/student activations with Latent Scaling (arXiv 2504.02922) to tell student-only latents from shared ones,
trained with the AuxK loss (Gao et al. 2024) that gives dead latents a gradient.

Position policy (every δ here): the residual at ``blocks.{L}.hook_resid_post`` at the first ``k`` positions
that predict a completion token — the last prompt token (the assistant turn's opening, which predicts the
first number) and then completion tokens 0 … k−2 — the positions the student's loss was taken at, lined up
as in `mechsub.capture.Batch.completions`. Position 0 (BOS, the attention sink, whose residual norm dwarfs
the rest) is never read: a row whose positions would include it is refused.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from scipy import stats as st
from torch import Tensor, nn

from mechsub import hooks
from mechsub.config import Config, check, doc
from mechsub.metric import TraitMetric, score_prompts
from mechsub.prompts import pad_right

log = logging.getLogger(__name__)

POSITION_POLICY = (
    "the first k positions that predict a completion token (the last prompt token, then completion tokens "
    "0..k-2), never position 0 (BOS / attention sink)"
)


# ---- the activation difference -------------------------------------------------------------------------
def first_positions(prompt_len: int, total_len: int, k: int) -> list[int]:
    """Positions of one row read by the lens: ``prompt_len - 1`` … (k of them, fewer if the row is shorter)."""
    if prompt_len < 2:
        raise ValueError("a prompt of at least 2 tokens: position 0 (BOS) is never read")
    return list(range(prompt_len - 1, min(prompt_len - 1 + k, total_len)))


@torch.no_grad()
def position_means(
    lm: Any,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    layers: Sequence[int],
    k: int = 5,
    batch_size: int = 16,
) -> tuple[Float[Tensor, "layers k d_model"], list[int]]:
    """Mean residual after each of ``layers`` at each of the first ``k`` completion positions (`POSITION_POLICY`),
    and how many rows reached each position. Sums in float64; the forward stops after the deepest layer."""
    if k < 1 or not layers:
        raise ValueError("k ≥ 1 and at least one layer")
    names = [hooks.resid_post(L) for L in layers]
    pad = getattr(getattr(lm, "tokenizer", None), "pad_token_id", None) or 0
    sums: Tensor | None = None
    counts = [0] * k
    for s in range(0, len(prompts), batch_size):
        ps, cs = prompts[s : s + batch_size], completions[s : s + batch_size]
        seqs = [list(p) + list(c) for p, c in zip(ps, cs, strict=True)]
        ids, attn = pad_right(seqs, pad)
        acts = hooks.read(lm, ids, names, attention_mask=attn)
        stack = torch.stack([acts[n] for n in names]).double()  # (layers, batch, pos, d)
        if sums is None:
            sums = torch.zeros(len(layers), k, stack.shape[-1], dtype=torch.float64)
        for b, (p, seq) in enumerate(zip(ps, seqs, strict=True)):
            for j, q in enumerate(first_positions(len(p), len(seq), k)):
                sums[:, j] += stack[:, b, q]
                counts[j] += 1
    if sums is None or counts[0] == 0:
        raise ValueError("no rows to average")
    n = torch.tensor([max(c, 1) for c in counts], dtype=torch.float64)[None, :, None]
    return (sums / n).float(), counts


@dataclass(frozen=True)
class ActivationDiff:
    """The mean student − base residual per layer and completion position, with the base's own means."""

    layers: tuple[int, ...]
    delta: Float[Tensor, "layers k d_model"]
    base_mean: Float[Tensor, "layers k d_model"]
    counts: tuple[int, ...]  # rows that reached each position (all rows reach position 0 of k)

    def mean(self, layer: int) -> Float[Tensor, " d_model"]:
        """δ at ``layer`` averaged over the k positions, each weighted by how many rows reached it."""
        return _weighted(self.delta[self.layers.index(layer)], self.counts)

    def base(self, layer: int) -> Float[Tensor, " d_model"]:
        """The base's mean residual at ``layer`` over the same positions."""
        return _weighted(self.base_mean[self.layers.index(layer)], self.counts)


def _weighted(x: Tensor, counts: Sequence[int]) -> Tensor:
    w = torch.tensor(counts, dtype=x.dtype)
    return (x * w[:, None]).sum(0) / w.sum()


def activation_difference(
    base: Any,
    student: Any,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    layers: Sequence[int],
    n_first_tokens: int = 5,
    batch_size: int = 16,
    base_means: tuple[Tensor, list[int]] | None = None,
) -> ActivationDiff:
    """Mean (student − base) at ``blocks.{L}.hook_resid_post`` over the first ``n_first_tokens`` completion
    positions of the rows (`POSITION_POLICY`). Both models read the same token ids, so the difference of the
    means is the mean of the differences. ``base_means``: `position_means` of the base on these rows, when the
    caller reuses it across students."""
    bm, counts = base_means or position_means(base, prompts, completions, layers, n_first_tokens, batch_size)
    sm, counts_s = position_means(student, prompts, completions, layers, n_first_tokens, batch_size)
    if counts_s != counts:
        raise ValueError("base_means were taken on other rows")
    return ActivationDiff(tuple(layers), sm - bm, bm, tuple(counts))


# ---- readouts: each gives every candidate a score (higher: the readout names it more) -------------------
def _head(lm: Any) -> tuple[nn.Module, nn.Module]:
    m = hooks.module_of(lm)
    dec: Any = m.get_decoder() if hasattr(m, "get_decoder") else m  # type: ignore[operator]
    return dec.norm, m.get_output_embeddings()  # type: ignore[operator]


@torch.no_grad()
def lens_logprobs(lm: Any, h: Float[Tensor, "... d_model"]) -> Float[Tensor, "... vocab"]:
    """The logit lens: log-softmax of the unembedding of the final norm of ``h``."""
    norm, unembed = _head(lm)
    return unembed(norm(h.float())).float().log_softmax(-1)


def candidate_scores(logprobs: Float[Tensor, " vocab"], metrics: Sequence[TraitMetric]) -> list[float]:
    """Each candidate's score from one position's log-probs: the sum over the word's tokens (" owl"; " otter"
    is two) of their log-prob at that position, as `TraitMetric` sums a word's tokens (a lens position predicts
    one next token, so a multi-token word's later tokens are read at the same position: an approximation)."""
    return [float(sum(logprobs[i] for i in m.ids)) for m in metrics]


def logit_lens_scores(
    lm: Any, delta: Float[Tensor, " d_model"], metrics: Sequence[TraitMetric], base_mean: Tensor | None = None
) -> list[float]:
    """Candidate scores of δ through the logit lens.

    ``base_mean`` None (the lens of δ itself): δ is rescaled to unit RMS before the final norm, so the norm's ε
    does not set the temperature of a small δ (the norm is otherwise scale-free); the score is the candidate's
    log-prob. With ``base_mean`` μ (the relative lens): log-prob under
    lens(μ + δ) minus under lens(μ), the change the shift makes to the base's own logit-lens reading at those
    positions.
    """
    if base_mean is None:
        d = delta.float()
        d = d / d.pow(2).mean().sqrt().clamp(min=1e-12)
        return candidate_scores(lens_logprobs(lm, d), metrics)
    lp = lens_logprobs(lm, torch.stack([base_mean + delta, base_mean]).float())
    return candidate_scores(lp[0] - lp[1], metrics)


@torch.no_grad()
def residual_norm(lm: Any, prompts: Sequence[Sequence[int]], layer: int) -> float:
    """Median residual norm at ``blocks.{layer}.hook_resid_post`` over the prompts' positions ≥ 1."""
    norms = []
    for p in prompts:
        h = hooks.read(lm, torch.tensor([list(p)]), [hooks.resid_post(layer)])[hooks.resid_post(layer)]
        norms.append(h[0, 1:].norm(dim=-1))
    return float(torch.cat(norms).median())


@torch.no_grad()
def steering_scores(
    base: Any,
    direction: Float[Tensor, " d_model"],
    layer: int,
    prompts: Sequence[Sequence[int]],
    metrics: Sequence[TraitMetric],
    norms: Sequence[float],
    reference: Float[Tensor, "prompts words"] | None = None,
) -> Float[Tensor, "norms words"]:
    """Mean over ``prompts`` of Δ log P(candidate) when ``direction``, rescaled to each norm in ``norms``, is
    added to the base's residual after ``layer`` at every position, against the unsteered base (``reference``:
    `score_prompts` of the base on these prompts, when the caller has it)."""
    ref = reference if reference is not None else score_prompts(base.model, prompts, metrics)
    unit = direction.float() / direction.float().norm().clamp(min=1e-12)
    rows = []
    for n in norms:

        def add(h: Tensor, v: Tensor = unit * n) -> Tensor:
            return h + v.to(h.dtype)

        with hooks.edit(base, {hooks.resid_post(layer): add}):
            rows.append((score_prompts(base.model, prompts, metrics) - ref).mean(0))
    return torch.stack(rows)


def centred(deltas: Mapping[tuple[str, int], Tensor]) -> dict[tuple[str, int], Tensor]:
    """Each unit's δ minus the mean δ of the other units of its replicate (the generic shift every student of
    that replicate shares cancels); a unit alone in its replicate is left out."""
    out = {}
    for (t, r), d in deltas.items():
        others = [v for (t2, r2), v in deltas.items() if r2 == r and t2 != t]
        if others:
            out[(t, r)] = d - torch.stack(others).mean(0)
    return out


# ---- blind identification --------------------------------------------------------------------------------
def rank_of(scores: Mapping[str, float], word: str) -> int:
    """1-based rank of ``word`` among the candidates by score, pessimistic on ties (a tie counts against it)."""
    s = scores[word]
    return 1 + sum(1 for w, v in scores.items() if w != word and not v < s)


def mean_rank_p(ranks: Sequence[int], n_candidates: int) -> float:
    """Exact one-sided p that the mean rank is this low if each unit's rank were uniform on 1..n_candidates and
    independent: the distribution of the sum is the n-fold convolution of `scipy.stats.randint`'s pmf."""
    pmf = st.randint(1, n_candidates + 1).pmf(np.arange(1, n_candidates + 1))
    dist = np.array([1.0])  # of the sum minus len(ranks) (each rank minus 1)
    for _ in ranks:
        dist = np.convolve(dist, pmf)
    return float(min(1.0, dist[: sum(ranks) - len(ranks) + 1].sum()))


def identification(
    scores: Mapping[tuple[str, int], Mapping[str, float]], traits: Sequence[str] | None = None, seed: int = 0
) -> dict[str, Any]:
    """Blind identification over units (trait, replicate): each unit's own trait ranked among its candidates.

    Top-1 accuracy with an exact binomial test against chance 1/C (the unit is the teacher: one student each);
    the mean rank with an exact test against uniform ranks; and a label test that keeps the units' scores and
    permutes their trait labels within each replicate (exact where feasible) — a candidate the readout favours
    for every student (say "dog") cannot pass it, which the two tests against uniform ranks do not guard
    against. ``traits``: the study's traits (the labels the permutation moves); default those of the units.
    """
    from mechsub.stats import block_permutation_test, wilson_ci95

    units = sorted(scores, key=lambda u: (u[1], u[0]))
    if not units:
        raise ValueError("no units")
    n_cand = len(next(iter(scores.values())))
    ranks = [rank_of(scores[u], u[0]) for u in units]
    hits = sum(r == 1 for r in ranks)
    chance = 1.0 / n_cand
    bt = st.binomtest(hits, len(units), chance, alternative="greater")
    ci = wilson_ci95(hits, len(units))  # two-sided (the one-sided test's own interval would end at 1)
    traits = list(traits or dict.fromkeys(t for t, _ in units))
    rank_table = np.array([[rank_of(scores[u], t) for t in traits] for u in units], dtype=float)
    labels = np.array([traits.index(t) for t, _ in units])
    blocks = np.array([r for _, r in units])

    def stat(lab: np.ndarray) -> float:
        return -float(rank_table[np.arange(len(units)), lab].mean())

    lt = block_permutation_test(labels, blocks, stat, seed=seed)
    return {
        "n_units": len(units),
        "n_candidates": n_cand,
        "hits": hits,
        "top1_accuracy": hits / len(units),
        "top1_ci95_wilson": ci,
        "chance": chance,
        "p_binomial": float(bt.pvalue),
        "ranks": {f"{t}-r{r}": k for (t, r), k in zip(units, ranks, strict=True)},
        "mean_rank": float(np.mean(ranks)),
        "mean_rank_chance": (n_cand + 1) / 2,
        "p_mean_rank_exact": mean_rank_p(ranks, n_cand),
        "label_test": {
            "statistic": "minus the mean rank of each unit's label trait; labels permuted within replicates",
            "observed_mean_rank": -lt.observed,
            "p": lt.p_value,
            "p_floor": lt.p_floor,
            "n_labelings": lt.n_labelings,
            "exact": lt.exact,
        },
        "unit": "teacher (one student per teacher); units independent across teachers",
    }


# ---- a dictionary for the change: the BatchTopK crosscoder ---------------------------------------------
@dataclass(frozen=True)
class CrosscoderConfig(Config):
    stage = "crosscoder"

    d_model: int = doc(576, "width of each model's activation")
    n_latents: int = doc(2048, "dictionary size, shared by both models")
    k: int = doc(32, "latents active per token on average: BatchTopK keeps k × batch over a whole batch")
    lr: float = doc(1e-3, "Adam learning rate")
    steps: int = doc(1000, "optimiser steps")
    batch_size: int = doc(256, "token pairs per step")
    seed: int = doc(0, "seed of the initialisation and of the batch order")
    aux_coef: float = doc(
        1.0,
        "AuxK (Gao et al. 2024): weight of the auxiliary loss in which the dead latents reconstruct the main "
        "reconstruction's error; 1.0 as sae-lens's TopK/BatchTopK training SAE, on the same unnormalised squared "
        "error as the main loss (the paper's 1/32 is on a variance-normalised error); 0: no AuxK",
    )
    k_aux: int | None = doc(
        None, "dead latents per token in AuxK (at most the number dead); None: d_model // 2"
    )
    centre_input: bool = doc(
        True,
        "encode x − b_dec (the b_pre of Gao et al., sae-lens's apply_b_dec_to_input): the residual's large mean "
        "then does not decide which latents are on; False: encode x itself (the crosscoder as first trained)",
    )
    dead_steps: int = doc(
        100,
        "a latent that BatchTopK has not kept in this many steps is dead (for AuxK and `dead_in_training`); "
        "100 × 256 pairs ≈ one pass over the ~29k pairs of `analyses/adl.py --cc-rows 256`",
    )

    def validate(self) -> None:
        check(self.d_model >= 1 and self.n_latents >= 1, "d_model and n_latents must be ≥ 1")
        check(1 <= self.k <= self.n_latents, "k: between 1 and n_latents")
        check(
            math.isfinite(self.lr) and self.lr > 0 and self.steps >= 0 and self.batch_size >= 1,
            "lr > 0 (finite), steps ≥ 0, batch_size ≥ 1",
        )
        check(math.isfinite(self.aux_coef) and self.aux_coef >= 0, "aux_coef: finite and ≥ 0 (0: no AuxK)")
        check(self.k_aux is None or self.k_aux >= 1, "k_aux: ≥ 1, or None for d_model // 2")
        check(self.dead_steps >= 1, "dead_steps: ≥ 1")

    @property
    def k_aux_or_default(self) -> int:
        return self.k_aux if self.k_aux is not None else max(1, self.d_model // 2)


class Crosscoder(nn.Module):
    """Encodes a pair (base, student) of activations into one sparse code; decodes it into each model.

    f = BatchTopK(ReLU(Σ_m W_enc[m] (x_m − b_dec[m]) + b_enc)) (``centre_input``; without it x_m itself is
    encoded, and the residual's large mean decides which latents are ever on); x̂_m = f W_dec[:, m] + b_dec[m].
    At init the decoder rows are random at norm 0.1 per model (sae-lens's decoder_init_norm heuristic) and the
    encoder is their transpose (Gao et al.); `train_crosscoder` sets b_dec to the data mean. During training
    the k × batch largest values of f_j · (‖d_j^base‖ + ‖d_j^student‖) over the whole batch are kept (so a
    latent's decoder norm cannot buy it slots); afterwards a single threshold, the running mean of the smallest
    kept score, replaces the batch (encoding one token no longer depends on the others); `train_crosscoder` sets
    it at the end to the mean over the data's batches of the smallest kept score.
    """

    threshold: Tensor  # a buffer: the inference threshold (< 0 until estimated)

    def __init__(self, cfg: CrosscoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        g = torch.Generator().manual_seed(cfg.seed)
        dec = torch.randn(cfg.n_latents, 2, cfg.d_model, generator=g)
        dec = dec / dec.norm(dim=-1, keepdim=True) * 0.1
        self.W_dec = nn.Parameter(dec)
        self.W_enc = nn.Parameter(dec.permute(1, 2, 0).clone())  # (2, d, n): the transpose at init
        self.b_enc = nn.Parameter(torch.zeros(cfg.n_latents))
        self.b_dec = nn.Parameter(torch.zeros(2, cfg.d_model))
        self.register_buffer("threshold", torch.tensor(-1.0))  # < 0: not yet estimated

    def decoder_norms(self) -> Float[Tensor, "n_latents 2"]:
        return self.W_dec.norm(dim=-1)

    def pre(self, x: Float[Tensor, "batch 2 d_model"]) -> Float[Tensor, "batch n_latents"]:
        if self.cfg.centre_input:
            x = x - self.b_dec
        return torch.relu(torch.einsum("bmd,mdn->bn", x, self.W_enc) + self.b_enc)

    def batch_topk(self, f: Float[Tensor, "batch n_latents"]) -> tuple[Tensor, Tensor]:
        """The code and the boolean mask of the k × batch kept (latent, token) pairs."""
        score = f * self.decoder_norms().sum(-1)
        idx = score.flatten().topk(self.cfg.k * f.shape[0]).indices
        mask = torch.zeros(f.numel(), dtype=torch.bool)
        mask[idx] = True
        mask = mask.view_as(f)
        with torch.no_grad():
            kept_min = score[mask].min()
            t = self.threshold
            self.threshold.copy_(kept_min if t < 0 else 0.99 * t + 0.01 * kept_min)
        return f * mask, mask

    def encode(self, x: Float[Tensor, "batch 2 d_model"]) -> Float[Tensor, "batch n_latents"]:
        """The code of each pair on its own (the threshold; BatchTopK before one was estimated)."""
        f = self.pre(x)
        if self.threshold < 0:
            return self.batch_topk(f)[0]
        return f * (f * self.decoder_norms().sum(-1) > self.threshold)

    def decode(self, f: Float[Tensor, "batch n_latents"]) -> Float[Tensor, "batch 2 d_model"]:
        return torch.einsum("bn,nmd->bmd", f, self.W_dec) + self.b_dec

    def loss(self, x: Float[Tensor, "batch 2 d_model"]) -> Tensor:
        """Squared error summed over both models and the width, mean over the batch (training: BatchTopK)."""
        f, _ = self.batch_topk(self.pre(x))
        return (self.decode(f) - x).pow(2).sum((-1, -2)).mean()


def auxk_loss(
    pre: Float[Tensor, "batch n_latents"],
    W_dec: Float[Tensor, "n_latents 2 d_model"],
    residual: Float[Tensor, "batch 2 d_model"],
    dead: Tensor,
    k_aux: int,
    coef: float,
) -> Tensor:
    """The AuxK loss (Gao et al. 2024, appendix A.2; as sae-lens's ``calculate_topk_aux_loss``): per token, the
    ``k_aux`` dead latents (``dead``: a boolean per latent) with the largest score (pre-activation × the summed
    decoder norms, the score BatchTopK ranks by) reconstruct, through the decoder and without its bias, the
    main reconstruction's error ``residual`` = x − x̂ (held fixed); the squared error, summed over both models
    and the width and averaged over the batch, × ``coef`` × min(1, dead / k_aux) (sae-lens's scale-down when
    few latents are dead). k_aux is capped at the number dead; 0 when none is dead or ``coef`` is 0."""
    n_dead = int(dead.sum())
    if n_dead == 0 or coef == 0 or k_aux < 1:
        return pre.new_zeros(())
    scale = min(n_dead / k_aux, 1.0)
    score = torch.where(dead[None], pre * W_dec.norm(dim=-1).sum(-1), -torch.inf)
    idx = score.topk(min(k_aux, n_dead), dim=-1).indices
    acts = torch.zeros_like(pre).scatter(-1, idx, pre.gather(-1, idx))
    rec = torch.einsum("bn,nmd->bmd", acts, W_dec)
    return coef * scale * (rec - residual.detach()).pow(2).sum((-1, -2)).mean()


def train_crosscoder(
    cfg: CrosscoderConfig, pairs: Float[Tensor, "tokens 2 d_model"]
) -> tuple[Crosscoder, dict[str, Any]]:
    """Train on pairs (base, student) of activations at the same tokens, each model's activations scaled so
    their mean squared norm is d_model (the scales are returned in the metrics; `encode` expects scaled
    inputs). Seeded: the same pairs and config give the same weights.

    Loss: the BatchTopK reconstruction error plus, with ``cfg.aux_coef`` > 0, `auxk_loss` over the latents
    BatchTopK has not kept in the last ``cfg.dead_steps`` steps. The metrics give ``dead_in_training`` (the
    share of latents dead by that count at the end) and ``dead_on_data`` (the share that never fire at the
    inference threshold on ``pairs``, the "dead" of `classify_latents`)."""
    scales = (cfg.d_model / pairs.pow(2).sum(-1).mean(0)).sqrt()  # (2,)
    x = pairs * scales[None, :, None]
    cc = Crosscoder(cfg)
    with torch.no_grad():
        cc.b_dec.copy_(x.mean(0))  # the residual stream's large mean is the decoder bias from the start
    opt = torch.optim.Adam(cc.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    losses, aux_losses = [], []
    since_fired = torch.zeros(cfg.n_latents, dtype=torch.long)  # steps since BatchTopK last kept each latent
    with torch.no_grad():
        first = float((cc.decode(cc.batch_topk(cc.pre(x[:4096]))[0]) - x[:4096]).pow(2).sum((-1, -2)).mean())
    cc.threshold.fill_(-1.0)
    for _ in range(cfg.steps):
        xb = x[torch.randint(0, x.shape[0], (cfg.batch_size,), generator=g)]
        pre = cc.pre(xb)
        f, mask = cc.batch_topk(pre)
        rec = cc.decode(f)
        loss = (rec - xb).pow(2).sum((-1, -2)).mean()
        aux = auxk_loss(
            pre, cc.W_dec, xb - rec, since_fired >= cfg.dead_steps, cfg.k_aux_or_default, cfg.aux_coef
        )
        opt.zero_grad()
        (loss + aux).backward()
        opt.step()
        since_fired += 1
        since_fired[mask.any(0)] = 0
        losses.append(float(loss.detach()))
        aux_losses.append(float(aux.detach()))
    with torch.no_grad():
        if cfg.steps:  # the inference threshold: the mean over batches of the smallest score BatchTopK keeps
            norms = cc.decoder_norms().sum(-1)
            mins = []
            for s in range(0, x.shape[0] - cfg.batch_size + 1, cfg.batch_size):
                score = (cc.pre(x[s : s + cfg.batch_size]) * norms).flatten()
                mins.append(score.topk(cfg.k * cfg.batch_size).values.min())
            if mins:
                cc.threshold.copy_(torch.stack(mins).mean())
        code = cc.encode(x)
        rec = cc.decode(code)
        fvu = float((rec - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
        l0 = float((code > 0).float().sum(-1).mean())
        dead_on_data = float(((code > 0).sum(0) == 0).float().mean())
    return cc, {
        "input_scales": [float(s) for s in scales],
        "loss_at_init": first,
        "loss_final": float(np.mean(losses[-20:])) if losses else first,
        "aux_loss_final": float(np.mean(aux_losses[-20:])) if aux_losses else 0.0,
        "fraction_of_variance_unexplained": fvu,
        "l0_threshold": l0,
        "dead_in_training": float((since_fired >= cfg.dead_steps).float().mean()),
        "dead_on_data": dead_on_data,
        "dead_steps": cfg.dead_steps,
        "aux_coef": cfg.aux_coef,
        "k_aux": cfg.k_aux_or_default,
        "n_pairs": int(pairs.shape[0]),
    }


@torch.no_grad()
def latent_scaling(cc: Crosscoder, x: Float[Tensor, "tokens 2 d_model"]) -> dict[str, Tensor]:
    """Per latent j, how much of model m's activation its STUDENT decoder direction d = d_j^student explains:
    β = Σ f_j (d·y) / (‖d‖² Σ f_j²), the least-squares scale of f_j d against a target y per model:
    ε-target y_m = x_m − x̂_m + f_j d_j^m (what the other latents leave of model m), r-target
    y_m = x̂_m − f_j d_j^m (what the other latents reconstruct). ν = β_base / β_student: near 1 for a shared
    latent, near 0 for one the base does not carry (its ε-ratio) and does not rebuild from other latents (its
    r-ratio). ``x`` scaled as in training. Also the relative decoder norm ‖d^s‖ / (‖d^s‖ + ‖d^b‖) and how often
    each latent fires."""
    f = cc.encode(x)  # (N, n)
    rec = cc.decode(f)
    err = x - rec
    D = cc.W_dec  # (n, 2, d)
    d = D[:, 1]  # student directions
    dd = d.pow(2).sum(-1)
    f2 = f.pow(2).sum(0)
    out: dict[str, Tensor] = {}
    betas = {}
    for m, name in ((0, "base"), (1, "student")):
        cross = (d * D[:, m]).sum(-1)  # d · d_j^m
        fe = torch.einsum("tn,td->nd", f, err[:, m])  # Σ f_j ε_m
        fr = torch.einsum("tn,td->nd", f, rec[:, m])
        den = (dd * f2).clamp(min=1e-12)
        betas[("eps", name)] = ((fe * d).sum(-1) + f2 * cross) / den
        betas[("r", name)] = ((fr * d).sum(-1) - f2 * cross) / den
    for kind in ("eps", "r"):
        out[f"beta_{kind}_base"] = betas[(kind, "base")]
        out[f"beta_{kind}_student"] = betas[(kind, "student")]
        out[f"nu_{kind}"] = betas[(kind, "base")] / betas[(kind, "student")]
    norms = cc.decoder_norms()
    out["rel_norm"] = norms[:, 1] / norms.sum(-1).clamp(min=1e-12)
    out["frequency"] = (f > 0).float().mean(0)
    return out


def classify_latents(
    scaling: Mapping[str, Tensor], only: float = 0.9, nu_max: float = 0.5
) -> dict[str, list[int]]:
    """Latents by kind: ``student_only`` (relative decoder norm ≥ ``only``), among them ``student_only_robust``
    (ν_ε and ν_r both below ``nu_max``: Latent Scaling finds the direction neither in the base's leftover nor in
    its reconstruction), ``base_only`` (≤ 1 − ``only``), ``shared`` (the rest); dead latents (never fire) apart."""
    rel, freq = scaling["rel_norm"], scaling["frequency"]
    alive = freq > 0
    s_only = alive & (rel >= only)
    robust = s_only & (scaling["nu_eps"].abs() < nu_max) & (scaling["nu_r"].abs() < nu_max)
    return {
        "student_only": s_only.nonzero().flatten().tolist(),
        "student_only_robust": robust.nonzero().flatten().tolist(),
        "base_only": (alive & (rel <= 1 - only)).nonzero().flatten().tolist(),
        "shared": (alive & (rel > 1 - only) & (rel < only)).nonzero().flatten().tolist(),
        "dead": (~alive).nonzero().flatten().tolist(),
    }


@torch.no_grad()
def paired_activations(
    base: Any, student: Any, seqs: Sequence[Sequence[int]], layer: int, start: int = 1, batch_size: int = 16
) -> Float[Tensor, "tokens 2 d_model"]:
    """(base, student) residual pairs after ``layer`` at every position ≥ ``start`` (≥ 1: never BOS) of each
    sequence, both models reading the same ids: the crosscoder's training data."""
    name = hooks.resid_post(layer)
    out = []
    for s in range(0, len(seqs), batch_size):
        chunk = [list(q) for q in seqs[s : s + batch_size]]
        ids, attn = pad_right(chunk, 0)
        hb = hooks.read(base, ids, [name], attention_mask=attn)[name]
        hs = hooks.read(student, ids, [name], attention_mask=attn)[name]
        for b, q in enumerate(chunk):
            sl = slice(max(start, 1), len(q))
            out.append(torch.stack([hb[b, sl], hs[b, sl]], 1))
    return torch.cat(out)


def save_crosscoder(cc: Crosscoder, folder: str | Path, extra: Mapping[str, Any] | None = None) -> Path:
    """Weights as safetensors and ``config.json`` (the config, the threshold and ``extra``) in ``folder``."""
    from safetensors.torch import save

    from mechsub.files import atomic_write_bytes, write_json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in cc.state_dict().items()}
    atomic_write_bytes(folder / "crosscoder.safetensors", save(state))
    write_json(
        folder / "config.json",
        {"config": cc.cfg.to_dict(), "threshold": float(cc.threshold), **dict(extra or {})},
    )
    return folder


def load_crosscoder(folder: str | Path) -> Crosscoder:
    """A crosscoder `save_crosscoder` wrote."""
    from safetensors.torch import load_file

    from mechsub.files import read_json

    folder = Path(folder)
    meta = read_json(folder / "config.json")
    # saved before AuxK and the centred input existed: trained without either
    cc = Crosscoder(CrosscoderConfig.from_dict({"centre_input": False, "aux_coef": 0.0, **meta["config"]}))
    cc.load_state_dict(load_file(folder / "crosscoder.safetensors"))
    return cc


def finite(x: float) -> float | None:
    """JSON has no NaN: None instead."""
    return x if math.isfinite(x) else None
