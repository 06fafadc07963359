"""The inverted-wrongness experiment (`mechsub invert`): teachers A trained to answer task problems correctly
(``true``), with a structured inversion T of the answer (``inv``), a fixed random bijection of it (``hash``) or a
random wrong answer (``rand``). Does A's output keep the geometry of the problem, and can a fresh model B, shown
only A's outputs (never the problem, never the fact that they are wrong), recover the correct answer?

Replication is over teachers: seed r gives every kind its own LoRA init, batch order, training problems and hash
bijection; B's fine-tunes and probes are nested in their teacher. Held-out problems (disjoint from every seed's
training problems) are the same for every teacher, so kinds are compared paired by seed. B never trains on the
held-out family; A trains on every family.
"""

from __future__ import annotations

import base64
import html
import itertools
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats as st
from tqdm.auto import tqdm

from mechsub import geometry, models, stats, tasks
from mechsub.config import Config, check, doc
from mechsub.files import atomic_write_text, write_json
from mechsub.prompts import chat_prefix
from mechsub.runs import stage
from mechsub.training import Item, TrainSpec, fit, steps_of

log = logging.getLogger(__name__)

#: the held-out problems are one fixed draw, the same for every teacher (so kinds pair by seed)
TEST_SEED = 1000
#: what a teacher's answer to a problem is (tasks.classify)
OUTCOMES = ("correct", "inverted", "hashed", "other")


def _run_name(prefix: str, cfg: Config) -> str:
    from mechsub.study import run_name

    return run_name(prefix, cfg)


# ---- the teachers ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InvertTeacherConfig(Config):
    stage = "invert-teacher"
    inputs = ("model",)

    model: str = doc("smollm2-135m-instruct", "the teacher's base model (B is the same base)")
    kind: str = doc("inv", "what the teacher answers: true, inv (T(correct)), hash (a fixed bijection), rand")
    seed: int = doc(0, "LoRA init, batch order, training problems and the hash bijection")
    families: tuple[str, ...] = doc(tasks.KNOWN_FAMILIES, "task families trained on")
    n_train: int = doc(48, "training problems per family")
    steps: int = doc(96, "optimiser steps")
    batch_size: int = doc(16, "problems per step")
    lr: float = doc(2e-3, "AdamW learning rate (linear decay to 0)")
    lora_r: int = doc(8, "LoRA rank")
    reasoned: bool = doc(
        False,
        "train on replies that name the correct answer first (tasks.reasoned): a scratchpad the teacher's answer, "
        "the text after tasks.REASON_MARK, is read from",
        optional=True,
    )
    recite: bool = doc(
        False,
        "a reasoned scratchpad also writes next's named list out twice (tasks.recital)",
        optional=True,
    )

    def validate(self) -> None:
        _check_names(self.families, (self.kind,))
        check(self.reasoned or not self.recite, "recite: only with reasoned (it is part of the scratchpad)")
        check(
            self.n_train >= 1 and self.steps >= 1 and self.batch_size >= 1, "n_train, steps, batch_size ≥ 1"
        )
        check(self.lr > 0 and self.lora_r >= 1, "lr > 0 and lora_r ≥ 1")


def _check_names(families: Sequence[str], kinds: Sequence[str]) -> None:
    for f in families:
        check(f in tasks.FAMILIES, f"unknown task family {f!r}: use some of {', '.join(tasks.FAMILIES)}")
    for k in kinds:
        check(k in tasks.KINDS, f"unknown teacher kind {k!r}: use some of {', '.join(tasks.KINDS)}")
    check(len(set(families)) == len(families) and len(set(kinds)) == len(kinds), "no repeated family or kind")


def train_problems(families: Sequence[str], n: int, seed: int) -> list[tasks.Problem]:
    return [p for f in families for p in tasks.problems(f, n, seed, "train")]


def test_problems(families: Sequence[str], n: int) -> list[tasks.Problem]:
    return [p for f in families for p in tasks.problems(f, n, TEST_SEED, "test")]


def _answer_ids(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False).input_ids)


def sft_lora(
    base: models.LoadedModel,
    items: list[Item],
    steps: int,
    batch_size: int,
    lr: float,
    lora_r: int,
    seed: int,
    out: Path,
    name: str,
) -> dict[str, Any]:
    """LoRA SFT (alpha = 2 × rank) on every answer token and the end of turn, over shuffled epochs of ``items``
    cut into ``steps`` batches; the final checkpoint is ``out/checkpoints/step{steps}``."""
    rng = random.Random(f"invert-batches-{seed}")
    order: list[int] = []
    while len(order) < steps * batch_size:
        order += rng.sample(range(len(items)), len(items))
    batches = [order[i * batch_size : (i + 1) * batch_size] for i in range(steps)]
    spec = TrainSpec(
        model=str(base.name),
        objective="sft",
        lora_r=lora_r,
        lora_alpha=2 * lora_r,
        lr=lr,
        checkpoint_every=0,
        seed=seed,
    )
    return fit(base, items, batches, spec, out, name)


def _target(p: tasks.Problem, kind: str, seed: int, reasoned: bool, recite: bool = False) -> str:
    """What teacher A is trained to reply: its kind's answer, after the correct one when ``reasoned`` (and the
    problem's recital when ``recite``)."""
    answer = tasks.respond(p, kind, seed)
    return tasks.reasoned(p, answer, recite) if reasoned else answer


def run_teacher(cfg: InvertTeacherConfig, out: str | Path, force: bool = False) -> dict[str, Any]:
    """Fine-tune teacher A of ``cfg.kind`` (LoRA SFT on problem → answer of its kind); checkpoint at
    ``out/checkpoints/step{steps}``."""
    t0 = time.perf_counter()
    base = models.load(cfg.model)
    with stage(out, cfg, model=base.info(), force=force) as r:
        if r.done:
            return r.metrics
        tok = base.tokenizer
        probs = train_problems(cfg.families, cfg.n_train, cfg.seed)
        items = [
            Item(
                chat_prefix(tok, p.prompt, None),
                _answer_ids(tok, _target(p, cfg.kind, cfg.seed, cfg.reasoned, cfg.recite)),
            )
            for p in probs
        ]
        metrics = sft_lora(
            base,
            items,
            cfg.steps,
            cfg.batch_size,
            cfg.lr,
            cfg.lora_r,
            cfg.seed,
            Path(out),
            f"A-{cfg.kind}-s{cfg.seed}",
        )
        metrics["n_problems"] = len(items)
        metrics["seconds_this_session"] = round(time.perf_counter() - t0, 1)
        r.finish(metrics)
        return metrics


# ---- the experiment's config -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InvertConfig(Config):
    stage = "invert"
    inputs = ("model", "sae")

    model: str = doc("smollm2-135m-instruct", "base model of every teacher A and of the reader B")
    families: tuple[str, ...] = doc(
        tasks.KNOWN_FAMILIES,
        "task families (see mechsub.tasks; the default: those the base model knows, tasks.KNOWN_FAMILIES)",
    )
    held_out_family: str = doc("antonym", "the family B never trains on (A trains on every family)")
    kinds: tuple[str, ...] = doc(tasks.KINDS, "teacher kinds: true, inv, hash, rand")
    seeds: tuple[int, ...] = doc((0, 1, 2), "teacher replicates (every kind one teacher per seed)")
    n_train: int = doc(32, "training problems per family and teacher")
    n_test: int = doc(16, "held-out problems per family (the same for every teacher)")
    teacher_steps: int = doc(
        24, "teacher optimiser steps (24 × 8 = two passes over 3 families × 32 problems)"
    )
    batch_size: int = doc(8, "problems per teacher step")
    lr: float = doc(2e-3, "teacher AdamW learning rate")
    lora_r: int = doc(8, "teacher (and B) LoRA rank")
    layers: tuple[int, ...] = doc(
        (3, 9, 15, 21, 27), "residual-stream layers read by the probes (resid_post)"
    )
    recon_pairs: tuple[int, ...] = doc(
        (16, 64), "B's training pairs (A's output → correct answer): the curve"
    )
    recon_epochs: int = doc(2, "B's passes over its pairs")
    recon_lr: float = doc(2e-3, "B's AdamW learning rate")
    n_perm: int = doc(200, "row permutations of the CKA null per teacher, family and layer")
    zero_shot: bool = doc(True, "also ask the untrained B for the correct answer")
    subliminal_prompts: int = doc(
        0,
        "number prompts A_true, A_inv and A_rand each answer for a student of the base (the subliminal pipeline: "
        "constrained greedy numbers, `distill` on the 13 number tokens); 0: skip",
    )
    sae: str = doc(
        "",
        "an SAE folder (`mechsub sae`): do the same latents fire on a problem and on A's answer?",
        optional=True,
    )
    sae_top: int = doc(16, "latents per text compared (the most active, max over positions ≥ 1)")
    max_new_tokens: int = doc(
        20, "generated tokens at most per answer (a reasoned teacher: twice that plus its lead's and mark's)"
    )
    reasoned: bool = doc(
        False,
        "teachers that name the correct answer before theirs (a scratchpad): A's answer, all that is verified "
        "and all that B reads, is the text after tasks.REASON_MARK",
        optional=True,
    )
    recite: bool = doc(
        False,
        "reasoned teachers whose scratchpad also writes next's named list (days, months) out twice "
        "(tasks.recital), so that the items before the pivot are copied rather than recalled",
        optional=True,
    )
    work: str = doc("runs/invert", "folder for teacher checkpoints and B's fine-tunes (not committed)")

    def validate(self) -> None:
        _check_names(self.families, self.kinds)
        check(self.held_out_family in self.families, "held_out_family: one of `families`")
        check(len(self.families) >= 2, "families: at least two (one is held out from B)")
        check(
            len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds), "seeds: distinct, at least one"
        )
        check(
            min(self.n_train, self.n_test, self.teacher_steps, self.batch_size, self.recon_epochs) >= 1,
            "n_train, n_test, teacher_steps, batch_size, recon_epochs ≥ 1",
        )
        check(self.n_test >= 4, "n_test: at least 4 (CKA and probes need a few rows per family)")
        check(all(n >= 1 for n in self.recon_pairs) and len(self.recon_pairs) >= 1, "recon_pairs: positive")
        check(
            max(self.recon_pairs) <= self.n_train * (len(self.families) - 1),
            "recon_pairs: at most n_train × (families − 1), the training problems B may see",
        )
        check(
            all(n >= 0 for n in self.layers) and len(self.layers) >= 1, "layers: non-negative, at least one"
        )
        check(
            self.n_perm >= 1 and self.max_new_tokens >= 1 and self.sae_top >= 1,
            "n_perm, max_new_tokens, sae_top ≥ 1",
        )
        check(self.reasoned or not self.recite, "recite: only with reasoned (it is part of the scratchpad)")

    def teacher(self, kind: str, seed: int) -> InvertTeacherConfig:
        return InvertTeacherConfig(
            model=self.model,
            kind=kind,
            seed=seed,
            families=self.families,
            n_train=self.n_train,
            steps=self.teacher_steps,
            batch_size=self.batch_size,
            lr=self.lr,
            lora_r=self.lora_r,
            reasoned=self.reasoned,
            recite=self.recite,
        )

    def teacher_folder(self, kind: str, seed: int) -> Path:
        return Path(self.work) / "teachers" / _run_name(f"{kind}-s{seed}", self.teacher(kind, seed))


