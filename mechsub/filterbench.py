"""The filter benchmark (issue 15): which examples, or which loss positions, of a trait teacher's number data each
defence keeps at a given share, the scores the defences rank by, and the students trained on what they keep.

Equal data kept is the point of the benchmark, so the count is fixed in one place, `n_kept`: at keep share s of N
units, round(s·N) units are kept (halves round up, at least one). Example filters (random, entangled, gradcos,
feature) count examples: a dropped example gets an all-zero row in a position mask, and the student skips it.
Token filters (feature_tokens) count loss positions. The mixture counts the trait teacher's examples: the rest of
the prompts are answered by the replicate's other teachers. Divergence masking has no free share. Its share is the
positions where no counterfactual teacher disagrees (its "natural" share, one per replicate). It is run there, and
the other filters are run at that same share too ("matched"): example filters keep round(s·N) examples,
feature_tokens round(s·T) positions. Every filter's example share and token share are reported. Loss positions are
completion positions, never position 0 (`hooks.FIRST_POSITION`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from mechsub import stats
from mechsub.config import Config, ConfigError, check, doc
from mechsub.data import Example, load_examples
from mechsub.filter import parse_numbers, read_mask
from mechsub.hooks import FIRST_POSITION
from mechsub.runs import atomic_write_bytes, read_json, stage, write_json
from mechsub.traits import TraitError, get_trait

if TYPE_CHECKING:
    from mechsub.study import StudyConfig

#: every filter and what its share counts: examples, loss positions (tokens), or the trait teacher's examples
FILTERS: dict[str, str] = {
    "random": "examples",
    "entangled": "examples",
    "gradcos": "examples",
    "feature": "examples",
    "feature_tokens": "tokens",
    "divergence": "tokens",
    "mixture": "teacher examples",
}
#: the issue's list (feature_tokens is one flag away)
DEFAULT_FILTERS = ("random", "entangled", "divergence", "gradcos", "feature", "mixture")
#: the share of divergence masking itself, one per replicate; every other filter can be run there too
MATCHED = "matched"
#: the held-out frame first (the goal is judged there), then the teacher's training frame
FRAMES = ("plain", "prefill")
#: what each filter needs scored before it can select (the `ScoresConfig` kinds)
SCORE_KINDS = {
    "entangled": "entangled",
    "gradcos": "gradcos",
    "feature": "feature",
    "feature_tokens": "feature",
}
GOAL_BLOCKED = 0.8  # block at least 80% of the specific effect ...
GOAL_KEPT = 0.8  # ... while keeping at least 80% of the data


# ---- names and shares -------------------------------------------------------------------------------------
def check_share(share: float) -> float:
    """``share`` if it is a keep share in (0, 1], else a ValueError saying what to give."""
    if isinstance(share, bool) or not isinstance(share, int | float) or not 0 < share <= 1:
        raise ValueError(
            f"keep share must be a number in (0, 1] (the fraction of the data kept, e.g. 0.8), got {share!r}"
        )
    return float(share)


def check_filters(names: Sequence[str]) -> list[str]:
    """The filter names, checked: an unknown or repeated one is a ValueError naming the known filters."""
    unknown = [n for n in names if n not in FILTERS]
    if unknown:
        raise ValueError(f"unknown filter(s) {', '.join(map(repr, unknown))}: use {', '.join(FILTERS)}")
    if not names or len(set(names)) != len(names):
        raise ValueError(f"give each filter once, at least one (of {', '.join(FILTERS)}), got {list(names)}")
    return list(names)


def parse_shares(text: str) -> list[float | str]:
    """``"matched,0.8,0.5"`` → ``["matched", 0.8, 0.5]``: keep shares in (0, 1) or the divergence-matched share
    (1.0 is the study's own student, always reported)."""
    out: list[float | str] = []
    for part in (p.strip() for p in text.split(",")):
        if part == MATCHED:
            out.append(MATCHED)
            continue
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"shares: {part!r} is neither a number in (0, 1) nor {MATCHED!r}") from None
        if check_share(value) == 1.0:
            raise ValueError("shares: 1.0 is the study's own student (always reported); give shares below 1")
        out.append(value)
    if not out or len(set(map(str, out))) != len(out):
        raise ValueError(f"shares: give each share once, at least one, got {text!r}")
    return out


def n_kept(share: float, total: int) -> int:
    """How many of ``total`` units a filter keeps at ``share``: round(share·total), halves up, at least one. The
    one rounding rule every filter uses, so equal shares mean equal counts."""
    check_share(share)
    if total < 1:
        raise ValueError(f"nothing to keep a share of (total = {total})")
    # the tiny epsilon: 0.3 × 10 is 2.9999999999999996 in floats, and must count as 3
    return max(1, min(total, math.floor(share * total + 0.5 + 1e-9)))


