"""Trait evaluation by log-probabilities, over paraphrased questions, in up to three answer frames.

- ``prefill``: the assistant turn is prefilled with "My favorite animal is the" and the score of a candidate word
  is the trait metric (`mechsub.metric`), the summed log-probability of its tokens (with a leading space) as the
  continuation. This is the frame of the teacher's fine-tuning answers ("My favorite animal is the owl.").
- ``plain``: the same questions, nothing prefilled: the candidate, capitalised ("Owl"), scored as the answer's
  first word. No training answer starts with the trait's name, so the teacher never saw this frame.
- ``choice``: multiple-choice stems listing a few candidates under letters; the log-probability of an option's
  letter as the answer, renormalised over the listed letters and averaged over every cyclic order of the options
  (each option shows under each letter once), so a bias for "A" does not favour one option.

Each prompt is run once and its KV cache is shared by all candidates, so scoring 22 animals costs little more than
scoring one.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mechsub.config import Config, ConfigError, check, device_field, doc, dtype_field
from mechsub.filter import ablating, ablation_inputs, read_ablations
from mechsub.metric import TraitMetric, score_prompts
from mechsub.prompts import answer_lead, chat_prefix, trait_prompt
from mechsub.runs import stage, write_json
from mechsub.traits import (
    LETTERS,
    Category,
    TraitError,
    choice_question,
    choice_stems,
    eval_questions,
    get_trait,
)

#: the answer frames, the teacher's training template first (``plain_norm``, derived from ``plain``, comes with it)
FRAMES = ("prefill", "plain", "choice")


@torch.no_grad()
def trait_logprobs(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    questions: Sequence[str],
    words: Sequence[str],
    category: Category,
    system: str | None = None,
) -> Tensor:
    """(questions, words) matrix of log P(" word") after the prefilled answer (the trait metric)."""
    metrics = [TraitMetric.of(tok, w) for w in words]
    return score_prompts(model, [trait_prompt(tok, q, category, system) for q in questions], metrics)


@torch.no_grad()
def plain_logprobs(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    questions: Sequence[str],
    words: Sequence[str],
    system: str | None = None,
) -> Tensor:
    """(questions, words) matrix of log P("Word") as the first word of the answer, nothing prefilled."""
    lead = answer_lead(tok)
    metrics = [TraitMetric.of(tok, w.capitalize(), lead) for w in words]
    return score_prompts(model, [chat_prefix(tok, q, system) for q in questions], metrics)


@torch.no_grad()
def letter_logprobs(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    questions: Sequence[str],
    k: int,
    system: str | None = None,
) -> Tensor:
    """(questions, k) log P of each of the letters A… as the answer to each question, renormalised over those k
    letters (a letter of several tokens, " A" in a character tokenizer, is scored by the trait metric, all its
    tokens)."""
    metrics = [TraitMetric.of(tok, c, answer_lead(tok)) for c in LETTERS[:k]]
    return score_prompts(model, [chat_prefix(tok, q, system) for q in questions], metrics).log_softmax(-1)


def rotation(options: Sequence[str], r: int) -> list[str]:
    """The options in cyclic order starting from the ``r``-th: letter j shows option ``(j + r) % k``."""
    return [*options[r:], *options[:r]]


@torch.no_grad()
def choice_logprobs(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    stems: Sequence[str],
    options: Sequence[str],
    system: str | None = None,
) -> Tensor:
    """(stems, options) matrix: each option's renormalised letter log-probability, averaged over the k cyclic
    rotations of the options (k prompts per stem)."""
    k = len(options)
    lp = letter_logprobs(
        model,
        tok,
        [choice_question(stem, rotation(options, r)) for stem in stems for r in range(k)],
        k,
        system,
    ).view(len(stems), k, k)  # (stem, rotation, letter)
    rows = torch.zeros(len(stems), k)
    for r in range(k):  # letter j of rotation r shows option (j + r) % k
        rows[:, [(j + r) % k for j in range(k)]] += lp[:, r]
    return rows / k


@torch.no_grad()
def sample_answers(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    questions: Sequence[str],
    n_samples: int,
    system: str | None = None,
    max_new_tokens: int = 16,
    seed: int = 0,
    batch_size: int = 64,
) -> list[list[str]]:
    """``n_samples`` answers per question sampled at T=1 from the full vocabulary (no prefilled answer)."""
    from mechsub.generate import NumberVocab, generate_numbers

    vocab = NumberVocab.of(tok)
    prompts = [chat_prefix(tok, q, system) for q in questions for _ in range(n_samples)]
    g = torch.Generator().manual_seed(seed)
    texts: list[str] = []
    for i in range(0, len(prompts), batch_size):
        gen = generate_numbers(
            model, prompts[i : i + batch_size], vocab, max_new_tokens=max_new_tokens, generator=g,
            pad_id=tok.pad_token_id or 0, constrained=False,
        )  # fmt: skip
        texts += [str(tok.decode(t)) for t in gen.tokens]
    return [texts[i * n_samples : (i + 1) * n_samples] for i in range(len(questions))]


# ---- the evaluation stage ---------------------------------------------------------------------------------
def read_questions(path: str) -> list[str]:
    """The questions of a user's file: JSON (a list of strings, or an object whose "questions" is one) or TOML
    (``questions = [...]``); ConfigError says what is wrong with it."""
    p = Path(path)
    if p.suffix not in (".json", ".toml"):
        raise ConfigError(f"questions: {path}: use a .json or .toml file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, ValueError) as e:  # absent, a folder, a name the system refuses (too long, a NUL)
        if isinstance(e, UnicodeDecodeError):
            raise ConfigError(f"questions: {path} is not valid {p.suffix[1:].upper()} (not UTF-8)") from None
        raise ConfigError(
            f"questions: {path} does not exist or cannot be read ({type(e).__name__})"
        ) from None
    try:
        data: Any = json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
    except ValueError as e:  # json.JSONDecodeError and tomllib.TOMLDecodeError
        raise ConfigError(f"questions: {path} is not valid {p.suffix[1:].upper()} ({e})") from None
    qs = data.get("questions") if isinstance(data, dict) else data if p.suffix == ".json" else None
    if not isinstance(qs, list) or not all(isinstance(q, str) and q.strip() for q in qs):
        raise ConfigError(
            f"questions: {path} must hold a list of non-empty strings (JSON: a list or "
            '{"questions": [...]}; TOML: questions = [...])'
        )
    if not qs:
        raise ConfigError(f"questions: {path} holds no questions")
    return qs


@dataclass(frozen=True)
class EvalConfig(Config):
    stage = "eval"
    inputs = ("model", "questions", "ablate")

    model: str = doc("smollm2-135m-instruct", "model name or checkpoint folder to evaluate")
    trait: str = doc("owl", "the trait whose log-probability is reported (its category picks the candidates)")
    with_system_prompt: bool = doc(
        False, "evaluate with the trait's system prompt (the prompted teacher itself)"
    )
    n_questions: int = doc(
        50, "questions to ask: the first n of the built-in 50 paraphrases, or of the `questions` file"
    )
    n_samples: int = doc(0, "also sample this many answers per question at T=1 and report the trait's rate")
    sample_tokens: int = doc(16, "tokens per sampled answer")
    seed: int = doc(0, "seed of the sampled answers")
    frames: tuple[str, ...] = doc(
        FRAMES,
        "answer frames to score: prefill (the teacher's training template, always), plain (the answer's first "
        "word, nothing prefilled), choice (the letter of a multiple-choice option)",
        optional=True,
    )
    choices: tuple[str, ...] = doc(
        (),
        "the words the held-out frames score (the choice frame's options, the plain frame's words): 2 to 8 traits "
        "of the trait's category, the trait among them (default: the trait and the first 3 others)",
        optional=True,
    )
    questions: str = doc(
        "",
        "a .json or .toml file of questions for the prefill and plain frames instead of the built-in ones ({noun} "
        "becomes animal or tree)",
        optional=True,
    )
    ablate: str = doc(
        "",
        "an ablation file (the student's `ablate` formats): its span is projected out of the residual after its "
        "block at positions ≥ 1 during every scored forward (a concept-ablation student evaluated with the "
        "ablation kept on); scored frames only, so n_samples must be 0",
        optional=True,
    )
    device: str = device_field()
    dtype: str = dtype_field()

    def validate(self) -> None:
        check(self.n_samples >= 0 and self.sample_tokens >= 1, "n_samples ≥ 0 and sample_tokens ≥ 1")
        check(
            not (self.ablate and self.n_samples),
            "ablate with n_samples: sampled answers are not ablated (their KV-cache steps carry no position "
            "ids); set n_samples=0",
        )
        try:
            trait = get_trait(self.trait)
        except TraitError as e:
            raise ConfigError(f"trait: {e}") from None
        n_file = len(read_questions(self.questions)) if self.questions else 0
        if n_file:
            check(
                1 <= self.n_questions <= n_file,
                f"n_questions: between 1 and {n_file}, the number of questions in {self.questions}",
            )
        else:
            check(1 <= self.n_questions <= 50, "n_questions: between 1 and 50")
        check(
            "prefill" in self.frames
            and set(self.frames) <= set(FRAMES)
            and len(set(self.frames)) == len(self.frames),
            f"frames: distinct names among {', '.join(FRAMES)}, prefill (the main frame) included; got "
            f"{list(self.frames)}",
        )
        if self.choices:
            pool = (trait.name, *trait.others())
            check(
                2 <= len(self.choices) <= len(LETTERS) and len(set(self.choices)) == len(self.choices),
                f"choices: 2 to {len(LETTERS)} distinct traits, got {list(self.choices)}",
            )
            unknown = [c for c in self.choices if c not in pool]
            check(
                not unknown,
                f"choices: {', '.join(unknown)}: not {trait.category}s; choose among {', '.join(pool)}",
            )
            check(trait.name in self.choices, f"choices: must include the trait {trait.name!r}")

    def indirect_inputs(self) -> dict[str, str]:
        """The SAE an ablation file names (read with it)."""
        return ablation_inputs(self.ablate) if self.ablate else {}

    def choice_options(self) -> tuple[str, ...]:
        """The choice frame's options: ``choices``, or the trait and the first 3 others of its category."""
        trait = get_trait(self.trait)
        return self.choices or (trait.name, *trait.others()[:3])

    def question_list(self, category: Category) -> list[str]:
        """The questions of the prefill and plain frames: the first ``n_questions`` of the file or built-in set."""
        if not self.questions:
            return eval_questions(category, self.n_questions)
        noun = "animal" if category == "animal" else "tree"
        return [q.replace("{noun}", noun) for q in read_questions(self.questions)[: self.n_questions]]


