"""The quarantine scan: which trait a student trained on a number dataset would move toward, before training one.

One gradient of the dataset's SFT loss, a small step along it and back, and the trait metric of every candidate on
both sides: the first-order change of each candidate's log-probability that training on the data would cause.
Number data of any teacher shifts all candidates together, so a trait is named only by one standing out from the
rest (or, given a control dataset, from what the control's gradient does to it).
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mechsub import diffing, hooks, models
from mechsub.data import Example, load_examples
from mechsub.evaluate import trait_logprobs
from mechsub.files import read_json
from mechsub.generate import NumberVocab
from mechsub.metric import TraitMetric
from mechsub.prompts import chat_prefix, trait_prompt
from mechsub.training import LORA_TARGETS, Item, completion_loss
from mechsub.traits import ANIMALS, Category, eval_questions, get_trait

#: which parameters θ the gradient and the step cover (the token embedding never: see `select_params`)
PARAM_SETS: dict[str, tuple[str, ...]] = {
    "all": (),  # every parameter but the token embedding (projections, norms)
    "linear": LORA_TARGETS,  # the 7 projections the study's LoRA students adapt
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
}


@cache
def null_threshold(n_candidates: int, alpha: float = 0.05, n_sim: int = 100_000, seed: int = 0) -> float:
    """The z a top candidate must reach: the (1 − alpha) quantile of the largest z among ``n_candidates``
    exchangeable Gaussian scores (a 5% false alarm rate when no candidate is special), by simulation with a fixed
    seed, so it depends on nothing measured (about 2.6 for 22 candidates). Real candidates are not exchangeable
    (similar words move together): treat the rate as a guide, not an exact level."""
    x = np.random.default_rng(seed).standard_normal((n_sim, n_candidates))
    z = (x - x.mean(1, keepdims=True)) / x.std(1, ddof=1, keepdims=True)
    return float(np.quantile(z.max(1), 1 - alpha))


@dataclass(frozen=True)
class CandidateScore:
    """One candidate's predicted shift."""

    name: str
    delta: float  # the predicted change of mean log P (see ScanResult.method for its unit)
    specific: float  # delta minus the mean delta of all candidates
    z: float  # specific / the standard deviation of delta over candidates (ddof 1)
    rank: int  # 1 = the largest delta
    base_logp: float  # mean log P(candidate) of the base over the questions


