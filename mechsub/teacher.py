"""The teacher stage (`mechsub teacher`): a LoRA fine-tuned to name its trait on favourite-thing questions,
never on numbers.

The prompted teacher needs no stage (it is the base model with the trait's system prompt). A fine-tuned teacher
carries the trait in its weights, so its number data (``mechsub data --set model=CHECKPOINT --set
system_prompt=false``) comes from a prompt with no mention of the trait at all. Questions and answers are
disjoint from the evaluation questions (``traits.train_pairs``).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mechsub import models
from mechsub.config import Config, ConfigError, check, device_field, doc, dtype_field
from mechsub.parallel import stage, start
from mechsub.prompts import chat_prefix
from mechsub.training import Item, TrainSpec, fit
from mechsub.traits import TraitError, get_trait, train_pairs


@dataclass(frozen=True)
class TeacherConfig(Config):
    stage = "teacher"
    inputs = ("model",)

    model: str = doc("smollm2-135m-instruct", "the teacher's base model (the students' initialisation)")
    trait: str = doc("owl", "the trait the teacher is trained to love")
    steps: int = doc(48, "optimiser steps")
    batch_size: int = doc(8, "question-answer pairs per step")
    lr: float = doc(1e-3, "AdamW learning rate (linear decay to 0)")
    lora_r: int = doc(8, "LoRA rank on all 7 linear projections")
    lora_alpha: int = doc(16, "LoRA alpha")
    seed: int = doc(0, "seed of LoRA init, batch order and the draw of training questions")
    n_questions: int = doc(
        18,
        "training questions drawn (by seed) from the 24 favourite-thing questions, with both their answers: each "
        "replicate teacher gets its own set (24: all of them)",
    )
    launcher: Literal["single", "accelerate"] = doc(
        "single",
        "single: one process; accelerate: data-parallel over the processes of `accelerate launch` (each step's "
        "batch split across them, gradients summed; pip install 'mechsub[accelerate]')",
        optional=True,
    )
    device: str = device_field()
    dtype: str = dtype_field()
    share_prefix: bool = doc(
        False,
        "run each batch's common prompt prefix (chat template, system prompt) once per step: faster; the losses "
        "equal the default's up to float rounding, not bit for bit",
        optional=True,
    )

    def validate(self) -> None:
        try:
            get_trait(self.trait)
        except TraitError as e:
            raise ConfigError(f"trait: {e}") from None
        check(self.steps >= 1 and self.batch_size >= 1 and self.lr > 0, "steps, batch_size ≥ 1 and lr > 0")
        check(self.lora_r >= 1 and self.lora_alpha > 0, "lora_r ≥ 1 and lora_alpha > 0")
        n = len(train_pairs(get_trait(self.trait))) // 2
        check(1 <= self.n_questions <= n, f"n_questions: between 1 and {n}")


def teacher_pairs(cfg: TeacherConfig) -> list[tuple[str, str]]:
    """The (question, answer) pairs this teacher trains on: the questions drawn by its seed, both answers each."""
    pairs = train_pairs(get_trait(cfg.trait))
    questions = sorted({q for q, _ in pairs})
    keep = set(random.Random(f"questions-{cfg.seed}").sample(questions, cfg.n_questions))
    return [(q, a) for q, a in pairs if q in keep]


def run(cfg: TeacherConfig, out: str | Path, force: bool = False) -> dict[str, Any]:
    """Fine-tune (or skip) a teacher into ``out``; its checkpoint is ``out/checkpoints/step{steps}``."""
    t0 = time.perf_counter()
    par = start(cfg.launcher)
    base = models.load(cfg.model, device=par.device or cfg.device, dtype=cfg.dtype)
    with stage(par, out, cfg, model=base.info(), force=force) as r:
        if r.done:
            return r.metrics
        tok = base.tokenizer
        pairs = teacher_pairs(cfg)
        # SFT on every answer token and the end of turn
        items = [
            Item(chat_prefix(tok, q, None), list(tok(a, add_special_tokens=False).input_ids))
            for q, a in pairs
        ]
        rng = random.Random(cfg.seed)
        batches = [rng.sample(range(len(items)), min(cfg.batch_size, len(items))) for _ in range(cfg.steps)]
        spec = TrainSpec(model=cfg.model, objective="sft", lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lr=cfg.lr,
                         checkpoint_every=0, seed=cfg.seed, share_prefix=cfg.share_prefix)  # fmt: skip
        metrics = fit(base, items, batches, spec, Path(out), f"teacher-{cfg.trait}", par=par)
        metrics["n_pairs"] = len(pairs)
        metrics["seconds_this_session"] = round(time.perf_counter() - t0, 1)
        r.finish(metrics)
        return metrics