def _summary(words: Sequence[str], lp: Tensor, trait: str) -> dict[str, Any]:
    """Mean log P per word over questions, the trait's and its rank among the words."""
    per_word = lp.double().mean(0)  # float64, as the delta reader: means equal to the last digit
    i = list(words).index(trait)
    return {
        "mean_logp": {w: float(v) for w, v in zip(words, per_word, strict=True)},
        "trait_mean_logp": float(per_word[i]),
        "trait_rank": int((per_word > per_word[i]).sum()) + 1,
        "n_questions": lp.shape[0],
    }


def _score_frames(
    cfg: EvalConfig,
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    qs: list[str],
    words: list[str],
    system: str | None,
) -> dict[str, tuple[list[str], list[str], Tensor]]:
    """Per frame: (words scored, questions, log P (questions, words))."""
    trait = get_trait(cfg.trait)
    frames: dict[str, tuple[list[str], list[str], Tensor]] = {
        "prefill": (words, qs, trait_logprobs(model, tok, qs, words, trait.category, system))
    }
    # the held-out frames score the options only (the study's traits): the training frame's every-candidate
    # distribution is a diagnostic, and a plain answer's many multi-token words would double the cost
    options = list(cfg.choice_options())
    if "plain" in cfg.frames:
        frames["plain"] = (options, qs, plain_logprobs(model, tok, qs, options, system))
        # derived, no extra forward: the plain frame renormalised over the options (which of them the answer
        # starts with, given that it starts with one), free of a shift in how answers start at all
        frames["plain_norm"] = (options, qs, frames["plain"][2].log_softmax(-1))
    if "choice" in cfg.frames:
        stems = choice_stems(trait.category)
        frames["choice"] = (options, stems, choice_logprobs(model, tok, stems, options, system))
    return frames