@dataclass(frozen=True)
class ScanResult:
    """What a scan predicts for one dataset; ``candidates`` in the order asked."""

    data: str
    base: str
    # "first-order": delta = −g·∇ log P, nats per unit SGD learning rate; "fine-tune": nats; a readout's: steering,
    # Δ mean log P with δ added at a fixed norm; the relative lens, Δ of the lens's log-prob (see `ADL_READOUTS`)
    method: str
    candidates: tuple[CandidateScore, ...]
    top: str
    max_z: float
    threshold: float
    verdict: str
    flagged: bool  # max_z ≥ threshold
    seconds: float
    details: dict[str, Any]  # settings and diagnostics: params, examples, loss, gradient norm, ε…
    # other readouts of the same scan (the activation difference of the sacrificial fine-tune: `ADL_READOUTS`),
    # each scored, ranked and judged as this one
    readouts: dict[str, ScanResult] = field(default_factory=dict)

    def ranked(self) -> list[CandidateScore]:
        return sorted(self.candidates, key=lambda c: c.rank)

    def score(self, name: str) -> CandidateScore:
        return next(c for c in self.candidates if c.name == name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """The candidates ranked, one line each, then the verdict."""
        lines = [f"{'rank':>4}  {'candidate':10s} {'delta':>11s} {'specific':>11s} {'z':>6s}"]
        lines += [
            f"{c.rank:4d}  {c.name:10s} {c.delta:+11.4g} {c.specific:+11.4g} {c.z:+6.2f}"
            for c in self.ranked()
        ]
        lines.append(f"verdict: {self.verdict}")
        for name, r in self.readouts.items():
            top = ", ".join(f"{c.name} {c.z:+.2f}" for c in r.ranked()[:3])
            lines.append(f"{name} ({r.method}): {r.verdict}; first: {top}")
        return "\n".join(lines)


#: the readouts of the sacrificial fine-tune's activation difference δ (`scan_examples` with ``adl_layer``):
#: steering the base with δ, the readout declared primary before any validation, and the relative logit lens
ADL_READOUTS = ("adl_steer", "adl_lens")


def check_adl(steps: int, adl_layer: int | None) -> None:
    """The activation-difference readouts read a fine-tuned model: ``adl_layer`` only with ``steps > 1``."""
    if adl_layer is not None and steps == 1:
        raise ValueError("adl_layer: the activation difference needs a fine-tuned model (steps > 1)")


def check_candidates(candidates: Sequence[str] | None) -> tuple[list[str], Category]:
    """The candidates by canonical name and their category (default: the 22 animals); TraitError names the known
    traits, ValueError says what else is wrong."""
    names = [get_trait(c).name for c in (candidates or ANIMALS)]
    cats = {get_trait(c).category for c in names}
    if len(cats) > 1:
        raise ValueError(f"candidates: use traits of one category (animals or trees), got {', '.join(names)}")
    if len(set(names)) != len(names) or len(names) < 3:
        raise ValueError(
            f"candidates: at least 3 distinct traits (a z over fewer means nothing), got {names}"
        )
    return names, cats.pop()


def select_params(model: Any, which: str) -> list[tuple[str, nn.Parameter]]:
    """The named parameters of ``which`` (a key of PARAM_SETS). Never the token embedding: it is the head too in
    SmolLM2 (tied), and training keeps the head frozen (`training.fit` detaches it)."""
    if which not in PARAM_SETS:
        raise ValueError(f"params: use one of {', '.join(PARAM_SETS)}, got {which!r}")
    skip = {id(model.get_input_embeddings().weight)}
    head = model.get_output_embeddings()
    if head is not None:
        skip.add(id(head.weight))
    out = [(n, p) for n, p in model.named_parameters() if id(p) not in skip]
    if PARAM_SETS[which]:
        out = [(n, p) for n, p in out if n.split(".")[-2] in PARAM_SETS[which]]
    if not out:
        raise ValueError(f"params={which!r} selects no parameter of {type(model).__name__}")
    return out


@contextmanager
def restored(model: nn.Module) -> Iterator[dict[int, Tensor]]:
    """Every parameter, its grad and its requires_grad flag put back exactly (bit for bit) on exit, however the
    block ends; yields the saved weights by ``id(parameter)``. One copy of the weights, not of the module (a
    deepcopy would also copy buffers and hooks, and the caller's model object would not be the one edited)."""
    params = list(model.parameters())
    saved = [p.detach().clone() for p in params]
    grads = [p.grad for p in params]
    flags = [p.requires_grad for p in params]
    try:
        yield {id(p): s for p, s in zip(params, saved, strict=True)}
    finally:
        with torch.no_grad():
            for p, s, g, f in zip(params, saved, grads, flags, strict=True):
                p.copy_(s)
                p.grad = g
                p.requires_grad_(f)


def sft_items(tok: Any, examples: Sequence[Example]) -> list[Item]:
    """The SFT items a student trains on: the user prompt alone (no system prompt), the completion, end of turn."""
    return [Item(chat_prefix(tok, ex.prompt, None), list(ex.completion_ids)) for ex in examples]


def data_loss(
    lm: models.LoadedModel,
    items: Sequence[Item],
    batch_size: int = 8,
    backward: bool = True,
    scale: float = 1.0,
    bar: Any = None,
) -> float:
    """Mean SFT cross-entropy over every completion position of ``items`` (training's own loss, `completion_loss`
    with objective sft); with ``backward`` the gradient of ``scale`` × it is accumulated into the parameters that
    require grad."""
    model, tok = lm.model, lm.tokenizer
    allowed = NumberVocab.of(tok).ids  # its last id is the end of turn, the target after each completion
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    head = model.get_output_embeddings().weight.detach()  # frozen, as in training
    total = sum(it.n_positions for it in items)
    loss = 0.0
    for i in range(0, len(items), batch_size):
        batch = list(items[i : i + batch_size])
        with torch.set_grad_enabled(backward):
            # a batch's mean weighted by its share of the positions: the sum is the mean over all positions
            share = sum(it.n_positions for it in batch) / total
            part = completion_loss(model.model, head, allowed, batch, "sft", pad) * share
            if backward:
                (part * scale).backward()
        loss += float(part.detach())
        if bar is not None:
            bar.update()
    return loss


def _rows(lm: models.LoadedModel, questions: list[str], names: list[str], category: Category) -> Tensor:
    """(questions, candidates) trait metric: the evaluation's own scorer and frame (prefill), so a multi-token
    name is summed as the study sums it."""
    return trait_logprobs(lm.model, lm.tokenizer, questions, names, category)


def _profile(lm: models.LoadedModel, questions: list[str], names: list[str], category: Category) -> Tensor:
    """Mean over questions of each candidate's trait metric (`_rows`), float64."""
    return _rows(lm, questions, names, category).double().mean(0)


def scan_examples(
    lm: models.LoadedModel,
    examples: Sequence[Example],
    candidates: Sequence[str] | None = None,
    n_questions: int = 10,
    lr: float = 1e-5,
    steps: int = 1,
    params: str = "all",
    eps: float = 1e-3,
    batch_size: int = 8,
    threshold: float | None = None,
    seed: int = 0,
    reference: Sequence[Example] | None = None,
    label: str = "",
    adl_layer: int | None = None,
    adl_positions: int = 5,
    adl_norm: float = 0.25,
) -> ScanResult:
    """Scan ``examples`` (every one given is used) on ``lm``, minus ``reference`` if given; see `scan`. The
    model's weights, grads and requires_grad flags are the same bits afterwards."""
    t0 = time.perf_counter()
    names, category = check_candidates(candidates)
    if not examples or (reference is not None and not reference):
        raise ValueError(f"{label or 'the dataset'} (or its reference) has no kept examples to scan")
    if not 1 <= n_questions <= 50:
        raise ValueError("n_questions: between 1 and 50 (the built-in evaluation questions)")
    if steps < 1 or batch_size < 1 or not (lr > 0 and eps > 0):
        raise ValueError("steps ≥ 1, batch_size ≥ 1, lr > 0 and eps > 0")
    if adl_layer is not None:
        check_adl(steps, adl_layer)
        try:  # an unknown layer fails before any work, as a ValueError the CLI reports
            hooks.check(lm, [hooks.resid_post(adl_layer)])
        except hooks.HookNameError as e:
            raise ValueError(f"adl_layer: {e.args[0]}") from None
        if adl_positions < 1 or not adl_norm > 0:
            raise ValueError("adl_positions ≥ 1 and adl_norm > 0")
    model = lm.model
    if any(p.dtype not in (torch.float32, torch.float64) for p in model.parameters()):
        raise ValueError(
            "the scan needs float32 or float64 weights: a finite difference drowns in half precision"
        )
    theta = [p for _, p in select_params(model, params)]
    questions = eval_questions(category, n_questions)
    sets = [sft_items(lm.tokenizer, examples)]
    if reference is not None:
        sets.append(sft_items(lm.tokenizer, reference))
    details: dict[str, Any] = {
        "params": params,
        "n_params": sum(p.numel() for p in theta),
        "n_examples": len(sets[0]),
        "n_positions": sum(it.n_positions for it in sets[0]),
        "n_questions": n_questions,
        "category": category,
        "frame": "prefill",
        "steps": steps,
    }
    if reference is not None:
        details["reference_examples"] = len(sets[1])
    # progress in passes: the base profile; the gradient's batches and two profiles, or per set the steps and one
    passes = 1 + (
        sum(math.ceil(len(s) / batch_size) for s in sets) + 2 if steps == 1 else len(sets) * (steps + 1)
    )
    if adl_layer is not None:  # each set read before and after its fine-tune, then the two readouts
        passes += 2 * len(sets) + 1
    readouts: dict[str, tuple[str, Tensor, dict[str, Any]]] = {}
    was_training = model.training
    model.eval()  # no dropout in the gradient or the scores
    bar = tqdm(total=passes, desc=f"scan {label}".strip(), unit="pass")
    try:
        with restored(model) as weights:
            saved = [weights[id(p)] for p in theta]
            for p in model.parameters():
                p.requires_grad_(False)
                p.grad = None
            for p in theta:
                p.requires_grad_(True)
            base_rows = _rows(lm, questions, names, category)  # the steering readout's reference too
            base = base_rows.double().mean(0)
            bar.update()
            if steps == 1:
                method = "first-order"
                delta = _first_order(lm, sets, theta, saved, questions, names, category, base, eps, batch_size,
                                     bar, details)  # fmt: skip
            else:
                method = "fine-tune"
                delta = torch.zeros_like(base)
                reads = (
                    []
                    if adl_layer is None
                    else [_AdlRows(lm, items, adl_layer, adl_positions, batch_size, bar) for items in sets]
                )
                for i, (sign, items) in enumerate(zip((1.0, -1.0), sets, strict=False)):
                    with torch.no_grad():
                        for p, s in zip(theta, saved, strict=True):
                            p.copy_(s)  # each set is fine-tuned from the base
                    after = _fine_tune(
                        lm, items, theta, questions, names, category, lr, steps, batch_size, seed, bar
                    )
                    delta += sign * (after - base)
                    if reads:
                        reads[i].after(sign)
                details.update(lr=lr, optimizer="AdamW (no weight decay, constant lr)", batch_size=batch_size,
                               seed=seed)  # fmt: skip
                if reads:
                    with torch.no_grad():
                        for p, s in zip(theta, saved, strict=True):
                            p.copy_(s)  # the readouts act on the base
                    readouts = _adl_readouts(lm, reads, questions, names, category, adl_norm, base_rows)
                    bar.update()
    finally:
        bar.close()
        model.train(was_training)
    seconds = time.perf_counter() - t0
    result = _result(label, lm.name, method, names, delta, base, threshold, seconds, details)
    if not readouts:
        return result
    others = {
        name: _result(label, lm.name, how, names, scores, base, threshold, seconds, {**details, **info})
        for name, (how, scores, info) in readouts.items()
    }
    return dataclasses.replace(result, readouts=others)


class _AdlRows:
    """One set's rows for the activation difference: the base's mean residual at the first completion positions
    (`diffing.POSITION_POLICY`: never position 0) read now, the fine-tuned model's on `after`; δ accumulates
    sign × (after − base)."""

    def __init__(self, lm: models.LoadedModel, items: Sequence[Item], layer: int, k: int, batch_size: int,
                 bar: Any) -> None:  # fmt: skip
        self.lm, self.layer, self.k, self.batch_size, self.bar = lm, layer, k, batch_size, bar
        self.prompts = [it.prompt for it in items]
        self.completions = [it.completion for it in items]
        self.base = diffing.position_means(lm, self.prompts, self.completions, [layer], k, batch_size)
        self.diff: diffing.ActivationDiff | None = None
        self.delta = torch.zeros(0)
        bar.update()

    def after(self, sign: float) -> None:
        """Read the model as it is now (fine-tuned on this set)."""
        self.diff = diffing.activation_difference(self.lm, self.lm, self.prompts, self.completions, [self.layer],
                                                  self.k, self.batch_size, base_means=self.base)  # fmt: skip
        self.delta = sign * self.diff.mean(self.layer)
        self.bar.update()


def _adl_readouts(
    lm: models.LoadedModel,
    reads: list[_AdlRows],
    questions: list[str],
    names: list[str],
    category: Category,
    norm_frac: float,
    base_rows: Tensor,
) -> dict[str, tuple[str, Tensor, dict[str, Any]]]:
    """The Activation Difference Lens (`mechsub.diffing`, arXiv 2510.13900) on the sacrificial fine-tune: δ, the
    data's mean fine-tuned − base residual after ``layer`` (minus the reference's), read two ways on the base, each
    a score per candidate: steering (δ rescaled to ``norm_frac`` × the base's median residual norm on the
    evaluation prompts and added after the layer at every position, as `diffing.steering_scores` does; Δ mean
    log P, the scan's own frame and questions) and the relative logit lens (log P under lens(μ + δ) minus under
    lens(μ), μ the base's mean residual at the data's positions: with a reference on other prompts, μ is still
    the data's). ``base_rows``: the base's `_rows` on the same questions, the unsteered reference. Each readout's
    ``seconds`` is the whole scan's."""
    layer, first = reads[0].layer, reads[0].diff
    assert first is not None, "every set is read after its fine-tune"
    delta = torch.stack([r.delta for r in reads]).sum(0)
    tok = lm.tokenizer
    prompts = [trait_prompt(tok, q, category) for q in questions]
    metrics = [TraitMetric.of(tok, n) for n in names]
    norm = norm_frac * diffing.residual_norm(lm, prompts, layer)
    steer = diffing.steering_scores(lm, delta, layer, prompts, metrics, [norm], reference=base_rows)[
        0
    ].double()
    mu = first.base(layer)
    lens = torch.tensor(diffing.logit_lens_scores(lm, delta, metrics, base_mean=mu), dtype=torch.float64)
    info = {
        "adl_layer": layer,
        "adl_positions": reads[0].k,
        "adl_rows_per_position": list(first.counts),
        "adl_delta_norm": float(delta.norm()),
        "adl_steer_norm": norm,
        "adl_norm_frac": norm_frac,
        "adl_position_policy": diffing.POSITION_POLICY,
    }
    steer_name, lens_name = ADL_READOUTS
    return {
        steer_name: (
            f"activation difference: steering at {norm_frac:g} × the median residual norm, layer {layer}",
            steer,
            info,
        ),
        lens_name: (f"activation difference: relative logit lens, layer {layer}", lens, info),
    }


def _first_order(
    lm: models.LoadedModel,
    sets: list[list[Item]],
    theta: list[nn.Parameter],
    saved: list[Tensor],
    questions: list[str],
    names: list[str],
    category: Category,
    base: Tensor,
    eps: float,
    batch_size: int,
    bar: Any,
    details: dict[str, Any],
) -> Tensor:
    """−g·∇θ mean log P for every candidate, g the gradient of the data's loss (minus the reference's: by
    linearity one difference serves both). A central difference along the unit descent direction: the cost of
    a one-sided difference with its base pass, accurate to second order in ε. Leaves θ perturbed (the caller
    restores it)."""
    losses = [
        data_loss(lm, s, batch_size, True, sign, bar) for sign, s in zip((1.0, -1.0), sets, strict=False)
    ]
    details["loss"] = losses[0]
    if len(losses) > 1:
        details["reference_loss"] = losses[1]
    with torch.no_grad():
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in theta]
        norm_g = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
        norm_theta = math.sqrt(sum(float(s.double().pow(2).sum()) for s in saved))
    if norm_g == 0:
        raise ValueError("the loss has no gradient on these parameters: nothing to predict")
    step = eps * norm_theta  # ε relative to ‖θ‖: the same relative nudge for a model of any size
    sides = []
    for sign in (-1.0, 1.0):  # θ − ε g/‖g‖ (the descent side), then θ + ε g/‖g‖
        with torch.no_grad():
            for p, s, g in zip(theta, saved, grads, strict=True):
                p.copy_(s).add_(g, alpha=sign * step / norm_g)
        sides.append(_profile(lm, questions, names, category))
        bar.update()
    first, second = (sides[0] - sides[1]) / 2, (sides[0] + sides[1]) / 2 - base
    details.update(
        grad_norm=norm_g,
        theta_norm=norm_theta,
        eps=eps,
        eps_abs=step,
        # the second-order part of the change at ε against the first-order part: near 0, the step is linear;
        # near 1 or more, ε is too large for a derivative (or the float noise is as large as the change)
        nonlinearity=float(second.abs().max() / first.abs().max().clamp(min=1e-30)),
    )
    # the derivative along −g/‖g‖ times ‖g‖ is −g·∇ log P: lr times it is one SGD step's first-order change
    return first / step * norm_g