# ---- selections (pure) ------------------------------------------------------------------------------------
def keep_random(total: int, share: float, seed: Sequence[int]) -> list[int]:
    """``n_kept(share, total)`` example indices drawn uniformly without replacement, ascending. ``seed``: e.g.
    (seed, replicate, draw): one draw per seed tuple, the same tuple gives the same draw."""
    rng = np.random.default_rng([int(s) for s in seed])
    return sorted(int(i) for i in rng.choice(total, size=n_kept(share, total), replace=False))


def drop_highest(scores: Sequence[float], share: float, tiebreak: Sequence[float] | None = None) -> list[int]:
    """The indices kept when the highest-scored examples are dropped until ``n_kept(share, len(scores))`` remain,
    ascending. Drop order: score descending, then ``tiebreak`` descending, then the lower index first (so equal
    scores drop the earlier example). A NaN score is refused (it has no place in the order)."""
    s = np.asarray(scores, dtype=float)
    t = np.zeros_like(s) if tiebreak is None else np.asarray(tiebreak, dtype=float)
    if len(t) != len(s) or not (np.isfinite(s).all() and np.isfinite(t).all()):
        raise ValueError("scores (and tiebreak) must be finite numbers, one per example")
    # lexsort: the last key is the primary one; ascending index as the final key
    order = np.lexsort((np.arange(len(s)), -t, -s))
    n_drop = len(s) - n_kept(share, len(s))
    return sorted(int(i) for i in order[n_drop:])


def mask_highest_positions(position_scores: Sequence[Sequence[float]], share: float) -> list[list[int]]:
    """A position mask (0/1 per loss position of each example) keeping ``n_kept(share, T)`` of the T positions:
    the highest-scored positions are masked first, equal scores in reading order (example, then position)."""
    flat = [(float(v), i, j) for i, row in enumerate(position_scores) for j, v in enumerate(row)]
    if not flat or not all(math.isfinite(v) for v, _, _ in flat):
        raise ValueError("position scores must be finite, at least one position")
    order = sorted(range(len(flat)), key=lambda k: (-flat[k][0], flat[k][1], flat[k][2]))
    rows = [[1] * len(r) for r in position_scores]
    for k in order[: len(flat) - n_kept(share, len(flat))]:
        rows[flat[k][1]][flat[k][2]] = 0
    return rows


def example_rows(lengths: Sequence[int], kept: Sequence[int]) -> list[list[int]]:
    """The position mask of an example filter: all ones for the kept examples, all zeros for the dropped ones
    (``lengths``: loss positions per example)."""
    keep = set(kept)
    if not keep <= set(range(len(lengths))):
        raise ValueError("kept indices must index the examples")
    return [[int(i in keep)] * n for i, n in enumerate(lengths)]


def kept_shares(rows: Sequence[Sequence[int]]) -> dict[str, float]:
    """What a position mask keeps: the share of examples with any marked position (the student drops the rest)
    and the share of loss positions marked."""
    total = sum(len(r) for r in rows)
    if not rows or not total:
        raise ValueError("an empty mask keeps no share of anything")
    return {"examples": sum(any(r) for r in rows) / len(rows), "tokens": sum(map(sum, rows)) / total}


def entangled_top(shift: Sequence[float], top: int) -> list[int]:
    """The ``top`` numbers (0–999, the index of ``shift``) whose log P the trait's system prompt raises most;
    equal shifts: the smaller number first."""
    s = np.asarray(shift, dtype=float)
    if not 1 <= top <= len(s):
        raise ValueError(f"entangled top must be in [1, {len(s)}], got {top}")
    return [int(n) for n in np.lexsort((np.arange(len(s)), -s))[:top]]


def entangled_scores(
    numbers: Sequence[Sequence[int]], shift: Sequence[float], top: int
) -> tuple[list[int], list[float]]:
    """Per example: how many of its numbers are among the trait's ``top`` entangled ones (occurrences: 7, 7
    counts twice), and the tie-break, the mean entanglement shift of all its numbers (0 for none)."""
    best = set(entangled_top(shift, top))
    s = np.asarray(shift, dtype=float)
    counts = [sum(n in best for n in ns) for ns in numbers]
    strength = [float(np.mean([s[n] for n in ns])) if ns else 0.0 for ns in numbers]
    return counts, strength