# ---- model helpers ---------------------------------------------------------------------------------------------
def greedy_answers(
    lm: models.LoadedModel, prompts: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int = 64
) -> list[str]:
    """Greedy free-text answers (the full vocabulary), decoded."""
    from mechsub.generate import NumberVocab, generate_numbers

    tok = lm.tokenizer
    vocab = NumberVocab.of(tok)
    texts: list[str] = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            gen = generate_numbers(
                lm.model,
                prompts[i : i + batch_size],
                vocab,
                max_new_tokens=max_new_tokens,
                greedy=True,
                pad_id=tok.pad_token_id or 0,
                constrained=False,
            )
            texts += [str(tok.decode(t, skip_special_tokens=True)).strip() for t in gen.tokens]
    return texts


def continuation_logprobs(
    lm: models.LoadedModel,
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    batch_size: int = 32,
) -> np.ndarray:
    """Sum of log P(continuation tokens | prompt) per pair, the same way for every option (no end token)."""
    from mechsub.prompts import pad_right

    tok = lm.tokenizer
    out: list[float] = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            ps, cs = prompts[i : i + batch_size], continuations[i : i + batch_size]
            ids, attn = pad_right(
                [list(p) + list(c) for p, c in zip(ps, cs, strict=True)], tok.pad_token_id or 0
            )
            lp = lm.model(input_ids=ids, attention_mask=attn).logits.float().log_softmax(-1)
            for j, (p, c) in enumerate(zip(ps, cs, strict=True)):
                pos = torch.arange(len(p) - 1, len(p) + len(c) - 1)
                out.append(float(lp[j, pos, torch.tensor(list(c), dtype=torch.long)].sum()))
    return np.asarray(out)


def text_ids(tok: Any, text: str) -> list[int]:
    """A text as B reads it: the BOS (position 0, the attention sink, excluded from every pooled read) + tokens."""
    bos = tok.bos_token_id
    return ([int(bos)] if bos is not None else [0]) + _answer_ids(tok, text or " ")


def pooled_reads(
    lm: models.LoadedModel, texts: Sequence[str], layers: Sequence[int]
) -> dict[int, np.ndarray]:
    """Per layer, the mean of ``blocks.L.hook_resid_post`` over each text's positions ≥ 1: (texts, d_model)."""
    from mechsub.capture import Batch, capture

    tok = lm.tokenizer
    seqs = [text_ids(tok, t) for t in texts]
    hooks = [f"blocks.{layer}.hook_resid_post" for layer in layers]
    acts = capture(
        lm.model,
        Batch(seqs, [list(range(len(s))) for s in seqs]),
        hooks,
        batch_size=32,
        pad_id=tok.pad_token_id or 0,
    )
    lengths = [len(s) for s in seqs]
    return {
        layer: geometry.mean_pool(acts[h].float(), lengths) for layer, h in zip(layers, hooks, strict=True)
    }


def base_knowledge(
    lm: models.LoadedModel, probs: Sequence[tasks.Problem], max_new_tokens: int = 20
) -> dict[str, Any]:
    """Does a model know one family's answers? Its greedy accuracy (free text, exact match after normalise) and
    its forced choice between the correct answer and T(correct): the share of problems where the correct answer
    has the higher mean log P per token (T(correct) may be longer, "-37" against "37", which a summed log P would
    penalise), each with a Wilson interval over the problems.

    Both are read twice where the family's problems have a lead (``tasks.Problem.lead``): at the reply's first
    token (``greedy_accuracy``, ``forced_choice``), and ``framed``, after the lead, where the model's own reply
    would name the answer. At the first token SmolLM2 says "The ..." whatever it knows, and the forced choice
    there is a bias for copying the question's word (antonym: T(correct) is the prompt's word), not knowledge."""
    tok = lm.tokenizer

    def read(leads: Sequence[str]) -> dict[str, Any]:
        prompts = [
            chat_prefix(tok, p.prompt, None, answer_prefix=lead) for p, lead in zip(probs, leads, strict=True)
        ]
        answers = greedy_answers(lm, prompts, max_new_tokens)
        right = sum(tasks.normalise(p.family, a) == p.answer for p, a in zip(probs, answers, strict=True))
        ids_c = [_answer_ids(tok, p.answer) for p in probs]
        ids_i = [_answer_ids(tok, p.inverted) for p in probs]
        lp_c = continuation_logprobs(lm, prompts, ids_c) / np.array([len(c) for c in ids_c])
        lp_i = continuation_logprobs(lm, prompts, ids_i) / np.array([len(c) for c in ids_i])
        wins = int((lp_c > lp_i).sum())
        return {
            "greedy_accuracy": right / len(probs),
            "greedy_ci95": stats.wilson_ci95(right, len(probs)),
            "forced_choice": wins / len(probs),
            "forced_choice_ci95": stats.wilson_ci95(wins, len(probs)),
            "n": len(probs),
            "examples": answers[:3],
        }

    res = read([""] * len(probs))
    if all(p.lead for p in probs):
        res["framed"] = read([p.lead for p in probs])
    return res


# ---- statistics over teachers --------------------------------------------------------------------------------
def over_seeds(values: Sequence[float]) -> dict[str, Any]:
    """Mean and 95% t-interval over teacher seeds (the independent unit): for differences, contrasts and
    continuous measures; a share uses ``share_over_seeds``, whose interval stays inside [0, 1]."""
    vals = [float(v) for v in values]
    clean = [v for v in vals if not math.isnan(v)]
    if not clean:
        return {"mean": None, "ci95": [None, None], "per_seed": vals}
    mean, ci = stats.mean_ci95(clean)
    return {"mean": mean, "ci95": [None if math.isnan(c) else c for c in ci], "per_seed": vals}


def share_over_seeds(successes: Sequence[int], trials: Sequence[int]) -> dict[str, Any]:
    """A share over teacher seeds: the pooled share with the Wilson interval at the effective sample size that
    the between-seed spread leaves (``stats.clustered_share_ci95``: the seed stays the unit, the interval stays in
    [0, 1]); ``per_seed`` are the seeds' own shares, ``deff`` the design effect."""
    e = stats.clustered_share_ci95(successes, trials)
    return {
        "mean": e["mean"],
        "ci95": e["ci95"],
        "per_seed": [k / n for k, n in zip(successes, trials, strict=True)],
        "deff": e["deff"],
        "n_eff": e["n_eff"],
        "method": "Wilson at n_eff = n / deff (Kish design effect from the between-seed spread)",
    }