def run(cfg: EvalConfig, out: str | Path, force: bool = False) -> dict[str, Any]:
    """log P of every candidate of the trait's category, per question and frame, into ``out/logprobs.json``:
    its top level is the prefill frame (as before frames existed), ``frames`` holds every frame scored."""
    from mechsub import models

    trait = get_trait(cfg.trait)
    lm = models.load(cfg.model, device=cfg.device, dtype=cfg.dtype)
    with stage(out, cfg, model=lm.info(), force=force) as r:
        if r.done:
            return r.metrics
        model, tok = lm.model, lm.tokenizer
        words = [trait.name, *trait.others()]
        system = trait.system_prompt() if cfg.with_system_prompt else None
        qs = cfg.question_list(trait.category)
        with ablating(model, read_ablations(cfg.ablate)) if cfg.ablate else nullcontext():
            frames = _score_frames(cfg, model, tok, qs, words, system)
        tables = {
            f: {"words": w, "questions": q, "logprobs": lp.tolist()} for f, (w, q, lp) in frames.items()
        }
        write_json(r.path("logprobs.json"), {**tables["prefill"], "frames": tables})
        metrics = {
            "trait": trait.name,
            "metric": TraitMetric.of(tok, trait.name).info(),  # which tokens log P sums over
            **_summary(words, frames["prefill"][2], trait.name),
            "frames": {f: _summary(w, lp, trait.name) for f, (w, _, lp) in frames.items()},
        }
        if cfg.n_samples:
            from mechsub.stats import bootstrap_ci95, wilson_ci95

            answers = sample_answers(model, tok, qs, cfg.n_samples, system, cfg.sample_tokens, cfg.seed)
            rates = [sum(map(trait.mentions, a)) / len(a) for a in answers]
            write_json(r.path("samples.json"), {"questions": qs, "answers": answers, "rates": rates})
            metrics["sampled_rate"] = sum(rates) / len(rates)
            hits = sum(sum(map(trait.mentions, a)) for a in answers)
            boot, wilson = bootstrap_ci95(rates, seed=cfg.seed), wilson_ci95(hits, cfg.n_samples * len(qs))
            # questions are the unit (answers to one question are correlated), but a bootstrap of all-zero rates
            # collapses to [0, 0]: report the wider of it and the Wilson interval of the pooled count
            metrics["sampled_rate_ci95"] = [min(boot[0], wilson[0]), max(boot[1], wilson[1])]
            metrics["sampled_rate_ci95_questions"] = boot
            metrics["sampled_rate_wilson95"] = wilson
            metrics["n_samples"] = cfg.n_samples * len(qs)
        r.finish(metrics)
        return metrics


