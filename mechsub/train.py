"""Students: LoRA (or full) fine-tuning on a teacher's number data, by SFT or by logit distillation.

The student sees the user prompt only (no system prompt). The loss covers completion positions only (each
completion token and the end of turn), and the LM head is computed only there: for ``distill`` only on the
13 allowed rows (KL from the teacher's stored allowed-token distribution: no logit leakage through other
tokens), for ``sft`` on the full vocabulary at those positions. Checkpoints are LoRA adapters (safetensors)
that :func:`mechsub.models.load` reads back merged; the optimiser state is saved beside them in safetensors,
so a killed run resumes from its last checkpoint with the same data order.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import Tensor
from tqdm.auto import tqdm

from mechsub.config import Config, check, doc
from mechsub.runs import atomic_write_bytes, atomic_write_text, read_json, stage

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class StudentConfig(Config):
    stage = "student"

    model: str = doc(
        "smollm2-135m-instruct", "the student's initialisation (must be the teacher's for the effect)"
    )
    data: str = doc("", "a finished data folder (from `mechsub data`)")
    objective: Literal["distill", "distill_topk", "distill_full", "sft"] = doc(
        "distill",
        "distill: KL to the teacher over the 13 allowed tokens; distill_topk: KL to its full-vocabulary top-k "
        "plus one bucket for the rest (data made with top_k > 0); distill_full: KL over the whole vocabulary, "
        "the teacher recomputed during training (no storage); sft: cross-entropy on the sampled tokens",
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
        "concept-ablation fine-tuning: an ablation file ({'sae': folder, 'features': [ids]}); the span of those "
        "features' decoder directions is projected out of the student's residual at the SAE's layer during "
        "training (not during evaluation)",
        optional=True,
    )
    seed: int = doc(0, "seed of LoRA init and data order")

    def validate(self) -> None:
        check(bool(self.data), "data: give the folder of a finished `mechsub data` run")
        check(self.lora_r >= 0 and self.lora_alpha > 0, "lora_r must be ≥ 0 and lora_alpha > 0")
        check(self.lr > 0 and self.epochs >= 1 and self.batch_size >= 1, "lr > 0, epochs ≥ 1, batch_size ≥ 1")
        check(
            self.max_examples >= 0 and self.checkpoint_every >= 0,
            "max_examples, checkpoint_every must be ≥ 0",
        )


def _batches(n: int, cfg: StudentConfig) -> list[list[int]]:
    """The whole run's batches, fixed by the seed (so a resumed run continues the same order)."""
    rng = random.Random(cfg.seed)
    out = []
    for _ in range(cfg.epochs):
        order = list(range(n))
        rng.shuffle(order)
        out += [order[i : i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]
    return out


@dataclass
class Item:
    """One training sequence: the student's prompt ids, the teacher's completion and its log-probs."""

    prompt: list[int]
    completion: list[int]
    allowed_logprobs: Tensor  # (positions, 13)
    topk_logprobs: Tensor | None = None  # (positions, k)
    topk_ids: Tensor | None = None
    teacher_prompt: list[int] | None = None  # the teacher's own prompt (system prompt included): distill_full
    weight: Tensor | None = None  # (positions,) 0/1: which completion positions count in the loss (None: all)


def completion_hidden(
    decoder: Any, batch: list[Item], pad_id: int, eos: int, prompts: list[list[int]] | None = None
) -> tuple[Tensor, list[int]]:
    """Final hidden states at the completion positions of a batch, (positions, d_model), and their targets.

    Positions are every completion token, then the end of turn (absent when the teacher was cut off by a token
    cap); ``prompts`` replaces the items' prompts (the teacher's, for distill_full).
    """
    prompts = prompts or [it.prompt for it in batch]
    from mechsub.capture import pad_right

    ids, attn = pad_right([p + it.completion for p, it in zip(prompts, batch, strict=True)], pad_id)
    hidden = decoder(input_ids=ids, attention_mask=attn).last_hidden_state
    rows: list[int] = []
    cols: list[int] = []
    targets: list[int] = []
    for i, (p, it) in enumerate(zip(prompts, batch, strict=True)):
        n, c = len(it.allowed_logprobs), it.completion
        if n not in (len(c), len(c) + 1):
            raise ValueError(f"teacher log-probs cover {n} positions for a completion of {len(c)} tokens")
        rows += [i] * n
        cols += list(range(len(p) - 1, len(p) - 1 + n))
        targets += [*c, eos][:n]
    return hidden[torch.tensor(rows), torch.tensor(cols)], targets


def completion_loss(
    decoder: Any,
    head: Tensor,
    allowed: Tensor,
    batch: list[Item],
    objective: str,
    pad_id: int,
    teacher: Any = None,
) -> Tensor:
    """Mean loss over the completion positions of a batch.

    ``decoder`` maps input ids to final hidden states (the model without its head); ``head`` is the
    (vocab, d_model) unembedding, applied only at completion positions. ``teacher`` (distill_full) is a
    context manager factory giving the teacher's (decoder, head) (for a prompted teacher: the student's own
    base with the adapter switched off).
    """
    return _reduce(_position_losses(decoder, head, allowed, batch, objective, pad_id, teacher), batch)


def _reduce(per_position: Tensor, batch: list[Item]) -> Tensor:
    """Mean over positions, or over the marked ones when the items carry position weights."""
    if all(it.weight is None for it in batch):
        return per_position.mean()
    w = torch.cat(
        [it.weight if it.weight is not None else torch.ones(len(it.allowed_logprobs)) for it in batch]
    )
    return (per_position * w).sum() / w.sum().clamp(min=1.0)


def _position_losses(
    decoder: Any, head: Tensor, allowed: Tensor, batch: list[Item], objective: str, pad_id: int, teacher: Any
) -> Tensor:
    h, targets = completion_hidden(decoder, batch, pad_id, int(allowed[-1]))
    if objective == "distill_full":
        if teacher is None or any(it.teacher_prompt is None for it in batch):
            raise ValueError("distill_full needs the teacher (and its prompts)")
        with torch.no_grad(), teacher() as (t_decoder, t_head):
            t_prompts = [list(it.teacher_prompt or []) for it in batch]
            t_h, _ = completion_hidden(t_decoder, batch, pad_id, int(allowed[-1]), t_prompts)
            t_lp = (t_h @ t_head.T).log_softmax(-1)
        s_lp = (h @ head.T).log_softmax(-1)
        return (t_lp.exp() * (t_lp - s_lp)).sum(-1)
    if objective == "distill":
        t_lp = torch.cat([it.allowed_logprobs for it in batch])
        ok = torch.isfinite(t_lp)
        s_lp = (h @ head[allowed].T).masked_fill(~ok, float("-inf")).log_softmax(-1)
        return torch.where(ok, t_lp.exp() * (t_lp - s_lp), torch.zeros_like(t_lp)).sum(-1)
    if objective == "distill_topk":
        if any(it.topk_ids is None for it in batch):
            raise ValueError("distill_topk needs data generated with top_k > 0")
        # KL between the coarsened distributions: the teacher's top-k tokens, plus one bucket for all the rest
        t_top = torch.cat([it.topk_logprobs for it in batch])  # type: ignore[misc]
        t_ids = torch.cat([it.topk_ids for it in batch])  # type: ignore[misc]
        s_top = (h @ head.T).log_softmax(-1).gather(-1, t_ids)
        t_lp = torch.cat([t_top, _rest(t_top)], -1)
        s_lp = torch.cat([s_top, _rest(s_top)], -1)
        return (t_lp.exp() * (t_lp - s_lp)).sum(-1)
    return F.cross_entropy(h @ head.T, torch.tensor(targets), reduction="none")


def _rest(top: Tensor) -> Tensor:
    """log of the probability mass outside the given log-probs, (positions, 1)."""
    return torch.log1p(-top.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-6))