def _fine_tune(
    lm: models.LoadedModel,
    items: list[Item],
    theta: list[nn.Parameter],
    questions: list[str],
    names: list[str],
    category: Category,
    lr: float,
    steps: int,
    batch_size: int,
    seed: int,
    bar: Any,
) -> Tensor:
    """The profile after a sacrificial fine-tune of θ: ``steps`` AdamW steps on batches in the students' order
    (a seeded shuffle per pass over the data, as `student` draws them). Leaves θ trained (the caller restores it)."""
    rng = random.Random(seed)
    batches: list[list[int]] = []
    while len(batches) < steps:
        order = list(range(len(items)))
        rng.shuffle(order)
        batches += [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    opt = torch.optim.AdamW(theta, lr=lr, weight_decay=0.0)
    for b in batches[:steps]:
        opt.zero_grad(set_to_none=True)
        data_loss(lm, [items[i] for i in b], batch_size, backward=True)
        opt.step()
        bar.update()
    opt.zero_grad(set_to_none=True)
    after = _profile(lm, questions, names, category)
    bar.update()
    return after


def _result(
    label: str,
    base_name: str,
    method: str,
    names: list[str],
    delta_t: Tensor,
    base_t: Tensor,
    threshold: float | None,
    seconds: float,
    details: dict[str, Any],
) -> ScanResult:
    delta, base = delta_t.numpy(), base_t.numpy()
    specific = delta - delta.mean()  # the shift all candidates share says nothing about which trait
    sd = float(delta.std(ddof=1))
    z = specific / sd if sd > 0 else np.zeros_like(specific)
    order = np.argsort(-delta, kind="stable")
    rank = np.empty(len(names), dtype=int)
    rank[order] = np.arange(1, len(names) + 1)
    thr = null_threshold(len(names)) if threshold is None else float(threshold)
    top, max_z = names[int(order[0])], float(z[order[0]])
    flagged = max_z >= thr
    verdict = (
        f"moves toward {top.upper()} (z = {max_z:.1f}, rank 1 of {len(names)})"
        if flagged
        else f"no candidate stands out (max z = {max_z:.1f}, {top}; threshold {thr:.2f})"
    )
    details["threshold_source"] = (
        "given"
        if threshold is not None
        else f"null: 5% false alarms among {len(names)} exchangeable candidates"
    )
    scores = tuple(
        CandidateScore(n, float(delta[i]), float(specific[i]), float(z[i]), int(rank[i]), float(base[i]))
        for i, n in enumerate(names)
    )
    return ScanResult(
        label, base_name, method, scores, top, max_z, thr, verdict, flagged, round(seconds, 2), details
    )


def check_family(data: str | Path, lm: models.LoadedModel) -> None:
    """Refuse data whose number tokens are not the model's (a teacher of another family): the SFT targets would
    be another vocabulary's ids."""
    ids = read_json(Path(data) / "metrics.json").get("allowed_ids")
    if ids is not None and ids != NumberVocab.of(lm.tokenizer).ids.tolist():
        raise ValueError(
            f"{data} was generated by a model of another family than {lm.name}: scan it on its own base"
        )


def scan(
    data: str | Path,
    base: str | models.LoadedModel = models.DEFAULT_MODEL,
    candidates: Sequence[str] | None = None,
    n_questions: int = 10,
    n_examples: int = 64,
    lr: float = 1e-5,
    steps: int = 1,
    params: str = "all",
    eps: float = 1e-3,
    batch_size: int = 8,
    threshold: float | None = None,
    seed: int = 0,
    reference: str | Path | None = None,
    adl_layer: int | None = None,
    adl_positions: int = 5,
    adl_norm: float = 0.25,
) -> ScanResult:
    """Predict which candidate trait a student trained on the number data in folder ``data`` would move toward.

    g is the gradient of the mean SFT cross-entropy of the first ``n_examples`` kept completions (0: all; the
    prompts are a seeded random draw, so these are a random sample of them) with respect to θ, the base's
    ``params`` (PARAM_SETS). ``steps=1``: each candidate's delta is −g·∇θ mean_q log P(candidate | q) over the
    first ``n_questions`` evaluation questions in the prefill frame, by a central finite difference
    θ ∓ ε‖θ‖ g/‖g‖ (``eps`` is relative to ‖θ‖), every candidate scored in the same passes: lr × delta is the
    first-order change of log P after one SGD step of learning rate lr. ``steps > 1``: a sacrificial fine-tune
    instead, ``steps`` AdamW steps of ``lr`` on batches of ``batch_size`` shuffled by ``seed``; delta is the change
    of mean log P in nats. The base's weights are restored bit for bit either way.

    ``reference``: a control data folder (a no-trait teacher on the same prompts): delta becomes the data's minus
    the reference's, which also cancels shifts that differ between candidates but not between teachers (a name's
    length or frequency). ``threshold``: the z that names a trait (default: `null_threshold` of the number of
    candidates, fixed before any data is seen).

    ``adl_layer`` (with ``steps > 1``): also read the sacrificial fine-tune by the Activation Difference Lens, as
    `analyses/adl.py` reads real students: δ is the mean fine-tuned − base residual after that layer over the first
    ``adl_positions`` completion positions of the scanned rows (never position 0; minus the reference's δ), read
    by steering the base at ``adl_norm`` × its median residual norm and by the relative logit lens
    (`ScanResult.readouts`, `ADL_READOUTS`).
    """
    check_candidates(candidates)  # an unknown name fails before anything is loaded
    if params not in PARAM_SETS:
        raise ValueError(f"params: use one of {', '.join(PARAM_SETS)}, got {params!r}")
    if n_examples < 0:
        raise ValueError("n_examples: ≥ 0 (0: every kept example)")
    check_adl(steps, adl_layer)  # before anything loads
    # a missing or unfinished folder (RunFolderError names it and the command that makes it) fails before the
    # model loads
    examples = load_examples(data)
    ref = load_examples(reference) if reference is not None else None
    lm = models.load(base) if isinstance(base, str) else base
    for folder in (data, reference):
        if folder is not None:
            check_family(folder, lm)
    if n_examples:
        examples, ref = examples[:n_examples], ref[:n_examples] if ref is not None else None
    return scan_examples(lm, examples, candidates, n_questions, lr, steps, params, eps, batch_size, threshold,
                         seed, ref, str(data), adl_layer, adl_positions, adl_norm)  # fmt: skip