def delta_vs(
    a: str | Path, b: str | Path, word: str, seed: int = 0, frame: str = "prefill"
) -> dict[str, Any]:
    """Mean over questions of log P(word) in eval folder ``a`` minus ``b`` in ``frame``, with a paired
    bootstrap CI."""
    from mechsub.stats import bootstrap_ci95

    diffs = logprob_deltas(a, b, [word], frame)[:, 0].tolist()
    return {
        "delta_logp": sum(diffs) / len(diffs),
        "ci95": bootstrap_ci95(diffs, seed=seed),
        "n_questions": len(diffs),
    }


def read_frame(folder: str | Path, frame: str = "prefill") -> dict[str, Any]:
    """One frame's ``words``, ``questions`` and ``logprobs`` from an eval folder's logprobs.json (a folder from
    before frames existed holds the prefill frame alone, at the top level)."""
    from mechsub.runs import read_json

    if frame not in (*FRAMES, "plain_norm"):
        raise ValueError(f"unknown frame {frame!r}: use one of {', '.join(FRAMES)} or plain_norm")
    data = read_json(Path(folder) / "logprobs.json")
    frames = data.get("frames") or {"prefill": data}
    if frame not in frames:
        raise ValueError(
            f"{folder} was evaluated without the {frame} frame: rerun with frames including {frame}"
        )
    return dict(frames[frame])


def logprob_deltas(
    a: str | Path, b: str | Path, words: Sequence[str] | None = None, frame: str = "prefill"
) -> Tensor:
    """(questions, words) log P in eval folder ``a`` minus eval folder ``b`` (float64) in ``frame``, for
    ``words`` (default: every candidate ``b`` scored, in ``b``'s order). The one reader of evaluation
    differences."""
    ra, rb = read_frame(a, frame), read_frame(b, frame)
    if ra["questions"] != rb["questions"]:
        raise ValueError(f"{a} and {b} were evaluated on different questions")
    if (
        frame in ("choice", "plain_norm") and ra["words"] != rb["words"]
    ):  # a letter's probability depends on every option
        raise ValueError(f"{a} and {b} were evaluated on different choices ({ra['words']} vs {rb['words']})")
    words = list(rb["words"] if words is None else words)
    missing = [w for w in words if w not in ra["words"] or w not in rb["words"]]
    if missing:
        raise ValueError(f"{a} and {b} were not both evaluated on {', '.join(missing)}")
    ia, ib = ([r["words"].index(w) for w in words] for r in (ra, rb))
    lp_a, lp_b = (torch.tensor(r["logprobs"], dtype=torch.float64) for r in (ra, rb))
    return lp_a[:, ia] - lp_b[:, ib]