def _token_map(cfg: StudentConfig, student_ids: list[int]) -> Any:
    """Teacher token id → student token id. The identity within a family; across families (another
    tokenizer) only the 13 number tokens both have can be mapped, so only constrained data and the
    objectives that live on those tokens (distill, sft) can cross."""
    teacher_ids = read_json(Path(cfg.data) / "metrics.json").get("allowed_ids", student_ids)
    if teacher_ids == student_ids:
        return lambda t: t
    if cfg.objective in ("distill_topk", "distill_full"):
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


def _save_optimizer(opt: torch.optim.Optimizer, folder: Path) -> None:
    sd = opt.state_dict()
    tensors = {f"{i}.{k}": v.contiguous() for i, st in sd["state"].items() for k, v in st.items()}
    atomic_write_bytes(folder / "optimizer.safetensors", save(tensors))
    atomic_write_text(folder / "optimizer_groups.json", json.dumps(sd["param_groups"]))


def _load_optimizer(opt: torch.optim.Optimizer, folder: Path) -> None:
    tensors = load_file(folder / "optimizer.safetensors")
    state: dict[int, dict[str, Tensor]] = {}
    for key, v in tensors.items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = v
    groups = json.loads((folder / "optimizer_groups.json").read_text())
    opt.load_state_dict({"state": state, "param_groups": groups})