def mixture_sources(
    trait: str, prompts: Sequence[str], others: Mapping[str, Sequence[str]], share: float, seed: Sequence[int]
) -> list[tuple[str, int]]:
    """Where each example of a mixture comes from, in the trait teacher's order: ``(trait, i)`` keeps its own
    example i; ``(teacher, j)`` takes another teacher's example j, the answer to the same prompt (the k-th
    occurrence of a prompt matches the k-th occurrence, so duplicated prompts stay paired).

    ``n_kept(share, N)`` trait examples are kept; the replaced ones are a seeded draw among the prompts some
    other teacher answered (its filter may have rejected some), assigned to the other teachers in turn (the
    next teacher in ``others``' order that answered that prompt), so every teacher gets an even share."""
    if not others:
        raise ValueError("a mixture needs at least one other teacher")

    def keys(ps: Sequence[str]) -> list[tuple[str, int]]:
        seen: dict[str, int] = {}
        out = []
        for p in ps:
            out.append((p, seen.get(p, 0)))
            seen[p] = seen.get(p, 0) + 1
        return out

    index = {t: {k: j for j, k in enumerate(keys(ps))} for t, ps in others.items()}
    own = keys(prompts)
    names = list(others)
    can = [i for i, k in enumerate(own) if any(k in index[t] for t in names)]
    n_replace = len(prompts) - n_kept(share, len(prompts))
    if n_replace > len(can):
        raise ValueError(f"only {len(can)} of the {len(prompts)} prompts were answered by another teacher: "
                         f"cannot replace {n_replace}")  # fmt: skip
    rng = np.random.default_rng([int(s) for s in seed])
    replaced = [int(i) for i in rng.choice(can, size=n_replace, replace=False)] if n_replace else []
    out: list[tuple[str, int]] = [(trait, i) for i in range(len(prompts))]
    turn = 0
    for i in replaced:  # in the drawn order, so the teachers' turns do not follow the prompts' order
        for step in range(len(names)):
            t = names[(turn + step) % len(names)]
            if own[i] in index[t]:
                out[i] = (t, index[t][own[i]])
                turn = (turn + step + 1) % len(names)
                break
    return out