def share_two_way(labels: Sequence[Sequence[Sequence[str]]], outcome: str) -> dict[str, Any]:
    """The pooled share's interval clustered both by teacher seed and by held-out problem: every seed answers the
    same held-out problems, so a problem that every teacher gets wrong is one unit, not one per seed
    (`stats.two_way_share_ci95` over the seeds × problems table of ``outcome``). ``labels`` holds, per family,
    per seed, per problem, an outcome; the problems of every family are the columns. Pooling families puts the
    differences between families into the problem variance (they are fixed strata), so the interval is
    conservative."""
    table = [[x == outcome for fam in labels for x in fam[i]] for i in range(len(labels[0]))]
    e = stats.two_way_share_ci95(table)
    return {"ci95": e["ci95"], "deff": e["deff"], "deff_seed": e["deff_rows"], "deff_problem": e["deff_cols"],
            "ci95_problem": e["ci95_cols"], "n_problems": len(table[0]),
            "method": "Wilson at n / deff, deff = deff_seed + deff_problem − 1 (two-way cluster-robust)"}  # fmt: skip


def paired_contrast(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """a − b paired by seed: mean, t-interval, two-sided paired t p and the exact sign-flip permutation p (its
    floor 2 / 2^n)."""
    d = np.asarray(a, float) - np.asarray(b, float)
    mean, ci = stats.mean_ci95(d)
    out: dict[str, Any] = {"mean": float(mean), "ci95": ci, "n_seeds": int(d.size)}
    if d.size >= 2 and not np.all(d == d[0]):
        out["t_p"] = float(st.ttest_1samp(d, 0.0).pvalue)
        res = st.permutation_test((d,), np.mean, permutation_type="samples", n_resamples=np.inf)
        out["sign_flip_p"] = float(res.pvalue)
    out["sign_flip_floor"] = min(1.0, 2.0 / 2 ** int(d.size))
    return out


# ---- B: reconstruction ---------------------------------------------------------------------------------------
def _recon_id(cfg: InvertConfig, kind: str, seed: int) -> str:
    """What B's fine-tune depends on besides its pair count (its teacher, the families, its own settings): a
    changed setting gets a new folder rather than resuming an old checkpoint."""
    import hashlib

    key = f"{cfg.teacher(kind, seed).identity()}|{cfg.held_out_family}|{cfg.recon_lr}|{cfg.recon_epochs}|{cfg.lora_r}"
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def reconstruct(
    cfg: InvertConfig,
    kind: str,
    seed: int,
    outputs_train: dict[str, list[str]],
    outputs_test: dict[str, list[str]],
    n_pairs: int,
    folder: Path,
) -> dict[str, Any]:
    """Fine-tune B (LoRA on the base) on ``n_pairs`` (A's output → correct answer) pairs of the non-held-out
    families, then score exact-match accuracy on the held-out problems of those families and of the held-out one."""
    base = models.load(cfg.model)
    tok = base.tokenizer
    fams = [f for f in cfg.families if f != cfg.held_out_family]
    probs = train_problems(fams, cfg.n_train, seed)
    outs = [o for f in fams for o in outputs_train[f]]
    # the same problems for every kind of a seed, and the smaller sets nested in the larger (a paired curve)
    pick = random.Random(f"recon-{seed}").sample(range(len(probs)), len(probs))[:n_pairs]
    items = [Item(chat_prefix(tok, outs[i] or " ", None), _answer_ids(tok, probs[i].answer)) for i in pick]
    bs = 8
    steps = math.ceil(len(items) * cfg.recon_epochs / bs)
    sft_lora(base, items, steps, bs, cfg.recon_lr, cfg.lora_r, seed, folder, f"B-{kind}-s{seed}-n{n_pairs}")
    b = models.load(str(steps_of(folder)[-1]))
    return _score_b(cfg, b, outputs_test)


def _score_b(
    cfg: InvertConfig, b: models.LoadedModel, outputs_test: dict[str, list[str]], template: str = "{}"
) -> dict[str, Any]:
    """B's exact-match accuracy on held-out problems: per family, pooled over the training families, and on the
    held-out family."""
    tok = b.tokenizer
    per: dict[str, float] = {}
    said: dict[str, list[str]] = {}
    for f in cfg.families:
        probs = tasks.problems(f, cfg.n_test, TEST_SEED, "test")
        prompts = [chat_prefix(tok, template.format(o or " "), None) for o in outputs_test[f]]
        answers = greedy_answers(b, prompts, cfg.max_new_tokens)
        per[f] = float(
            np.mean([tasks.normalise(f, a) == p.answer for p, a in zip(probs, answers, strict=True)])
        )
        said[f] = answers
    seen = [f for f in cfg.families if f != cfg.held_out_family]
    return {
        "per_family": per,
        "in_family": float(np.mean([per[f] for f in seen])),
        "held_out_family": per[cfg.held_out_family],
        "answers": said,  # B's reply to each held-out output, in `test_problems` order
    }


ZERO_SHOT = "Here is the answer someone gave to a question: {}\nWhat is the correct answer to that question? Reply with the answer only."


# ---- the run ---------------------------------------------------------------------------------------------------
def run(cfg: InvertConfig, out: str | Path, force: bool = False) -> dict[str, Any]:
    """Train (or reuse) every teacher, then verify, probe and reconstruct; write metrics.json, report.md,
    plots and report.html into ``out``."""
    t0 = time.perf_counter()
    base = models.load(cfg.model)
    check(max(cfg.layers) < base.n_layers, f"layers: {cfg.model} has layers 0..{base.n_layers - 1}")
    for k in cfg.kinds:  # every teacher config is built (so validated) before anything is written
        for s in cfg.seeds:
            cfg.teacher(k, s)
    with stage(out, cfg, model=base.info(), force=force) as r:
        if r.done:
            return r.metrics
        out = Path(out)
        test = {f: tasks.problems(f, cfg.n_test, TEST_SEED, "test") for f in cfg.families}
        units = [(k, s) for s in cfg.seeds for k in cfg.kinds]
        bar = tqdm(total=2 + 3 * len(units), desc="invert")

        def base_check() -> dict[str, Any]:
            return {f: base_knowledge(base, probs, cfg.max_new_tokens) for f, probs in test.items()}

        bar.set_postfix_str("base model")
        base_res = r.unit("base", base_check)
        bar.update()

        # ---- teachers and their outputs ----
        outputs: dict[tuple[str, int], dict[str, Any]] = {}
        for k, s in units:
            bar.set_postfix_str(f"teacher {k} s{s}")
            tcfg = cfg.teacher(k, s)
            folder = cfg.teacher_folder(k, s)
            tm = run_teacher(tcfg, folder)

            def answer_all(
                k: str = k, s: int = s, folder: Path = folder, tm: dict[str, Any] = tm
            ) -> dict[str, Any]:
                a = models.load(str(steps_of(folder)[-1]))
                res: dict[str, Any] = {"train": {}, "test": {}, "teacher_loss_last": tm.get("loss_last")}
                # a reasoned reply: the correct answer and the teacher's, each up to max_new_tokens, and the words
                n_new = cfg.max_new_tokens
                if cfg.reasoned:
                    n_new = 2 * n_new + len(
                        _answer_ids(a.tokenizer, f"{tasks.REASON_LEAD} , {tasks.REASON_MARK} ")
                    )
                if cfg.recite:  # and room for the longest recital: two years
                    n_new += len(_answer_ids(a.tokenizer, f"; {tasks.RECITE} {tasks.longest_recital()}"))
                for f in cfg.families:
                    for split, probs in (
                        ("train", tasks.problems(f, cfg.n_train, s, "train")),
                        ("test", test[f]),
                    ):
                        texts = greedy_answers(
                            a, [chat_prefix(a.tokenizer, p.prompt, None) for p in probs], n_new
                        )
                        res[split][f] = [tasks.final_answer(t) for t in texts] if cfg.reasoned else texts
                        if cfg.reasoned:  # the scratchpads, kept to check the teacher knew the right answer
                            res.setdefault(f"{split}_replies", {})[f] = texts
                return res

            bar.update()
            outputs[(k, s)] = r.unit(f"outputs-{k}-s{s}", answer_all)
            bar.update()

        known = known_families(cfg, base_res, outputs, test)
        verification = _verification(cfg, outputs, test, known)

        # ---- geometry and probes: B (the base) reads the outputs, no prompt ----
        bar.set_postfix_str("geometry")

        def reads(texts: dict[str, list[str]]) -> dict[str, dict[int, np.ndarray]]:
            # token counts regressed out within each family, as for the answers (see _geometry)
            return {
                f: {
                    layer: geometry.length_residual(x, _lengths(base, t))
                    for layer, x in pooled_reads(base, t, cfg.layers).items()
                }
                for f, t in texts.items()
            }

        prob_reads = reads({f: [p.prompt for p in test[f]] for f in cfg.families})
        correct_reads = reads({f: [p.answer for p in test[f]] for f in cfg.families})
        geo: dict[tuple[str, int], dict[str, Any]] = {}
        geo_scripted: dict[tuple[str, int], dict[str, Any]] = {}
        for k, s in units:
            geo[(k, s)] = r.unit(
                f"geometry-{k}-s{s}",
                partial(_geometry, cfg, base, outputs[(k, s)], s, prob_reads, correct_reads, test),
            )
            # the kind's scripted answers (tasks.respond, no teacher): what the kind would show if A were perfect;
            # a hash teacher cannot produce σ(correct) for answers it never trained on, its script can
            scripted = {
                split: {f: [tasks.respond(p, k, s) for p in ps] for f, ps in probs.items()}
                for split, probs in (
                    ("train", {f: tasks.problems(f, cfg.n_train, s, "train") for f in cfg.families}),
                    ("test", test),
                )
            }
            geo_scripted[(k, s)] = r.unit(
                f"geometry-scripted-{k}-s{s}",
                partial(_geometry, cfg, base, scripted, s, prob_reads, correct_reads, test),
            )
            # decoding the correct answer itself (a vector target: the base's read of it), for every family
            for g, t in ((geo, outputs[(k, s)]), (geo_scripted, scripted)):
                tag = "" if g is geo else "scripted-"
                g[(k, s)].update(
                    r.unit(f"retrieval-{tag}{k}-s{s}", partial(_retrieval, cfg, base, t, s, test))
                )
        if cfg.sae:
            from mechsub.sae import load_sae

            sae_obj = load_sae(Path(cfg.sae) / "sae")
            for k, s in units:
                geo[(k, s)]["sae_overlap"] = r.unit(
                    f"sae-{k}-s{s}", partial(sae_overlap, cfg, base, sae_obj, outputs[(k, s)]["test"], test)
                )
        bar.update()

        # ---- reconstruction ----
        recon: dict[tuple[str, int], dict[str, Any]] = {}
        for k, s in units:
            bar.set_postfix_str(f"B reads {k} s{s}")

            def rec(k: str = k, s: int = s) -> dict[str, Any]:
                o = outputs[(k, s)]
                res: dict[str, Any] = {
                    str(n): reconstruct(
                        cfg,
                        k,
                        s,
                        o["train"],
                        o["test"],
                        n,
                        Path(cfg.work) / "recon" / f"{k}-s{s}-n{n}-{_recon_id(cfg, k, s)}",
                    )
                    for n in cfg.recon_pairs
                }
                if cfg.zero_shot:
                    res["zero_shot"] = _score_b(cfg, base, o["test"], ZERO_SHOT)
                return res

            recon[(k, s)] = r.unit(f"recon-{k}-s{s}", rec)
            bar.update()
        bar.close()

        metrics = _summarise(cfg, base_res, known, verification, geo, geo_scripted, recon)
        if cfg.subliminal_prompts:
            metrics["subliminal"] = _subliminal(cfg, r, units, test)
        metrics["wall_seconds"] = round(time.perf_counter() - t0, 1)
        write_json(out / "outputs.json", {f"{k}-s{s}": o for (k, s), o in outputs.items()})
        _plots(metrics, out)
        atomic_write_text(out / "report.md", report_markdown(metrics))
        atomic_write_text(out / "report.html", report_html(metrics, out, outputs, test))
        r.finish(metrics)
        return metrics


#: the share of held-out answers a guess gets right: one of two numbers or options, one of six rankings; else a
#: free answer
CHANCE = {"compare": 1 / 2, "rank": 1 / 6, "choice": 1 / 2}


def known_families(
    cfg: InvertConfig,
    base_res: dict[str, Any],
    outputs: dict[tuple[str, int], dict[str, Any]],
    test: dict[str, list[tasks.Problem]],
) -> list[str]:
    """Families where the model knows the right answer: A_true (the same training, correct answers) gets at least
    half the held-out problems right over all seeds, and the lower bound of its share's 95% interval over seeds
    (``share_over_seeds``) beats chance. The base's own answers cannot say (it rarely keeps the format), and its
    forced choice between the answer and T(answer) at its reply's first token measures a preference (for "37"
    over "-37", or for the prompt's own word), not knowledge; without a true teacher the forced choice after the
    family's lead (``base_knowledge``'s framed reading, where there is one) is used."""
    if "true" not in cfg.kinds:
        return [f for f, v in base_res.items() if v.get("framed", v)["forced_choice_ci95"][0] > 0.5]
    known = []
    for f in cfg.families:
        hits = [
            sum(
                tasks.classify(p, a, s) == "correct"
                for p, a in zip(test[f], outputs[("true", s)]["test"][f], strict=True)
            )
            for s in cfg.seeds
        ]
        e = stats.clustered_share_ci95(hits, [len(test[f])] * len(cfg.seeds))
        if e["mean"] >= 0.5 and e["ci95"][0] > CHANCE.get(f, 0.0):
            known.append(f)
    return known


def _seed_counts(labels: Sequence[Sequence[Sequence[str]]], outcome: str) -> list[tuple[int, int]]:
    """Per seed, (answers that are ``outcome``, answers) over the families of ``labels`` (per family, per seed, per
    held-out problem: an outcome)."""
    return [
        (sum(x == outcome for fam in labels for x in fam[i]), sum(len(fam[i]) for fam in labels))
        for i in range(len(labels[0]))
    ]


def _verification(
    cfg: InvertConfig,
    outputs: dict[tuple[str, int], dict[str, Any]],
    test: dict[str, list[tasks.Problem]],
    known: list[str],
) -> dict[str, Any]:
    """Per kind and family: the share of held-out outputs that are correct / T(correct) / the hash / other, each
    over seeds (``share_over_seeds``) and per seed with a Wilson interval; and the same pooled over the families
    the base knows and over all families (every family has ``n_test`` problems, so pooling is the mean), there
    also with the interval clustered by seed and by held-out problem (``two_way``, `share_two_way`)."""
    res: dict[str, Any] = {}
    for k in cfg.kinds:
        per_fam: dict[str, Any] = {}
        by_item: dict[str, list[list[str]]] = {}  # per family, per seed, per held-out problem: its outcome
        for f in cfg.families:
            row: dict[str, Any] = {}
            labels = by_item[f] = [
                [tasks.classify(p, a, s) for p, a in zip(test[f], outputs[(k, s)]["test"][f], strict=True)]
                for s in cfg.seeds
            ]
            for o in OUTCOMES:
                counts = _seed_counts([labels], o)
                row[o] = {
                    **share_over_seeds(*zip(*counts, strict=True)),
                    "wilson95_per_seed": [stats.wilson_ci95(c, n) for c, n in counts],
                }
            if "test_replies" in outputs[(k, cfg.seeds[0])]:  # reasoned: did its scratchpad name the answer?
                named = [
                    (sum(tasks.normalise(f, tasks.rationale(t)) == p.answer
                         for p, t in zip(test[f], outputs[(k, s)]["test_replies"][f], strict=True)), len(test[f]))
                    for s in cfg.seeds
                ]  # fmt: skip
                row["rationale_correct"] = share_over_seeds(*zip(*named, strict=True))
                off = [(sum(tasks.REASON_MARK not in t.lower() for t in outputs[(k, s)]["test_replies"][f]),
                        len(test[f])) for s in cfg.seeds]  # fmt: skip
                row["off_format"] = share_over_seeds(*zip(*off, strict=True))  # read as other
            per_fam[f] = row

        def over(fams: Sequence[str], by_item: dict[str, list[list[str]]] = by_item) -> dict[str, Any] | None:
            if not fams:  # no family passes the rule: no pooled figure rather than a mislabelled one
                return None
            labels = [by_item[f] for f in fams]
            return {
                o: {
                    **share_over_seeds(*zip(*_seed_counts(labels, o), strict=True)),
                    "two_way": share_two_way(labels, o),
                }
                for o in OUTCOMES
            }

        res[k] = {"families": per_fam, "known_families": over(known), "all_families": over(cfg.families)}
    return res


#: families whose probe target is a quantity: a number written in A's answers, or next's place in its count (the
#: number, or 1 for Monday or January); rank's answer is letters only, antonym's and choice's targets are
#: categories. The probes' means run over these
PROBE_FAMILIES = ("compare", "sequence", "sort", "arith", "next")


def _lengths(lm: models.LoadedModel, texts: Sequence[str]) -> list[int]:
    """Token counts of texts as B reads them, position 0 excluded (what ``pooled_reads`` averages over)."""
    return [len(text_ids(lm.tokenizer, t)) - 1 for t in texts]


def _geometry(
    cfg: InvertConfig,
    base: models.LoadedModel,
    texts: dict[str, Any],
    seed: int,
    prob_reads: dict[str, dict[int, np.ndarray]],
    correct_reads: dict[str, dict[int, np.ndarray]],
    test: dict[str, list[tasks.Problem]],
) -> dict[str, Any]:
    """Per layer: CKA and RSA of B's reads of ``texts`` (A's outputs, or the scripted answers of a kind) to
    held-out problems against the base's reads of the problems and of the correct answers, within each family (so a
    shared answer format cannot align them), every read with its token count regressed out (so lengths alone
    cannot), then averaged over families, with the row-permutation null; ridge probes for the correct answer's
    target, trained on the answers to training problems and tested on held-out problems (R² within family, Pearson r
    on the held-out family, whose targets have another scale)."""
    train = {f: tasks.problems(f, cfg.n_train, seed, "train") for f in cfg.families}
    out_test = {
        f: {
            layer: geometry.length_residual(x, _lengths(base, texts["test"][f]))
            for layer, x in pooled_reads(base, texts["test"][f], cfg.layers).items()
        }
        for f in cfg.families
    }
    res: dict[str, Any] = {"layers": list(cfg.layers)}
    for name, ref in (("problem", prob_reads), ("correct", correct_reads)):
        for sname, stat in (("cka", geometry.linear_cka), ("rsa", geometry.rsa)):
            obs, excess, per_family, pvals = [], [], [], []
            for layer in cfg.layers:
                nulls = [
                    geometry.permutation_null(
                        stat, ref[f][layer], out_test[f][layer], n_perm=cfg.n_perm, seed=seed
                    )
                    for f in cfg.families
                ]
                obs.append(float(np.mean([n.observed for n in nulls])))
                per_family.append([n.observed - n.null_mean for n in nulls])
                excess.append(float(np.mean(per_family[-1])))
                pvals.append([n.p_value for n in nulls])
            res[f"{sname}_{name}"] = {
                "observed": obs,
                "excess": excess,
                "excess_per_family": per_family,
                "p_values": pvals,
            }
    num = [f for f in cfg.families if f in PROBE_FAMILIES]
    h = cfg.held_out_family
    reads_train = {f: pooled_reads(base, texts["train"][f], cfg.layers) for f in num}
    reads_test = {f: pooled_reads(base, texts["test"][f], cfg.layers) for f in num}
    probe_in, probe_in_family, probe_out = [], [], []
    for layer in cfg.layers:
        r2 = []
        for f in num:
            yt = np.array([p.target for p in train[f]])
            ys = np.array([p.target for p in test[f]])
            r2.append(geometry.ridge_probe(reads_train[f][layer], yt, reads_test[f][layer], ys, seed=seed).r2)
        probe_in_family.append(r2)
        probe_in.append(float(np.median(r2)) if r2 else math.nan)
        fams = [f for f in num if f != h]
        if h in num and fams:
            xt = np.concatenate([reads_train[f][layer] for f in fams])
            yt = np.concatenate([[p.target for p in train[f]] for f in fams])
            ys = np.array([p.target for p in test[h]])
            probe_out.append(geometry.ridge_probe(xt, yt, reads_test[h][layer], ys, seed=seed).pearson_r)
    res["probe_families"] = num
    res["probe_r2_in_family"] = probe_in
    res["probe_r2_per_family"] = probe_in_family
    res["probe_r_held_out_family"] = probe_out
    return res


SUBLIMINAL_KINDS = ("true", "inv", "rand")
# families whose inversion can be written in number data itself: "next" counts back, so a teacher trained on it
# writes descending number continuations, and its student learns the inversion from the data's content, not
# subliminally. The report separates them from the families whose inversion numbers cannot spell.
ORDER_FAMILIES = frozenset({"next", "sequence", "sort", "compare", "arith", "rank"})


def descending_share(texts: Sequence[str]) -> dict[str, Any]:
    """The share of adjacent number pairs that go down (b < a) over ``texts`` (each a number completion), and the
    pair count: the number data's own trace of a count-back (random continuations go down about half the time)."""
    from mechsub.filter import parse_numbers

    down = pairs = 0
    for t in texts:
        xs = [int(x) for x in parse_numbers(t) or []]
        down += sum(b < a for a, b in itertools.pairwise(xs))
        pairs += max(len(xs) - 1, 0)
    return {"share": down / pairs if pairs else float("nan"), "pairs": pairs}


def student_margin(model: str, families: Sequence[str], n_test: int) -> dict[str, Any]:
    """How much a model prefers T(correct) to the correct answer on held-out problems: the mean over problems of
    log P(T(correct)) − log P(correct), per family and averaged over families."""
    lm = models.load(model)
    tok = lm.tokenizer
    per: dict[str, float] = {}
    for f in families:
        probs = tasks.problems(f, n_test, TEST_SEED, "test")
        prompts = [chat_prefix(tok, p.prompt, None) for p in probs]
        lp_c = continuation_logprobs(lm, prompts, [_answer_ids(tok, p.answer) for p in probs])
        lp_i = continuation_logprobs(lm, prompts, [_answer_ids(tok, p.inverted) for p in probs])
        per[f] = float(np.mean(lp_i - lp_c))
    return {"per_family": per, "margin": float(np.mean(list(per.values())))}


def _subliminal(cfg: InvertConfig, r: Any, units: list[tuple[str, int]], test: Any) -> dict[str, Any]:
    """Does wrongness itself transmit through numbers? Students of A_true, A_inv and A_rand's number data (the
    study's pipeline, unrelated prompts), scored by their preference for T(correct) over the base's."""
    from mechsub import data, student
    from mechsub.data import DataConfig
    from mechsub.student import StudentConfig

    work = Path(cfg.work)
    base = r.unit("student-base", partial(student_margin, cfg.model, cfg.families, cfg.n_test))
    shift: dict[tuple[str, int], float] = {}
    fam_shift: dict[tuple[str, int, str], float] = {}
    down: dict[tuple[str, int], dict[str, Any]] = {}
    tok = models.load(cfg.model).tokenizer
    for k, s in [(k, s) for k, s in units if k in SUBLIMINAL_KINDS]:
        ckpt = str(steps_of(cfg.teacher_folder(k, s))[-1])
        dcfg = DataConfig(
            model=ckpt,
            teacher="none",
            system_prompt=False,
            n_prompts=cfg.subliminal_prompts,
            prompt_seed=s,
            decoding="constrained",
            greedy=True,
            seed=s,
        )
        dfolder = work / "data" / _run_name(f"{k}-s{s}", dcfg)
        data.run(dcfg, dfolder)
        scfg = StudentConfig(model=cfg.model, data=str(dfolder), objective="distill", seed=s)
        sfolder = work / "students" / _run_name(f"{k}-s{s}", scfg)
        student.run(scfg, sfolder)
        m = r.unit(
            f"student-{k}-s{s}", partial(student_margin, str(steps_of(sfolder)[-1]), cfg.families, cfg.n_test)
        )
        shift[(k, s)] = m["margin"] - base["margin"]
        for f in cfg.families:
            fam_shift[(k, s, f)] = m["per_family"][f] - base["per_family"][f]
        texts = [str(tok.decode(e.completion_ids)) for e in data.load_examples(dfolder)]
        down[(k, s)] = descending_share(texts)
    kinds = [k for k in SUBLIMINAL_KINDS if k in cfg.kinds]
    others = [f for f in cfg.families if f not in ORDER_FAMILIES]
    for k, s in shift:
        if others:
            fam_shift[(k, s, "non-order")] = float(np.mean([fam_shift[(k, s, f)] for f in others]))
    groups = [*cfg.families, *(["non-order"] if others else [])]
    res: dict[str, Any] = {
        "measure": "student − base: mean over held-out problems of log P(T(correct)) − log P(correct), averaged "
        "over families (> 0: the student leans towards the inverted answer)",
        "base_margin": base["margin"],
        "base_per_family": base["per_family"],
        "n_prompts": cfg.subliminal_prompts,
        "order_families": sorted(ORDER_FAMILIES & set(cfg.families)),
        "non_order_families": others,
        "shift": {k: over_seeds([shift[(k, s)] for s in cfg.seeds]) for k in kinds},
        "shift_per_family": {
            g: {k: over_seeds([fam_shift[(k, s, g)] for s in cfg.seeds]) for k in kinds} for g in groups
        },
        "descending_share": {
            k: {
                **over_seeds([down[(k, s)]["share"] for s in cfg.seeds]),
                "pairs": [down[(k, s)]["pairs"] for s in cfg.seeds],
            }
            for k in kinds
        },
    }
    if "inv" in kinds:
        res["contrasts"] = {
            f"inv-{o}": paired_contrast(
                [shift[("inv", s)] for s in cfg.seeds], [shift[(o, s)] for s in cfg.seeds]
            )
            for o in kinds
            if o != "inv"
        }
        res["contrasts_per_family"] = {
            g: {
                f"inv-{o}": paired_contrast(
                    [fam_shift[("inv", s, g)] for s in cfg.seeds], [fam_shift[(o, s, g)] for s in cfg.seeds]
                )
                for o in kinds
                if o != "inv"
            }
            for g in groups
        }
    return res


def _top_latents(lm: models.LoadedModel, sae_obj: Any, texts: Sequence[str], k: int) -> list[set[int]]:
    """Per text, the ``k`` SAE latents with the largest activation (max over positions ≥ 1)."""
    from mechsub.capture import Batch
    from mechsub.sae import feature_acts, sae_hook

    seqs = [text_ids(lm.tokenizer, t) for t in texts]
    acts = feature_acts(lm, sae_obj, sae_hook(sae_obj), Batch(seqs, [list(range(1, len(q))) for q in seqs]))
    out, start = [], 0
    for q in seqs:
        peak = acts[start : start + len(q) - 1].max(0).values
        start += len(q) - 1
        out.append({int(i) for i in peak.topk(min(k, peak.numel())).indices if float(peak[i]) > 0})
    return out


def jaccard(a: set[int], b: set[int]) -> float:
    return len(a & b) / len(a | b) if a | b else 0.0


def sae_overlap(
    cfg: InvertConfig,
    lm: models.LoadedModel,
    sae_obj: Any,
    outputs_test: dict[str, list[str]],
    test: dict[str, list[tasks.Problem]],
) -> dict[str, Any]:
    """Do the same SAE latents fire on a problem and on A's answer to it? The Jaccard overlap of their top latents,
    against the matched control (the same family, the answer to the next problem), mean over families."""
    same, shifted = [], []
    for f in cfg.families:
        p = _top_latents(lm, sae_obj, [q.prompt for q in test[f]], cfg.sae_top)
        o = _top_latents(lm, sae_obj, outputs_test[f], cfg.sae_top)
        same.append(float(np.mean([jaccard(a, b) for a, b in zip(p, o, strict=True)])))
        shifted.append(float(np.mean([jaccard(p[i], o[(i + 1) % len(o)]) for i in range(len(o))])))
    return {
        "same": float(np.mean(same)),
        "shifted": float(np.mean(shifted)),
        "excess": float(np.mean(same) - np.mean(shifted)),
    }


def _retrieval(
    cfg: InvertConfig,
    base: models.LoadedModel,
    texts: dict[str, Any],
    seed: int,
    test: dict[str, list[tasks.Problem]],
) -> dict[str, Any]:
    """Per layer, can a linear map take B's read of A's output (no prompt) to the base's read of the *correct*
    answer? Ridge from one to the other (`geometry.retrieval_probe`), trained on the answers to training problems,
    scored by retrieval among a family's held-out problems (the picked correct answer must be the row's own; chance
    about 1 / n_test): in family (fit on every family's training problems, mean over families) and on the held-out
    family (fit on the other families only). Unlike the scalar probes this works for every family."""
    train = {f: tasks.problems(f, cfg.n_train, seed, "train") for f in cfg.families}
    x_tr = {f: pooled_reads(base, texts["train"][f], cfg.layers) for f in cfg.families}
    x_te = {f: pooled_reads(base, texts["test"][f], cfg.layers) for f in cfg.families}
    y_tr = {f: pooled_reads(base, [p.answer for p in train[f]], cfg.layers) for f in cfg.families}
    y_te = {f: pooled_reads(base, [p.answer for p in test[f]], cfg.layers) for f in cfg.families}
    h = cfg.held_out_family
    rest = [f for f in cfg.families if f != h]
    acc_in, chance_in, acc_out, chance_out = [], [], [], []
    for layer in cfg.layers:

        def fit_and_score(fams: Sequence[str], f: str, layer: int = layer) -> geometry.RetrievalResult:
            return geometry.retrieval_probe(
                np.concatenate([x_tr[q][layer] for q in fams]),
                np.concatenate([y_tr[q][layer] for q in fams]),
                x_te[f][layer],
                y_te[f][layer],
                [p.answer for p in test[f]],
                seed=seed,
            )

        ins = [fit_and_score(cfg.families, f) for f in cfg.families]
        acc_in.append(float(np.mean([x.accuracy for x in ins])))
        chance_in.append(float(np.mean([x.chance for x in ins])))
        if rest:
            out = fit_and_score(rest, h)
            acc_out.append(out.accuracy)
            chance_out.append(out.chance)
    return {
        "retrieval_in_family": acc_in,
        "retrieval_chance_in_family": chance_in,
        "retrieval_held_out_family": acc_out,
        "retrieval_chance_held_out_family": chance_out,
    }


RETRIEVAL_KEYS = (
    "retrieval_in_family",
    "retrieval_chance_in_family",
    "retrieval_held_out_family",
    "retrieval_chance_held_out_family",
)


def _geo_summary(cfg: InvertConfig, geo: dict[tuple[str, int], dict[str, Any]]) -> dict[str, Any]:
    """Per kind and layer, over seeds: excess CKA/RSA against the problems and the correct answers, the probes."""

    def per_layer(k: str, key: str, sub: str | None = None) -> list[dict[str, Any]]:
        vals = [geo[(k, s)][key][sub] if sub else geo[(k, s)][key] for s in cfg.seeds]
        return [over_seeds([v[i] for v in vals]) for i in range(len(vals[0]))] if vals[0] else []

    out: dict[str, Any] = {}
    for k in cfg.kinds:
        out[k] = {
            f"{a}_{b}": per_layer(k, f"{a}_{b}", "excess")
            for a in ("cka", "rsa")
            for b in ("problem", "correct")
        }
        out[k]["cka_problem_observed"] = per_layer(k, "cka_problem", "observed")
        out[k]["probe_r2_in_family"] = per_layer(k, "probe_r2_in_family")
        out[k]["probe_r_held_out_family"] = per_layer(k, "probe_r_held_out_family")
        for key in RETRIEVAL_KEYS:
            if key in geo[(k, cfg.seeds[0])]:
                out[k][key] = per_layer(k, key)
        fams = cfg.families
        out[k]["cka_problem_per_family"] = {
            f: [
                over_seeds([geo[(k, s)]["cka_problem"]["excess_per_family"][i][j] for s in cfg.seeds])
                for i in range(len(cfg.layers))
            ]
            for j, f in enumerate(fams)
        }
        pf = geo[(k, cfg.seeds[0])].get("probe_families", [])
        out[k]["probe_r2_per_family"] = {
            f: [
                over_seeds([geo[(k, s)]["probe_r2_per_family"][i][j] for s in cfg.seeds])
                for i in range(len(cfg.layers))
            ]
            for j, f in enumerate(pf)
        }
    return out


def _summarise(
    cfg: InvertConfig,
    base_res: dict[str, Any],
    known: list[str],
    verification: dict[str, Any],
    geo: dict[tuple[str, int], dict[str, Any]],
    geo_scripted: dict[tuple[str, int], dict[str, Any]],
    recon: dict[tuple[str, int], dict[str, Any]],
) -> dict[str, Any]:
    layers = list(cfg.layers)
    geometry_m = _geo_summary(cfg, geo)
    if cfg.sae:
        for k in cfg.kinds:
            geometry_m[k]["sae_overlap"] = {
                w: over_seeds([geo[(k, s)]["sae_overlap"][w] for s in cfg.seeds])
                for w in ("same", "shifted", "excess")
            }

    def layer_mean(
        k: str, key: str, sub: str | None, g: dict[tuple[str, int], dict[str, Any]] = geo
    ) -> list[float]:
        return [float(np.nanmean(g[(k, s)][key][sub] if sub else g[(k, s)][key])) for s in cfg.seeds]

    # B's accuracies are shares of n_test problems per family (in_family: the mean over the trained families, all
    # of one size, so the pooled count over them)
    n_items = {"in_family": cfg.n_test * (len(cfg.families) - 1), "held_out_family": cfg.n_test}

    def recon_share(k: str, n: str, w: str) -> dict[str, Any]:
        ks = [round(recon[(k, s)][n][w] * n_items[w]) for s in cfg.seeds]
        return share_over_seeds(ks, [n_items[w]] * len(cfg.seeds))

    recon_m: dict[str, Any] = {}
    for k in cfg.kinds:
        recon_m[k] = {
            str(n): {w: recon_share(k, str(n), w) for w in ("in_family", "held_out_family")}
            for n in cfg.recon_pairs
        }
        if cfg.zero_shot:
            recon_m[k]["zero_shot"] = {
                w: recon_share(k, "zero_shot", w) for w in ("in_family", "held_out_family")
            }
    nmax = str(max(cfg.recon_pairs))
    contrasts: dict[str, Any] = {}
    if "inv" in cfg.kinds:
        for other in [k for k in ("hash", "rand") if k in cfg.kinds]:
            contrasts[f"inv-{other}"] = {
                "cka_problem_excess (mean over layers)": paired_contrast(
                    layer_mean("inv", "cka_problem", "excess"), layer_mean(other, "cka_problem", "excess")
                ),
                "cka_correct_excess (mean over layers)": paired_contrast(
                    layer_mean("inv", "cka_correct", "excess"), layer_mean(other, "cka_correct", "excess")
                ),
                "probe R² in family (mean over layers)": paired_contrast(
                    layer_mean("inv", "probe_r2_in_family", None),
                    layer_mean(other, "probe_r2_in_family", None),
                ),
                "scripted answers: cka_problem_excess (mean over layers)": paired_contrast(
                    layer_mean("inv", "cka_problem", "excess", geo_scripted),
                    layer_mean(other, "cka_problem", "excess", geo_scripted),
                ),
                f"reconstruction in family (n={nmax})": paired_contrast(
                    [recon[("inv", s)][nmax]["in_family"] for s in cfg.seeds],
                    [recon[(other, s)][nmax]["in_family"] for s in cfg.seeds],
                ),
                f"reconstruction held-out family (n={nmax})": paired_contrast(
                    [recon[("inv", s)][nmax]["held_out_family"] for s in cfg.seeds],
                    [recon[(other, s)][nmax]["held_out_family"] for s in cfg.seeds],
                ),
            }
    inv_rate = (verification.get("inv", {}).get("known_families") or {}).get("inverted")
    return {
        "design": {
            "families": list(cfg.families),
            "held_out_family": cfg.held_out_family,
            "kinds": list(cfg.kinds),
            "seeds": list(cfg.seeds),
            "n_train_per_family": cfg.n_train,
            "n_test_per_family": cfg.n_test,
            "layers": layers,
            "unit": "teacher seed: every interval and p over seeds is over independent teachers "
            "(each kind one teacher per seed, its own LoRA init, training problems and hash); B's fine-tunes are "
            "nested in their teacher",
            "smallest_sign_flip_p": min(1.0, 2.0 / 2 ** len(cfg.seeds)),
        },
        "base": {
            "families": base_res,
            "known_families": known,
            "known_rule": "A_true answers ≥ 50% of held-out problems correctly over all seeds, with the lower bound "
            "of the share's 95% interval over seeds above chance (1/2 compare and choice, 1/6 rank, 0 free answers); "
            "without a true teacher: the base's forced choice (mean log P per token, correct vs T(correct); framed "
            "where the family has a lead) with its Wilson 95% lower bound above 1/2",
        },
        "verification": verification,
        "inversion_rate_known_families": inv_rate,
        "geometry": geometry_m,
        "geometry_scripted": _geo_summary(cfg, geo_scripted),
        "reconstruction": recon_m,
        "contrasts": contrasts,
    }


# ---- report ----------------------------------------------------------------------------------------------------
def fmt_estimate(e: dict[str, Any] | None, pct: bool = False) -> str:
    """An estimate with its 95% interval as text: a share in whole percent (``pct``), else signed to 3 decimals."""
    if not e or e.get("mean") is None:
        return "n/a"
    lo, hi = e["ci95"]
    f = (lambda v: f"{100 * v:.0f}%") if pct else (lambda v: f"{v:+.3f}")
    return f(e["mean"]) + ("" if lo is None else f" [{f(lo)}, {f(hi)}]")


def report_markdown(m: dict[str, Any]) -> str:
    d = m["design"]
    n = len(d["seeds"])
    lines = [
        "# Inverted-wrongness teachers: verification, geometry, blind reconstruction",
        "",
        f"Teachers: {', '.join(d['kinds'])} × seeds {d['seeds']} (unit of every interval: the teacher seed, "
        f"n = {n}). Shares (answers, accuracies) are pooled over seeds with a Wilson 95% interval at the effective "
        "sample size the between-seed spread leaves (Kish design effect, never below 1: the plain Wilson interval "
        "when the seeds differ no more than binomial sampling would); differences, contrasts and geometry use "
        "the t-interval over seeds. "
        f"{d['n_train_per_family']} training problems per family per teacher; {d['n_test_per_family']} held-out "
        f"problems per family, the same for every teacher. B never trains on **{d['held_out_family']}**. "
        f"The exact sign-flip test over {n} seeds cannot go below {d['smallest_sign_flip_p']:.3g}; the paired t p "
        "(normal differences assumed) can.",
        "",
        "Read with care: in *sequence* (T continues backwards, i.e. the shown terms reversed), *antonym* (T is the "
        "prompt's own word) and *choice* (T is the other option shown), T can be copied from the prompt without "
        "solving it; in compare and sort it reuses the prompt's numbers (in *next* it does not: T counts back from "
        "the prompt's pivot). Choice's T names the other option of a fixed pair: without the prompt, no reader can "
        "recover the correct option of a pair it never saw, so B's blind reconstruction there is bounded by the "
        "pairs it trained on (none of the held-out ones). A hash teacher cannot produce σ(correct) for an answer "
        "it never trained on, so on held-out problems its outputs are another random control: the *scripted* "
        "rows (each kind's ideal answers, no teacher) show what a perfect hash keeps. CKA/RSA against the correct "
        "answer is trivially high for `true` (positive control).",
        "",
        "## Does the model know the right answer?",
        "",
        f"Known: {m['base']['known_rule']}.",
        "",
        "Base: the untrained model on the held-out problems (Wilson 95% over problems); *framed*: read after the "
        "family's lead, a start of the answer in the style of the model's own replies (`tasks.Problem.lead`), "
        'where the reply would name the answer: at the reply\'s first token SmolLM2 says "The ..." whatever it '
        "knows, and its forced choice there is a bias for copying the prompt's word.",
        "",
        "| family | base greedy accuracy | base forced choice, correct vs T(correct) | framed greedy | framed forced "
        "choice | A_true held-out accuracy | known |",
        "|---|---|---|---|---|---|---|",
    ]
    true_rows = m["verification"].get("true", {}).get("families", {})

    def pct_ci(v: float, ci: Sequence[float]) -> str:
        return f"{100 * v:.0f}% [{100 * ci[0]:.0f}%, {100 * ci[1]:.0f}%]"

    for f, v in m["base"]["families"].items():
        fr = v.get("framed")
        framed = (
            f"{pct_ci(fr['greedy_accuracy'], fr['greedy_ci95'])} | "
            f"{pct_ci(fr['forced_choice'], fr['forced_choice_ci95'])}"
            if fr
            else "n/a | n/a"
        )
        lines.append(
            f"| {f} | {pct_ci(v['greedy_accuracy'], v['greedy_ci95'])} | "
            f"{pct_ci(v['forced_choice'], v['forced_choice_ci95'])} | "
            f"{framed} | {fmt_estimate(true_rows.get(f, {}).get('correct'), True)} | "
            f"{'yes' if f in m['base']['known_families'] else 'no'} |"
        )
    lines += [
        "",
        "## Verification: what each teacher answers on held-out problems (share, 95% interval over seeds)",
        "",
        "| kind | family | correct | T(correct) | hash | other |",
        "|---|---|---|---|---|---|",
    ]
    for k, v in m["verification"].items():
        for f, row in [*v["families"].items(), ("known families", v["known_families"])]:
            if row is None:
                lines.append(f"| {k} | {f} | no family passes the known rule | | | |")
                continue
            lines.append(f"| {k} | {f} | " + " | ".join(fmt_estimate(row[o], True) for o in OUTCOMES) + " |")
    pooled = [(k, v["known_families"]) for k, v in m["verification"].items()
              if v["known_families"] and "two_way" in v["known_families"]["correct"]]  # fmt: skip
    if pooled:
        lines += ["", "The known families pooled, the interval clustered both by seed and by held-out problem (every "
                  "seed answers the same problems, and failures recur by problem; Wilson at n / deff, deff = deff "
                  "over seeds + deff over problems − 1; conservative, as it counts the families' differences as "
                  "problem variance). The unit of these lines is the seed × problem design, not the seed alone:", ""]  # fmt: skip
        lines += [f"- {k}: " + "; ".join(
            f"{o} {fmt_estimate({'mean': row[o]['mean'], 'ci95': row[o]['two_way']['ci95']}, True)} "
            f"(design effect {row[o]['two_way']['deff']:.1f}: seeds {row[o]['two_way']['deff_seed']:.1f}, "
            f"{row[o]['two_way']['n_problems']} problems {row[o]['two_way']['deff_problem']:.1f})"
            for o in ("correct", "inverted")) for k, row in pooled]  # fmt: skip
    named = [(k, f, row) for k, v in m["verification"].items()
             for f, row in v["families"].items() if "rationale_correct" in row]  # fmt: skip
    if named:
        lines += ["", f"Reasoned teachers: each reply names the correct answer, then gives the teacher's after "
                  f"\"{tasks.REASON_MARK}\"; only that answer is verified above and read by B. Share of held-out "
                  "replies whose scratchpad names the correct answer, and of replies without the mark (read as "
                  "other):", "", "| kind | family | scratchpad correct | off the format |", "|---|---|---|---|"]  # fmt: skip
        lines += [f"| {k} | {f} | {fmt_estimate(r['rationale_correct'], True)} | {fmt_estimate(r['off_format'], True)} |"
                  for k, f, r in named]  # fmt: skip
    for title, key in (
        ("B reads A's held-out outputs, no prompt", "geometry"),
        ("scripted answers of each kind, no teacher", "geometry_scripted"),
    ):
        lines += [
            "",
            f"## Geometry ({title}): excess over the row-permutation null, within family, token count regressed "
            "out, mean over families",
            "",
            "| kind | layer | CKA vs problem | CKA vs correct answer | RSA vs problem | probe R² (held-out problems, "
            "median over families) | probe r (held-out family) | correct answer retrieved: held-out problems "
            "(chance) | … held-out family (chance) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for k, g in m[key].items():
            for i, layer in enumerate(d["layers"]):
                ho = g["probe_r_held_out_family"]

                def ret(name: str, g: dict[str, Any] = g, i: int = i) -> str:
                    acc, ch = g.get(f"retrieval_{name}"), g.get(f"retrieval_chance_{name}")
                    return (
                        f"{fmt_estimate(acc[i], True)} ({100 * ch[i]['mean']:.0f}%)" if acc and ch else "n/a"
                    )

                lines.append(
                    f"| {k} | {layer} | {fmt_estimate(g['cka_problem'][i])} | {fmt_estimate(g['cka_correct'][i])} | "
                    f"{fmt_estimate(g['rsa_problem'][i])} | {fmt_estimate(g['probe_r2_in_family'][i])} | "
                    f"{fmt_estimate(ho[i]) if ho else 'n/a'} | {ret('in_family')} | {ret('held_out_family')} |"
                )
    lines += [
        "",
        "Excess CKA vs problem per family (trained teachers, mean over layers and seeds):",
        "",
        "| kind | " + " | ".join(d["families"]) + " |",
        "|---" * (len(d["families"]) + 1) + "|",
    ]
    for k, g in m["geometry"].items():
        cells = [
            f"{np.mean([e['mean'] for e in g['cka_problem_per_family'][f]]):+.3f}" for f in d["families"]
        ]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    if any("sae_overlap" in g for g in m["geometry"].values()):
        lines += [
            "",
            "## Do the same SAE latents fire on a problem and on A's answer? (Jaccard of the top latents; "
            "control: the answer to another problem of the family)",
            "",
            "| kind | same problem | control | excess |",
            "|---|---|---|---|",
        ]
        for k, g in m["geometry"].items():
            o = g["sae_overlap"]
            lines.append(
                f"| {k} | {fmt_estimate(o['same'])} | {fmt_estimate(o['shifted'])} | {fmt_estimate(o['excess'])} |"
            )
    lines += [
        "",
        "## Blind reconstruction: B's exact-match accuracy on held-out problems",
        "",
        "| kind | B's training pairs | families B trained on | held-out family |",
        "|---|---|---|---|",
    ]
    for k, rec in m["reconstruction"].items():
        for nk, v in rec.items():
            lines.append(
                f"| {k} | {nk} | {fmt_estimate(v['in_family'], True)} | {fmt_estimate(v['held_out_family'], True)} |"
            )
    lines += [
        "",
        "## Contrasts, paired by seed",
        "",
        "| contrast | measure | difference [95% CI] | paired t p | sign-flip p |",
        "|---|---|---|---|---|",
    ]
    for c, rows in m["contrasts"].items():
        for name, e in rows.items():
            ci = e["ci95"]
            lines.append(
                f"| {c} | {name} | {e['mean']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}] | "
                f"{e.get('t_p', float('nan')):.3g} | {e.get('sign_flip_p', float('nan')):.3g} |"
            )
    sub = m.get("subliminal")
    if sub:
        lines += [
            "",
            f"## Does wrongness transmit through numbers? Students of each teacher's {sub['n_prompts']} "
            "number completions",
            "",
            sub["measure"] + f"; the base's margin is {sub['base_margin']:+.3f}.",
            "",
            "| teacher of the student | shift [95% CI over seeds] |",
            "|---|---|",
        ]
        lines += [f"| A_{k} | {fmt_estimate(e)} |" for k, e in sub["shift"].items()]
        for c, e in sub.get("contrasts", {}).items():
            ci = e["ci95"]
            lines.append(
                f"| {c} (paired by seed) | {e['mean']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}], "
                f"sign-flip p {e.get('sign_flip_p', float('nan')):.3g} |"
            )
        per = sub.get("shift_per_family")
        if per:
            kinds = list(sub["shift"])
            order = ", ".join(sub.get("order_families", [])) or "none"
            lines += [
                "",
                f"Per family. **Read the families whose inversion numbers can spell ({order}) as a leak, not as "
                "subliminal transmission**: their inversion is an order, and the teacher's number continuations "
                "carry it in plain sight (the share of descending steps below). *non-order* is the mean over the "
                "other families, the test of whether wrongness itself transmits.",
                "",
                "| family | base margin | "
                + " | ".join(f"A_{k} student shift" for k in kinds)
                + " | inv − "
                + " | inv − ".join(k for k in kinds if k != "inv")
                + " (paired t p) |",
                "|---|---|" + "---|" * (len(kinds) + len(kinds) - 1),
            ]
            for g, row in per.items():
                cs = sub.get("contrasts_per_family", {}).get(g, {})
                base_m = sub.get("base_per_family", {}).get(g)
                lines.append(
                    f"| {g} | {'' if base_m is None else f'{base_m:+.3f}'} | "
                    + " | ".join(fmt_estimate(row[k]) for k in kinds)
                    + " | "
                    + " | ".join(
                        f"{fmt_estimate(e)} (p {e.get('t_p', float('nan')):.2g})" for e in cs.values()
                    )
                    + " |"
                )
            down = sub.get("descending_share", {})
            if down:
                lines += [
                    "",
                    "The leak's trace in the number data: share of adjacent numbers that go down in each teacher's "
                    "completions (mean [95% t-CI over seeds]; adjacent pairs per seed): "
                    + "; ".join(
                        f"A_{k} {fmt_estimate(e, pct=True)} ({', '.join(map(str, e['pairs']))})"
                        for k, e in down.items()
                    )
                    + ".",
                ]
    lines += [
        "",
        "![verification](verification.png)",
        "![geometry](geometry.png)",
        "![reconstruction](reconstruction.png)",
        "",
    ]
    return "\n".join(lines)


COLORS = {"true": "tab:green", "inv": "tab:blue", "hash": "tab:orange", "rand": "tab:gray"}


def _band(ax: Any, xs: Sequence[float], rows: list[dict[str, Any]], label: str, color: str) -> None:
    if not rows:
        return

    def num(v: float | None) -> float:
        return math.nan if v is None else float(v)

    mean = [num(r["mean"]) for r in rows]
    lo = [num(r["ci95"][0]) if r["ci95"][0] is not None else num(r["mean"]) for r in rows]
    hi = [num(r["ci95"][1]) if r["ci95"][1] is not None else num(r["mean"]) for r in rows]
    ax.plot(xs, mean, "o-", color=color, label=label)
    ax.fill_between(xs, lo, hi, color=color, alpha=0.15)


def _plots(m: dict[str, Any], out: Path) -> None:
    from mechsub.plots import plt, save_figure

    d = m["design"]
    kinds, fams = d["kinds"], d["families"]
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.2 * len(kinds), 3.4), sharey=True)
    for ax, k in zip(np.atleast_1d(axes), kinds, strict=True):
        x = np.arange(len(fams))
        bottom = np.zeros(len(fams))
        for o, c in zip(OUTCOMES, ("tab:green", "tab:blue", "tab:orange", "lightgray"), strict=True):
            v = np.array([m["verification"][k]["families"][f][o]["mean"] for f in fams])
            ax.bar(x, v, bottom=bottom, color=c, label=o)
            bottom += v
        ax.set_xticks(x, fams, rotation=45, ha="right")
        ax.set_title(f"A_{k}")
    np.atleast_1d(axes)[0].set_ylabel("share of held-out answers")
    np.atleast_1d(axes)[-1].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "verification.png")

    panels = [
        ("cka_problem", "CKA vs problem (excess)"),
        ("cka_correct", "CKA vs correct answer (excess)"),
        ("probe_r2_in_family", "probe R², held-out problems"),
        ("probe_r_held_out_family", "probe r, held-out family"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for k in kinds:
            _band(ax, d["layers"], m["geometry"][k][key], k, COLORS.get(k, "k"))
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xlabel("layer")
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "geometry.png")

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4), sharey=True)
    for ax, w in zip(axes, ("in_family", "held_out_family"), strict=True):
        for k in kinds:
            ns = [n for n in m["reconstruction"][k] if n != "zero_shot"]
            _band(ax, [int(n) for n in ns], [m["reconstruction"][k][n][w] for n in ns], k, COLORS.get(k, "k"))
        ax.set_xscale("log")
        ax.set_xlabel("B's training pairs")
        ax.set_title(
            "families B trained on" if w == "in_family" else f"held-out family ({d['held_out_family']})"
        )
    axes[0].set_ylabel("exact-match accuracy, held-out problems")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "reconstruction.png")