def run(cfg: StudentConfig, out: str | Path, force: bool = False) -> dict[str, Any]:
    """Train (or resume, or skip) a student into ``out``; checkpoints under ``out/checkpoints/step*``."""
    from mechsub import models
    from mechsub.data import load_examples
    from mechsub.evaluate import chat_prefix
    from mechsub.generate import NumberVocab

    t0 = time.perf_counter()
    base = models.load(cfg.model)
    examples = load_examples(cfg.data)
    if cfg.max_examples:
        examples = examples[: cfg.max_examples]
    if not examples:
        raise ValueError(f"{cfg.data} has no kept examples to train on")
    with stage(out, cfg, model=base.info(), force=force) as r:
        if r.done:
            return r.metrics
        out = Path(out)
        tok = base.tokenizer
        to_student = _token_map(cfg, NumberVocab.of(tok).ids.tolist())
        teacher_lm, teacher_system = None, None
        if cfg.objective == "distill_full":
            from mechsub.data import DataConfig

            dcfg = DataConfig.from_dict(read_json(Path(cfg.data) / "config.json")["config"])
            teacher_system = dcfg.teacher_system()
            if dcfg.model != cfg.model or not cfg.lora_r:  # else: the student's base, adapter off
                teacher_lm = models.load(dcfg.model)
        weights = load_mask(cfg.mask, examples) if cfg.mask else [None] * len(examples)
        data = [
            Item(
                chat_prefix(tok, ex.prompt, None),
                [to_student(t) for t in ex.completion_ids],
                ex.allowed_logprobs,
                ex.topk_logprobs,
                ex.topk_ids,
                chat_prefix(tok, ex.prompt, teacher_system) if cfg.objective == "distill_full" else None,
                w,
            )
            for ex, w in zip(examples, weights, strict=True)
            if w is None or w.any()
        ]
        if not data:
            raise ValueError(f"the mask {cfg.mask} marks no position of {cfg.data}: nothing to train on")
        batches = _batches(len(data), cfg)
        name = f"{Path(cfg.data).name}-{cfg.objective}"
        metrics = fit(base, data, batches, cfg, out, name, teacher_lm)
        metrics["seconds_this_session"] = round(time.perf_counter() - t0, 1)
        r.finish(metrics)
        return metrics