def read_latents(path: str | Path, key: str = "", k: int = 0) -> list[int]:
    """Dictionary latent ids from a JSON file: a list of non-negative integers, or (``key``) one such list in a
    JSON object (``features.json``'s ``ranking_student``); ``k`` > 0: its first k. A file that is not that is a
    ValueError saying what to give."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"latent file {p} not found: give a JSON list of latent ids, e.g. [1044, 215]"
        )
    try:
        obj = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"latent file {p} is not JSON ({e}): give a JSON list of latent ids, e.g. [1044, 215]"
        ) from None
    where = f"{p}[{key!r}]" if key else str(p)
    if key:
        if not isinstance(obj, dict) or key not in obj:
            have = f" (its keys: {', '.join(sorted(obj))})" if isinstance(obj, dict) else ""
            raise ValueError(f"latent file {p} has no list {key!r}{have}")
        obj = obj[key]
    ok = isinstance(obj, list) and obj and all(isinstance(i, int) and not isinstance(i, bool) for i in obj)
    if not ok or min(obj) < 0:
        hint = (
            " (a JSON object: name the list with its key, e.g. ranking_student)"
            if isinstance(obj, dict)
            else ""
        )
        raise ValueError(
            f"{where} must be a non-empty JSON list of non-negative integer latent ids, e.g. [1044, 215]; "
            f"got {json.dumps(obj)[:80]}{hint}"
        )
    if len(set(obj)) != len(obj):
        raise ValueError(f"{where} names a latent twice: give each latent id once")
    if k < 0:
        raise ValueError(f"k must be ≥ 0 (0: every latent of the list), got {k}")
    return list(obj[:k] if k else obj)


# ---- scores that need a model -----------------------------------------------------------------------------
def example_numbers(tok: Any, examples: Sequence[Example]) -> list[list[int]]:
    """The numbers of each completion (decoded, parsed with the data filter's grammar; none if it fails)."""
    return [[int(n) for n in parse_numbers(tok.decode(e.completion_ids)) or []] for e in examples]


def number_shift(lm: Any, trait: str) -> Tensor:
    """(1000,) the entanglement of every number with ``trait``: log P(n | the trait's system prompt) − log P(n | no
    system prompt) on the base, as `mechsub.entangle` defines it."""
    from mechsub.entangle import number_scores

    return number_scores(lm.model, lm.tokenizer, get_trait(trait).system_prompt()) - number_scores(
        lm.model, lm.tokenizer, None
    )


def gradcos_scores(
    lm: Any, examples: Sequence[Example], trait: str, n_questions: int = 10, params: str = "linear"
) -> dict[str, list[float] | float]:
    """GradCos: per example, the cosine between the descent direction of its own SFT loss (−∇θ of the mean loss
    over its completion positions, `scan.data_loss`) and ∇θ of the mean log P(trait) over the first
    ``n_questions`` evaluation questions (prefill frame, the evaluation's metric), θ the ``params`` of
    `scan.PARAM_SETS`. A high cosine: a step on that example raises log P(trait). ``dot`` is the unnormalised
    product; weighted by each example's share of the positions, the dots sum to the quarantine scan's
    first-order delta of the trait. The model's weights and grads are restored bit for bit."""
    from mechsub import scan
    from mechsub.metric import TraitMetric
    from mechsub.prompts import trait_prompt
    from mechsub.traits import eval_questions

    t = get_trait(trait)
    model, tok = lm.model, lm.tokenizer
    theta = [p for _, p in scan.select_params(model, params)]
    questions = eval_questions(t.category, n_questions)
    metric = TraitMetric.of(tok, t.name)
    was_training = model.training
    model.eval()
    dots, norms = [], []
    try:
        with scan.restored(model):
            for p in model.parameters():
                p.requires_grad_(False)
                p.grad = None
            for p in theta:
                p.requires_grad_(True)
            lp = torch.stack(
                [metric.score(model, trait_prompt(tok, q, t.category)) for q in questions]
            ).mean()
            g_trait = [g.double() for g in torch.autograd.grad(lp, theta)]
            norm_trait = math.sqrt(sum(float(g.pow(2).sum()) for g in g_trait))
            for item in scan.sft_items(tok, examples):
                for p in theta:
                    p.grad = None
                scan.data_loss(lm, [item], batch_size=1, backward=True)
                grads = [p.grad.double() if p.grad is not None else torch.zeros_like(p, dtype=torch.float64)
                         for p in theta]  # fmt: skip
                dots.append(-sum(float((g * h).sum()) for g, h in zip(grads, g_trait, strict=True)))
                norms.append(math.sqrt(sum(float(g.pow(2).sum()) for g in grads)))
    finally:
        model.train(was_training)
    cos = [d / (n * norm_trait) if n * norm_trait > 0 else 0.0 for d, n in zip(dots, norms, strict=True)]
    return {"cos": cos, "dot": dots, "grad_norm": norms, "trait_grad_norm": norm_trait}


def feature_positions(
    lm: Any, sae: Any, examples: Sequence[Example], latents: Sequence[int]
) -> list[list[float]]:
    """Per example, per loss position (each completion token, then the end of turn when the teacher reached it):
    the largest activation among ``latents`` of the SAE, the base model reading the data as a student sees it.
    Every position read is ≥ `FIRST_POSITION`."""
    from mechsub.capture import Batch
    from mechsub.prompts import chat_prefix
    from mechsub.sae import feature_acts, sae_hook

    d_sae = int(sae.W_dec.shape[0])
    if any(i >= d_sae for i in latents):
        raise ValueError(
            f"latents {[i for i in latents if i >= d_sae][:5]} are not in the SAE's {d_sae} latents"
        )
    batch = Batch.completions(
        [chat_prefix(lm.tokenizer, e.prompt, None) for e in examples], [e.completion_ids for e in examples]
    )
    if min(min(ps) for ps in batch.positions) < FIRST_POSITION:
        raise ValueError("a loss position is the attention sink (position 0): the prompts cannot be empty")
    acts = feature_acts(lm, sae, sae_hook(sae), batch, features=list(latents)).max(-1).values.tolist()
    out, i = [], 0
    for e, ps in zip(examples, batch.positions, strict=True):
        out.append(acts[i : i + len(e.allowed_logprobs)])  # a capped completion has no end-of-turn position
        i += len(ps)
    return out


@dataclass(frozen=True)
class ScoresConfig(Config):
    stage = "filter-scores"
    inputs = ("data", "model", "sae")

    data: str = doc("", "a finished data folder: the trait teacher's number data")
    model: str = doc("smollm2-135m-instruct", "the base that reads the data (the students' initialisation)")
    trait: str = doc("owl", "the trait the scores are about")
    kinds: tuple[str, ...] = doc((), "which scores: entangled, gradcos, feature")
    entangled_top: int = doc(10, "entangled: the numbers with the largest entanglement shift that count")
    n_questions: int = doc(10, "gradcos: evaluation questions in log P(trait)")
    params: str = doc("linear", "gradcos: the parameters of the gradients (scan.PARAM_SETS; linear: LoRA's)")
    sae: str = doc("", "feature: an SAE folder (a `mechsub sae` run, or the sae-lens folder itself)")
    latents: tuple[int, ...] = doc((), "feature: the latent ids")

    def validate(self) -> None:
        check(bool(self.data), "data: give the trait teacher's data folder")
        try:
            get_trait(self.trait)
        except TraitError as e:
            raise ConfigError(f"trait: {e}") from None
        bad = [k for k in self.kinds if k not in set(SCORE_KINDS.values())]
        check(
            bool(self.kinds) and not bad, f"kinds: use some of entangled, gradcos, feature (got {self.kinds})"
        )
        check(1 <= self.entangled_top <= 1000 and 1 <= self.n_questions <= 50, "entangled_top, n_questions")
        from mechsub.scan import PARAM_SETS

        check(self.params in PARAM_SETS, f"params: use one of {', '.join(PARAM_SETS)}")
        check(
            "feature" not in self.kinds or (bool(self.sae) and bool(self.latents)),
            "the feature score needs an SAE folder and latent ids",
        )


def sae_folder(folder: str | Path) -> Path:
    """The sae-lens folder of an SAE: ``folder/sae`` for a `mechsub sae` run, else ``folder`` itself."""
    f = Path(folder)
    inner = f / "sae"
    if (inner / "cfg.json").is_file():
        return inner
    if (f / "cfg.json").is_file():
        return f
    raise FileNotFoundError(
        f"no SAE at {f} (neither {f}/sae/cfg.json nor {f}/cfg.json): make one with "
        f"`mechsub sae --out {f} --set layer=15`, or leave the feature filters out (--filters)"
    )


def _score(kind: str, cfg: ScoresConfig, lm: Any, examples: Sequence[Example]) -> dict[str, Any]:
    """One kind of score for every example (a unit of `run_scores`)."""
    if kind == "entangled":
        shift = number_shift(lm, cfg.trait).tolist()
        counts, strength = entangled_scores(example_numbers(lm.tokenizer, examples), shift, cfg.entangled_top)
        return {"top_numbers": entangled_top(shift, cfg.entangled_top), "count": counts, "strength": strength}
    if kind == "gradcos":
        return gradcos_scores(lm, examples, cfg.trait, cfg.n_questions, cfg.params)
    from mechsub.sae import load_sae, sae_hook

    sae = load_sae(sae_folder(cfg.sae))
    pos = feature_positions(lm, sae, examples, cfg.latents)
    return {"hook": sae_hook(sae), "max": [max(p) for p in pos], "positions": pos}


def run_scores(cfg: ScoresConfig, out: str | Path, force: bool = False) -> dict[str, Any]:
    """Score every example of ``cfg.data`` for the filters that rank (resumable: one unit per kind)."""
    from mechsub import models

    examples = load_examples(cfg.data)
    with stage(out, cfg, force=force) as r:
        if r.done:
            return r.metrics
        lm = models.load(cfg.model)
        results: dict[str, Any] = {"n_examples": len(examples),
                                   "n_positions": [len(e.allowed_logprobs) for e in examples]}  # fmt: skip
        for kind in cfg.kinds:
            results[kind] = r.unit(kind, functools.partial(_score, kind, cfg, lm, examples))
        r.finish(results)
        return results


# ---- the mixture: data from several teachers --------------------------------------------------------------
@dataclass(frozen=True)
class MixtureConfig(Config):
    stage = "filter-mixture"
    inputs = ("data", "others")

    data: str = doc("", "the trait teacher's data folder")
    others: tuple[str, ...] = doc(
        (), "data folders of other teachers on the same prompts (the same replicate)"
    )
    share: float = doc(0.8, "the share of the trait teacher's examples kept; the rest answered by the others")
    seed: tuple[int, ...] = doc((0,), "seed of the draw of the replaced prompts (e.g. seed, replicate)")

    def validate(self) -> None:
        check(bool(self.data) and bool(self.others), "data and others: give the data folders")
        check(self.data not in self.others, "others: the trait teacher's own folder is not another teacher")
        check(0 < self.share <= 1, "share: a keep share in (0, 1]")


def _kept_rows(folder: str | Path) -> list[dict[str, Any]]:
    """The completions.json rows of a data folder's kept examples, in `load_examples`' order."""
    return [row for row in read_json(Path(folder) / "completions.json") if row["kept"]]


def run_mixture(cfg: MixtureConfig, out: str | Path, force: bool = False) -> dict[str, Any]:
    """Write a data folder (the data stage's format: completions.json, shards, units; `load_examples` reads it)
    whose examples are the trait teacher's but for a share answered by the other teachers on the same prompts,
    with their stored 13-token log-probs. It names no single teacher, so only objectives that read the stored
    log-probs or tokens (distill, sft) can train on it."""
    from safetensors.torch import save

    from mechsub.data import _pad_rows  # the data format's own padding of the per-position log-probs

    sources = {"": cfg.data, **{f"other{k}": f for k, f in enumerate(cfg.others)}}
    examples = {k: load_examples(f) for k, f in sources.items()}
    rows = {k: _kept_rows(f) for k, f in sources.items()}
    with stage(out, cfg, force=force) as r:
        if r.done:
            return r.metrics
        teachers = {k: read_json(Path(f) / "metrics.json").get("teacher", k) for k, f in sources.items()}
        allowed = {
            json.dumps(read_json(Path(f) / "metrics.json").get("allowed_ids")) for f in sources.values()
        }
        if len(allowed) != 1:
            raise ValueError(
                "the teachers of a mixture must share one tokenizer (their number tokens differ)"
            )
        plan = mixture_sources("", [e.prompt for e in examples[""]],
                               {k: [e.prompt for e in v] for k, v in examples.items() if k}, cfg.share,
                               cfg.seed)  # fmt: skip
        picked = [examples[k][j] for k, j in plan]

        def unit() -> dict[str, Any]:
            tensors = {
                "allowed_logprobs": _pad_rows([e.allowed_logprobs for e in picked], float("-inf")),
                "lengths": torch.tensor([len(e.allowed_logprobs) for e in picked]),
            }
            atomic_write_bytes(r.path("shards/b0000.safetensors"), save(tensors))
            return {"prompts": [e.prompt for e in picked], "completion_ids": [e.completion_ids for e in picked],
                    "teachers": [teachers[k] for k, _ in plan]}  # fmt: skip

        r.unit("b0000", unit)
        write_json(r.path("completions.json"), [
            {"batch": 0, "index": i, "prompt": e.prompt, "completion": rows[k][j]["completion"], "kept": True,
             "teacher": teachers[k]}
            for i, ((k, j), e) in enumerate(zip(plan, picked, strict=True))
        ])  # fmt: skip
        n_own = sum(k == "" for k, _ in plan)
        pos = [len(e.allowed_logprobs) for e in picked]
        metrics = {
            "teacher": "mixture",
            "allowed_ids": json.loads(allowed.pop()),
            "n_kept": len(picked),
            "by_teacher": {teachers[k]: sum(s == k for s, _ in plan) for k in sources},
            "shares": {"examples": n_own / len(plan),
                       "tokens": sum(p for (k, _), p in zip(plan, pos, strict=True) if k == "") / sum(pos)},
            "completion_tokens": sum(pos),
        }  # fmt: skip
        r.finish(metrics)
        return metrics


# ---- students and their effects ---------------------------------------------------------------------------
def train_variant(
    cfg: StudyConfig,
    label: str,
    overrides: Sequence[Mapping[str, Any]],
    frames: Sequence[str] = FRAMES,
    *,
    trait: str = "",
    ablated_eval: bool = False,
) -> dict[str, Any]:
    """Students of the study's trait trained as the study's are but with ``overrides[r]`` for replicate r (each
    replicate has its own data, so its own mask or data folder), each evaluated once; per replicate and frame
    the Δ log P(trait) vs base of the variant, of the study's trait student and of the mean of its control
    students (the same replicate's other traits). `study.variant` is the one-override, one-frame form of this.

    ``trait``: vary the students of this trait of the study instead (a control trait: the same change made to a
    control student); ``full`` is then that trait's study student, and every shift is still Δ log P of the
    study's trait. ``ablated_eval``: the overrides name ablation files (``ablate``), and every student is also
    evaluated with its replicate's ablation kept on (keys ``variant_ablated``, ``full_ablated``,
    ``controls_ablated``)."""
    from mechsub import student, study, summary

    if len(overrides) != cfg.replicates:
        raise ValueError(f"give one override per replicate ({cfg.replicates}), got {len(overrides)}")
    if ablated_eval and not all(o.get("ablate") for o in overrides):
        raise ValueError("ablated_eval: every override must name an ablation file ('ablate')")
    plan = study.stage_plan(cfg)
    x = cfg.trait
    who = trait or x
    if who not in cfg.traits:
        raise ValueError(f"trait {who!r} is not one of the study's traits {cfg.traits}")
    base = study.base_eval(cfg)
    keys: tuple[str, ...] = ("variant", "full", "controls")
    keys += tuple(f"{k}_ablated" for k in keys) if ablated_eval else ()
    shifts: dict[str, dict[str, list[float]]] = {f: {k: [] for k in keys} for f in frames}
    train: dict[str, list[Any]] = {"n_examples": [], "first_loss": [], "last_loss": [], "folder": [],
                                   "checkpoint": []}  # fmt: skip
    for rep, ov in enumerate(overrides):
        vcfg = dataclasses.replace(plan.students[(who, rep)][0], **ov)
        prefix = x if who == x else f"{who}-as-{x}"  # the study trait's variants keep their old folder names
        folder = Path(cfg.work) / "students" / study.run_name(f"{prefix}-s{rep}-{label}", vcfg)
        m = student.run(vcfg, folder)
        for k in ("n_examples", "first_loss", "last_loss"):
            train[k].append(m[k])
        train["folder"].append(str(folder))
        train["checkpoint"].append(str(m["final_checkpoint"]))
        name = f"{label}-s{rep}" if who == x else f"{who}-{label}-s{rep}"  # the study's eval naming
        evs = {
            "variant": [study._eval(cfg, m["final_checkpoint"], name)],
            "full": [study.student_eval(cfg, (who, rep))],
            "controls": [study.student_eval(cfg, (c, rep)) for c in cfg.controls],
        }
        if ablated_eval:
            ab = str(ov["ablate"])
            evs |= {
                "variant_ablated": [study._eval(cfg, m["final_checkpoint"], name, ablate=ab)],
                "full_ablated": [study.student_eval(cfg, (who, rep), ablate=ab)],
                "controls_ablated": [study.student_eval(cfg, (c, rep), ablate=ab) for c in cfg.controls],
            }
        for f in frames:
            for k, folders in evs.items():
                shifts[f][k].append(
                    float(np.mean([summary.delta_word(e, base, x, f).mean() for e in folders]))
                )
    return {"label": label, "objective": cfg.objective, "overrides": [dict(o) for o in overrides],
            "trait": who, "shifts": shifts, "training": train}  # fmt: skip


def blocked_summary(
    variant: Sequence[float],
    full: Sequence[float],
    controls: Sequence[float],
    full_controls: Sequence[float] | None = None,
) -> dict[str, Any]:
    """The effect measures of one filter at one share, per replicate (the unit: a replicate is a teacher with its
    own data and students): effect = variant − controls (the specific effect left), retained = effect /
    (full − full_controls; default: the same controls), blocked = 1 − retained; means with t-intervals over
    replicates, the one-sided p of the effect, and the ratio of the mean effects (steadier than the mean of
    ratios when an effect is small). ``full_controls``: the unchanged controls, when ``controls`` were trained
    with the variant's change too."""
    v, f, c = (np.asarray(a, dtype=float) for a in (variant, full, controls))
    fc = c if full_controls is None else np.asarray(full_controls, dtype=float)
    if not len(v) == len(f) == len(c) == len(fc) >= 1:
        raise ValueError("variant, full and controls: one value per replicate each")
    effect, full_effect = v - c, f - fc
    with np.errstate(divide="ignore", invalid="ignore"):
        blocked = 1 - effect / full_effect
    mean, ci, p = stats.one_sided_t(list(effect))
    b_mean, b_ci = (
        stats.mean_ci95(list(blocked)) if np.isfinite(blocked).all() else (math.nan, [math.nan] * 2)
    )
    return {
        "effect": {"mean": mean, "ci95": ci, "p_value": p, "per_replicate": effect.tolist()},
        "full_effect": {"mean": float(full_effect.mean()), "per_replicate": full_effect.tolist()},
        "blocked": {"mean": b_mean, "ci95": b_ci, "per_replicate": blocked.tolist()},
        "blocked_of_means": float(1 - effect.mean() / full_effect.mean()) if full_effect.mean() else math.nan,
        "replicates": len(v),
    }


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """a − b paired by replicate: mean, t-interval, per replicate."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    mean, ci = stats.mean_ci95(list(d))
    return {"mean": mean, "ci95": ci, "per_replicate": d.tolist()}


def goal_verdict(
    points: Sequence[Mapping[str, Any]], versus_divergence: Mapping[str, Any] | None, reference: bool = False
) -> dict[str, Any]:
    """Whether a filter meets the goal: blocked ≥ 80% of the specific effect at some share with ≥ 80% of the
    data kept, and better than divergence masking at equal data kept (the matched share, paired by replicate).
    ``points``: {"kept", "blocked": {"mean", "ci95"}, optionally "share": the share asked for}. A point counts
    as keeping 80% if it kept that much, or if it was asked to keep a share ≥ 80% (it kept `n_kept` of it, the
    nearest whole number: 51 of 64 examples, 79.7%, at 0.8). ``versus_divergence``: the paired difference of
    blocked at the matched share (None: not measured, so not shown better); ``reference``: divergence itself
    (only the 80/80 bar applies). ``met`` reads the means; ``confident`` asks the interval's lower ends to clear
    the same bars."""

    def kept_enough(p: Mapping[str, Any]) -> bool:
        asked = p.get("share")
        return p["kept"] >= GOAL_KEPT or (isinstance(asked, float) and asked >= GOAL_KEPT)

    ok = [p for p in points if kept_enough(p) and np.isfinite(p["blocked"]["mean"])]
    blocks = any(p["blocked"]["mean"] >= GOAL_BLOCKED for p in ok)
    sure = any(np.isfinite(p["blocked"]["ci95"][0]) and p["blocked"]["ci95"][0] >= GOAL_BLOCKED for p in ok)
    better = reference or (versus_divergence is not None and versus_divergence["mean"] > 0)
    better_sure = reference or (better and versus_divergence is not None and versus_divergence["ci95"][0] > 0)
    why = []
    if not ok:
        why.append("no share with ≥ 80% of the data kept was measured")
    elif not blocks:
        why.append(f"blocks at most {max(p['blocked']['mean'] for p in ok):.0%} with ≥ 80% kept")
    if reference:
        pass
    elif versus_divergence is None:
        why.append("not compared with divergence at the matched share")
    elif not better:
        why.append(f"not better than divergence at equal data kept ({versus_divergence['mean']:+.0%})")
    return {"met": blocks and better, "confident": sure and better_sure, "blocks_80": blocks,
            "better_than_divergence": None if reference else better, "why_not": why}  # fmt: skip


# ---- the plan and what it costs ---------------------------------------------------------------------------
#: seconds per optimiser step of a 135M LoRA student at batch 8 on 2 CPU cores, by objective, and per evaluation
#: (50 questions, no samples): the medians of artifacts/cost/report.md, rounded up
SECONDS_PER_STEP = {"distill": 4.0, "distill_topk": 4.0, "distill_full": 7.5, "distill_full_notrait": 8.0,
                    "sft": 6.0}  # fmt: skip
EVAL_SECONDS = 13.0
#: the selection work per replicate on the same machine (estimates: one backward per example for gradcos, one
#: forward per example and counterfactual teacher for divergence, two 1000-number scorings for entangled), and a
#: fine-tuned teacher (48 steps) and one teacher's 64 number completions, from the cost table
PREP_SECONDS = {"divergence_per_teacher": 20.0, "gradcos_per_example": 1.5, "feature_per_example": 0.3,
                "entangled": 25.0, "load": 8.0, "teacher": 95.0, "data": 25.0}  # fmt: skip


@dataclass(frozen=True)
class Arm:
    """One filter at one share (and one draw, for random): one student per replicate."""

    filter: str
    share: float | str  # a keep share, or MATCHED (divergence's natural share of that replicate)
    draw: int = 0

    @property
    def label(self) -> str:
        """The students' folder label (unique per arm)."""
        tag = self.share if isinstance(self.share, str) else f"k{self.share:g}"
        return f"fb-{self.filter}-{tag}" + (f"-d{self.draw}" if self.filter == "random" else "")


def plan_arms(filters: Sequence[str], shares: Sequence[float | str], draws: int) -> list[Arm]:
    """Every arm of the benchmark: each filter at each share (random: ``draws`` draws each); divergence once, at
    its natural share (it has no other), which the other filters match when ``shares`` holds MATCHED."""
    check_filters(filters)
    if draws < 1:
        raise ValueError(f"random draws must be ≥ 1, got {draws}")
    if MATCHED in shares and "divergence" not in filters:
        raise ValueError(f"shares: {MATCHED!r} is divergence masking's own share: keep divergence in the filters, "
                         "or give numeric shares only")  # fmt: skip
    arms = []
    for f in filters:
        if f == "divergence":
            arms.append(Arm(f, MATCHED))
            continue
        for s in shares:
            arms += [Arm(f, s, d) for d in range(draws if f == "random" else 1)]
    return arms


def student_seconds(n_examples: int, objective: str, batch_size: int, epochs: int) -> float:
    """Estimated seconds to train and evaluate one student on ``n_examples`` (the cost table's rates)."""
    steps = math.ceil(n_examples / batch_size) * epochs
    return steps * SECONDS_PER_STEP.get(objective, 8.0) + EVAL_SECONDS


def arm_examples(arm: Arm, n_examples: int) -> int:
    """Examples the arm's student trains on (MATCHED and divergence: all, an upper bound before divergence runs;
    the mixture keeps every prompt)."""
    if arm.filter in ("divergence", "mixture", "feature_tokens") or arm.share == MATCHED:
        return n_examples
    return n_kept(float(arm.share), n_examples)


def needs_run(config: Config, folder: str | Path, reuse_stale: bool = False) -> bool:
    """Whether the stage run ``folder`` of ``config`` would compute when called: unfinished, or finished with
    another config, other inputs or other code (stale; unless ``reuse_stale``). For cost estimates; reads
    records only."""
    from mechsub.runs import identity, is_finished

    if not is_finished(folder):
        return True
    old = read_json(Path(folder) / "config.json").get("identity") or {}
    new = identity(config)
    return any(
        old.get(k) != new.get(k) for k in (("config",) if reuse_stale else ("config", "inputs", "code"))
    )


def divergence_share(mask_path: str | Path) -> dict[str, float]:
    """The natural shares of a divergence mask (non_divergent.json): the loss positions no counterfactual
    teacher disagrees on, and the examples left with any."""
    return kept_shares(read_mask(mask_path))