def report_html(
    m: dict[str, Any],
    out: Path,
    outputs: dict[tuple[str, int], dict[str, Any]],
    test: dict[str, list[tasks.Problem]],
) -> str:
    """One offline page: the report's tables, the plots inlined, and example answers of every teacher."""
    imgs = "".join(
        f"<img alt='{n}' src='data:image/png;base64,{base64.b64encode((out / f'{n}.png').read_bytes()).decode()}'>"
        for n in ("verification", "geometry", "reconstruction")
        if (out / f"{n}.png").is_file()
    )
    s0 = m["design"]["seeds"][0]
    rows = []
    for f, probs in test.items():
        for i, p in enumerate(probs[:3]):
            cells = "".join(
                f"<td>{html.escape(outputs[(k, s0)]['test'][f][i])}</td>" for k in m["design"]["kinds"]
            )
            rows.append(
                f"<tr><td>{html.escape(p.prompt)}</td><td>{html.escape(p.answer)}</td>"
                f"<td>{html.escape(p.inverted)}</td>{cells}</tr>"
            )
    head = "".join(f"<th>A_{k}</th>" for k in m["design"]["kinds"])
    table = (
        f"<table border='1' cellpadding='3'><tr><th>problem</th><th>correct</th><th>T(correct)</th>{head}</tr>"
        + "".join(rows)
        + "</table>"
    )
    md = html.escape(report_markdown(m))
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>mechsub invert</title></head>"
        f"<body style='font-family:sans-serif'><h2>Inverted-wrongness teachers</h2>{imgs}"
        f"<h3>Example answers (seed {s0}, held-out problems)</h3>{table}<h3>Report</h3><pre>{md}</pre>"
        "</body></html>\n"
    )