def load_mask(path: str | Path, examples: list[Any]) -> list[Tensor]:
    """Per-example 0/1 position weights from a mask file ({"data": ..., "mask": [[0|1, ...], ...]}), checked
    against the examples it is applied to (one row per kept example, one entry per loss position)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"mask file {p} not found: make one with `mechsub divergence` or a feature filter"
        )
    try:
        rows = read_json(p)["mask"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"{p} is not a mask file (a JSON object with a 'mask' list of 0/1 rows): {e}"
        ) from None
    if len(rows) != len(examples):
        raise ValueError(f"{p} has {len(rows)} rows but the data has {len(examples)} kept examples: it was made "
                         "for other data (or another max_examples)")  # fmt: skip
    out = []
    for i, (row, ex) in enumerate(zip(rows, examples, strict=True)):
        if len(row) != len(ex.allowed_logprobs) or any(v not in (0, 1) for v in row):
            raise ValueError(
                f"{p}: row {i} must be {len(ex.allowed_logprobs)} entries of 0/1 (got {len(row)})"
            )
        out.append(torch.tensor(row, dtype=torch.float32))
    return out


def fit(
    base: Any,
    data: list[Item],
    batches: list[list[int]],
    cfg: Any,
    out: Path,
    name: str,
    teacher_lm: Any = None,
) -> dict[str, Any]:
    """The training loop shared by students and fine-tuned teachers: resumes from the last checkpoint in
    ``out/checkpoints``, writes one every ``cfg.checkpoint_every`` steps and at the end.

    ``cfg`` supplies model, objective, lora_r, lora_alpha, lr, checkpoint_every and seed.
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    from mechsub import models
    from mechsub.generate import NumberVocab

    tok = base.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    allowed = NumberVocab.of(tok).ids
    ckpts = steps_of(out)
    torch.manual_seed(cfg.seed)
    model: Any
    if cfg.lora_r:
        lcfg = LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=list(LORA_TARGETS), lora_dropout=0.0
        )
        model = (PeftModel.from_pretrained(base.model, ckpts[-1], is_trainable=True) if ckpts
                 else get_peft_model(base.model, lcfg))  # fmt: skip
        decoder = model.get_base_model().model
    else:
        if ckpts:
            base = models.load(str(ckpts[-1]))
        model = base.model
        decoder = model.model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / len(batches)))
    start = 0
    if ckpts:
        _load_optimizer(opt, ckpts[-1])
        start = int(ckpts[-1].name[4:])
        for _ in range(start):
            sched.step()
    head = model.get_output_embeddings().weight.detach()  # frozen (tied to the embeddings in SmolLM2)
    ablating = {"on": True}  # concept ablation applies to the student's forward passes, never the teacher's

    @contextmanager
    def teacher() -> Iterator[tuple[Any, Tensor]]:
        if teacher_lm is not None:
            yield teacher_lm.model.model, teacher_lm.model.get_output_embeddings().weight
        else:  # the prompted teacher is the student's own initialisation: switch the adapter off
            ablating["on"] = False
            try:
                with model.disable_adapter():
                    yield decoder, head
            finally:
                ablating["on"] = True

    ablation: Any = nullcontext()
    if getattr(cfg, "ablate", ""):
        from mechsub.sae import ablation_basis
        from mechsub.steering import edit_resid

        layer, q = ablation_basis(cfg.ablate)

        def project_out(h: Tensor) -> Tensor:
            return h - (h @ q) @ q.T if ablating["on"] else h

        ablation = edit_resid(model.get_base_model() if cfg.lora_r else model, layer, project_out)

    model.train()
    losses: list[float] = []
    n_tokens = 0
    t_train = time.perf_counter()
    bar = tqdm(range(start, len(batches)), desc=f"train {name}", initial=start, total=len(batches))
    with ablation:
        for step in bar:
            batch = [data[i] for i in batches[step]]
            loss = completion_loss(decoder, head, allowed, batch, cfg.objective, pad, teacher)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            n_tokens += sum(len(it.prompt) + len(it.completion) for it in batch)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            done = step + 1
            if done == len(batches) or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0):
                folder = out / "checkpoints" / f"step{done}"
                _checkpoint(model, folder, f"{name}-{folder.name}", cfg.model, base, opt, bool(cfg.lora_r))
    return {
        "n_examples": len(data),
        "steps": len(batches),
        "resumed_from_step": start,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "train_tokens_per_s": n_tokens / max(time.perf_counter() - t_train, 1e-9),
        "final_checkpoint": str(out / "checkpoints" / f"step{len(batches)}"),
    }


def _checkpoint(model: Any, folder: Path, name: str, base_name: str, base: Any, opt: Any, lora: bool) -> None:
    """Write a checkpoint folder atomically: adapter (or full weights), manifest, optimiser state."""
    from mechsub import models
    from mechsub.runs import atomic_dir

    with atomic_dir(folder) as tmp:
        if lora:
            model.save_pretrained(tmp)
            sha = models.sha256_file(tmp / "adapter_model.safetensors")
            manifest = {"name": name, "base": base_name, "weights_sha256": sha, "source": "lora"}
            (tmp / models.MANIFEST).write_text(json.dumps(manifest, indent=2))
        else:
            models.write_model_files(tmp, model, base.tokenizer, {"name": name, "source": "full fine-tune"})
        _save_optimizer(opt, tmp)


def steps_of(folder: str | Path) -> list[Path]:
    """A student's checkpoint folders in step order."""
    return sorted((Path(folder) / "checkpoints").glob("step*"), key=lambda p: int(p.name[4:]))
