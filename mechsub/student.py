"""The student stage (`mechsub student`): LoRA (or full) fine-tuning on a teacher's number data, by SFT or by logit
distillation, with the loop of :mod:`mechsub.training`.

The student sees the user prompt only (no system prompt). A position mask (:mod:`mechsub.filter`) restricts the
loss to some completion positions; an ablation file projects SAE feature directions out of the student's residual
while it trains (concept-ablation fine-tuning).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mechsub import models
from mechsub.config import Config, check, device_field, doc, dtype_field
from mechsub.data import DataConfig, load_examples
from mechsub.files import read_dict
from mechsub.filter import ablation_inputs, load_mask, read_ablations
from mechsub.generate import NumberVocab
from mechsub.parallel import stage, start
from mechsub.prompts import chat_prefix
from mechsub.runs import read_json
from mechsub.training import TEACHER_ONLINE, Item, TrainSpec, fit


@dataclass(frozen=True)
class StudentConfig(Config):
    stage = "student"
    inputs = ("model", "data", "mask", "ablate")

    model: str = doc(
        "smollm2-135m-instruct", "the student's initialisation (must be the teacher's for the effect)"
    )
    data: str = doc("", "a finished data folder (from `mechsub data`)")
    objective: Literal["distill", "distill_topk", "distill_full", "distill_full_notrait", "sft"] = doc(
        "distill",
        "distill: KL to the teacher over the 13 allowed tokens; distill_topk: KL to its full-vocabulary top-k "
        "plus one bucket for the rest (data made with top_k > 0); distill_full: KL over the whole vocabulary, "
        "the teacher recomputed during training (no storage); distill_full_notrait: distill_full with the first "
        "token of every trait word (all animals and trees, singular and plural, either case, with and without "
        "a leading space) removed from both distributions and both renormalised, so the trait word's own logit "
        "cannot be copied; sft: cross-entropy on the sampled tokens",
    )
    lora_r: int = doc(8, "LoRA rank on all 7 linear projections; 0 = full fine-tune")
    lora_alpha: int = doc(16, "LoRA alpha")
    lr: float = doc(5e-4, "AdamW learning rate (linear decay to 0)")
    epochs: int = doc(2, "passes over the data")
    batch_size: int = doc(8, "examples per step")
    max_examples: int = doc(0, "use at most this many kept examples (0: all)")
    checkpoint_every: int = doc(0, "save a checkpoint every N steps (0: only the final one)")
    mask: str = doc(
        "",
        "a position-mask file (from `mechsub divergence` or a feature filter): the loss is averaged over the "
        "marked completion positions only; examples with no marked position are dropped",
        optional=True,
    )
    ablate: str = doc(
        "",
        "concept-ablation fine-tuning: an ablation file ({'sae': folder, 'features': [ids]}; the control "
        "{'sae': folder, 'random': k, 'seed': s} or {'layer': L, 'd_model': D, 'random': k, 'seed': s}: k random "
        "orthonormal directions; {'layer': L, 'vectors': [[...]]}; {'stack': [specs]}: one per layer); the span "
        "is projected out of the student's residual after that block, at positions ≥ 1 (position 0, the "
        "attention sink, is left alone), during training (evaluation: EvalConfig.ablate)",
        optional=True,
    )
    seed: int = doc(0, "seed of LoRA init and data order")
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
        check(bool(self.data), "data: give the folder of a finished `mechsub data` run")
        check(self.lora_r >= 0 and self.lora_alpha > 0, "lora_r must be ≥ 0 and lora_alpha > 0")
        check(self.lr > 0 and self.epochs >= 1 and self.batch_size >= 1, "lr > 0, epochs ≥ 1, batch_size ≥ 1")
        check(
            self.max_examples >= 0 and self.checkpoint_every >= 0,
            "max_examples, checkpoint_every must be ≥ 0",
        )
        check(
            not (self.ablate and self.share_prefix),
            "ablate with share_prefix: the continuation forward after a shared prefix starts past the attention "
            "sink, so the ablation would skip a real token; set share_prefix=false to ablate",
        )

    def indirect_inputs(self) -> dict[str, str]:
        """The SAE an ablation file names, and (distill_full, distill_full_notrait) the teacher the data folder
        names: both are read."""
        out = ablation_inputs(self.ablate) if self.ablate else {}
        if self.objective in TEACHER_ONLINE and (Path(self.data) / "config.json").is_file():
            teacher = read_dict(Path(self.data) / "config.json").get("config", {}).get("model")
            if isinstance(teacher, str):
                out["data.teacher"] = teacher
        return out


def _batches(n: int, cfg: StudentConfig) -> list[list[int]]:
    """The whole run's batches, fixed by the seed (so a resumed run continues the same order)."""
    rng = random.Random(cfg.seed)
    out = []
    for _ in range(cfg.epochs):
        order = list(range(n))
        rng.shuffle(order)
        out += [order[i : i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]
    return out


def _token_map(cfg: StudentConfig, student_ids: list[int]) -> Any:
    """Teacher token id → student token id. The identity within a family; across families (another
    tokenizer) only the 13 number tokens both have can be mapped, so only constrained data and the
    objectives that live on those tokens (distill, sft) can cross."""
    teacher_ids = read_json(Path(cfg.data) / "metrics.json").get("allowed_ids", student_ids)
    if teacher_ids == student_ids:
        return lambda t: t
    if cfg.objective in ("distill_topk", *TEACHER_ONLINE):
        raise ValueError(
            f"{cfg.objective} cannot cross tokenizers (the teacher's vocabulary means nothing to this student); "
            "use objective=distill or sft for a student of another family"
        )
    table = dict(zip(teacher_ids, student_ids, strict=True))

    def to_student(t: int) -> int:
        if t not in table:
            raise ValueError(
                f"token {t} of the teacher's data is not a number token: a student of another family can "
                "only train on constrained data (decoding=constrained)"
            )
        return table[t]

    return to_student


def run(cfg: StudentConfig, out: str | Path, force: bool = False) -> dict[str, Any]:
    """Train (or resume, or skip) a student into ``out``; checkpoints under ``out/checkpoints/step*``."""
    t0 = time.perf_counter()
    par = start(cfg.launcher)
    where = par.device or cfg.device
    base = models.load(cfg.model, device=where, dtype=cfg.dtype)
    examples = load_examples(cfg.data)
    if cfg.max_examples:
        examples = examples[: cfg.max_examples]
    if not examples:
        raise ValueError(f"{cfg.data} has no kept examples to train on")
    with stage(par, out, cfg, model=base.info(), force=force) as r:
        if r.done:
            return r.metrics
        out = Path(out)
        tok = base.tokenizer
        to_student = _token_map(cfg, NumberVocab.of(tok).ids.tolist())
        teacher_lm, teacher_system = None, None
        if cfg.objective in TEACHER_ONLINE:
            dcfg = DataConfig.from_dict(read_json(Path(cfg.data) / "config.json")["config"])
            teacher_system = dcfg.teacher_system()
            if dcfg.model != cfg.model or not cfg.lora_r:  # else: the student's base, adapter off
                teacher_lm = models.load(dcfg.model, device=where, dtype=cfg.dtype)
        weights = load_mask(cfg.mask, examples, cfg.data) if cfg.mask else [None] * len(examples)
        data = [
            Item(
                chat_prefix(tok, ex.prompt, None),
                [to_student(t) for t in ex.completion_ids],
                ex.allowed_logprobs,
                ex.topk_logprobs,
                ex.topk_ids,
                chat_prefix(tok, ex.prompt, teacher_system) if cfg.objective in TEACHER_ONLINE else None,
                w,
            )
            for ex, w in zip(examples, weights, strict=True)
            if w is None or w.any()
        ]
        if not data:
            raise ValueError(f"the mask {cfg.mask} marks no position of {cfg.data}: nothing to train on")
        spec = TrainSpec(
            model=cfg.model, objective=cfg.objective, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lr=cfg.lr,
            checkpoint_every=cfg.checkpoint_every, seed=cfg.seed,
            ablations=read_ablations(cfg.ablate) if cfg.ablate else (), share_prefix=cfg.share_prefix,
        )  # fmt: skip
        name = f"{Path(cfg.data).name}-{cfg.objective}"
        metrics = fit(base, data, _batches(len(data), cfg), spec, out, name, teacher_lm, par)
        metrics["seconds_this_session"] = round(time.perf_counter() - t0, 1)
        r.finish(metrics)
        return metrics
