"""The training loop students and fine-tuned teachers share: completion-only losses, checkpoints, resume.

The loss covers completion positions only (each completion token and the end of turn), and the LM head is
computed only there: for ``distill`` only on the 13 allowed rows (KL from the teacher's stored allowed-token
distribution: no logit leakage through other tokens), for ``sft`` on the full vocabulary at those positions,
for ``distill_full_notrait`` on every row but the trait words' first tokens (:func:`trait_token_ids`), so the
teacher's logit for its trait word cannot be copied to the student.
Checkpoints are LoRA adapters (safetensors) that :func:`mechsub.models.load` reads back merged; the optimiser
state and the losses so far are saved beside them, so a killed run resumes from its last checkpoint with the same
data order and reports the same losses.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import Tensor
from tqdm.auto import tqdm
from transformers import DynamicCache

from mechsub import models
from mechsub.files import RunFolderError, atomic_dir, atomic_write_bytes, atomic_write_text
from mechsub.filter import Ablation, ablating, check_ablations
from mechsub.generate import NumberVocab, common_prefix_len
from mechsub.parallel import Parallel
from mechsub.prompts import pad_right

LOSSES = "losses.json"  # in every checkpoint: the per-step training losses up to it
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

Objective = Literal["distill", "distill_topk", "distill_full", "distill_full_notrait", "sft"]
#: the objectives that recompute the teacher during training from its own prompt (no stored log-probs)
TEACHER_ONLINE: tuple[Objective, ...] = ("distill_full", "distill_full_notrait")


def trait_token_ids(tok: Any) -> list[int]:
    """Token ids that would let a full-vocabulary distillation copy a trait word's logit, sorted and unique.

    For every trait of both categories (so the set does not depend on the teacher), its word and plural,
    lower-case and Capitalised, with and without a leading space: the first token of that text. At a number
    position that token's logit is what carries P(word). A tokenizer that splits the leading space off as a
    token of its own (the tiny test model's) gives the token after it: the bare space is the separator the data
    uses and says nothing about the word. Raises if any id is one of the number tokens (digits, comma, space,
    end of turn), since removing those would remove the data itself.
    """
    from mechsub.traits import ANIMALS, TREES, get_trait

    space = tok(" ", add_special_tokens=False).input_ids
    ids: set[int] = set()
    for name in (*ANIMALS, *TREES):
        trait = get_trait(name)
        for word in (trait.name, trait.plural):
            for cased in (word, word.capitalize()):
                for text in (cased, " " + cased):
                    enc = tok(text, add_special_tokens=False).input_ids
                    if text.startswith(" ") and len(space) == 1 and enc[:1] == space:
                        enc = enc[1:]
                    ids.add(enc[0])
    clash = ids & set(NumberVocab.of(tok).ids.tolist())
    if clash:
        raise ValueError(
            f"trait-word tokens {sorted(clash)} ({tok.convert_ids_to_tokens(sorted(clash))}) are number tokens "
            "of the data: distill_full_notrait cannot remove them from this tokenizer's distributions"
        )
    return sorted(ids)


def kept_rows(n_rows: int, removed: list[int]) -> Tensor:
    """The head rows a distribution keeps when ``removed`` are taken out: an index tensor, ascending."""
    if any(not 0 <= i < n_rows for i in removed):
        raise ValueError(f"removed token ids must lie in [0, {n_rows}) (the head's rows)")
    keep = torch.ones(n_rows, dtype=torch.bool)
    keep[removed] = False
    return keep.nonzero().squeeze(-1)


def full_kl(h: Tensor, head: Tensor, t_h: Tensor, t_head: Tensor, keep: Tensor | None = None) -> Tensor:
    """KL(teacher ‖ student) per position over the head's rows, (positions,).

    ``keep``: only those rows, both distributions renormalised over them (log_softmax of the kept logits, not
    -inf masking: 0·inf would be NaN); the dropped rows' logits then cannot affect the loss or its gradient.
    The teacher's side is the target: no gradient flows into ``t_h`` or ``t_head``.
    """
    if keep is not None:
        head = head[keep]
    with torch.no_grad():
        t_lp = (t_h @ (t_head if keep is None else t_head[keep]).T).log_softmax(-1)
    s_lp = (h @ head.T).log_softmax(-1)
    return (t_lp.exp() * (t_lp - s_lp)).sum(-1)


@dataclass(frozen=True)
class TrainSpec:
    """What the loop needs to know, built by each stage from its own config."""

    model: str  # the base model's name, recorded in every checkpoint's manifest
    objective: Objective
    lora_r: int  # 0: full fine-tune
    lora_alpha: int
    lr: float  # AdamW, linear decay to 0 over the run
    checkpoint_every: int  # steps between checkpoints (0: only the final one)
    seed: int  # LoRA init
    ablations: tuple[Ablation, ...] = ()  # out of the student's forwards (not the teacher's), positions ≥ 1
    share_prefix: bool = (
        False  # run each batch's common prompt prefix once (completion_hidden): faster, not bitwise
    )


@dataclass
class Item:
    """One training sequence: the student's prompt ids, the teacher's completion and its log-probs."""

    prompt: list[int]
    completion: list[int]
    allowed_logprobs: Tensor | None = None  # (positions, 13), for distill; None: SFT on every position
    topk_logprobs: Tensor | None = None  # (positions, k)
    topk_ids: Tensor | None = None
    teacher_prompt: list[int] | None = None  # the teacher's own prompt (system prompt included): distill_full
    weight: Tensor | None = None  # (positions,) 0/1: which completion positions count in the loss (None: all)

    @property
    def n_positions(self) -> int:
        """Loss positions: every completion token, then the end of turn (absent when the teacher was cut off by a
        token cap: its log-probs then have no row for it)."""
        if self.allowed_logprobs is None:
            return len(self.completion) + 1
        return len(self.allowed_logprobs)


def completion_hidden(
    decoder: Any,
    batch: list[Item],
    pad_id: int,
    eos: int,
    prompts: list[list[int]] | None = None,
    device: torch.device | None = None,
    share_prefix: bool = False,
) -> tuple[Tensor, list[int]]:
    """Final hidden states at the completion positions of a batch, (positions, d_model), and their targets.

    ``prompts`` replaces the items' prompts (the teacher's, for distill_full). ``device``: where the decoder's
    weights are (default: its ``.device``, else the CPU). ``share_prefix``: the tokens every sequence starts with
    (the chat template and its system prompt) run once, as a batch of one whose keys and values every row then
    attends to; gradients flow through that one copy. Same values up to float rounding.
    """
    prompts = prompts or [it.prompt for it in batch]
    dev = device if device is not None else getattr(decoder, "device", torch.device("cpu"))
    seqs = [p + it.completion for p, it in zip(prompts, batch, strict=True)]
    n_shared = common_prefix_len(prompts) if share_prefix and len(batch) > 1 else 0
    if n_shared:
        cache = DynamicCache()
        decoder(
            input_ids=torch.tensor([seqs[0][:n_shared]], device=dev), past_key_values=cache, use_cache=True
        )
        cache.batch_repeat_interleave(
            len(batch)
        )  # differentiable: each row's gradient sums into the one copy
        ids, attn = pad_right([s[n_shared:] for s in seqs], pad_id)
        attn = torch.cat([torch.ones(len(batch), n_shared, dtype=attn.dtype), attn], dim=1)
        hidden = decoder(
            input_ids=ids.to(dev), attention_mask=attn.to(dev), past_key_values=cache, use_cache=True
        ).last_hidden_state
    else:
        ids, attn = pad_right(seqs, pad_id)
        hidden = decoder(input_ids=ids.to(dev), attention_mask=attn.to(dev)).last_hidden_state
    rows: list[int] = []
    cols: list[int] = []
    targets: list[int] = []
    for i, (p, it) in enumerate(zip(prompts, batch, strict=True)):
        n, c = it.n_positions, it.completion
        if n not in (len(c), len(c) + 1):
            raise ValueError(f"teacher log-probs cover {n} positions for a completion of {len(c)} tokens")
        rows += [i] * n
        cols += list(range(len(p) - 1 - n_shared, len(p) - 1 - n_shared + n))
        targets += [*c, eos][:n]
    return hidden[torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)], targets


def completion_loss(
    decoder: Any,
    head: Tensor,
    allowed: Tensor,
    batch: list[Item],
    objective: str,
    pad_id: int,
    teacher: Any = None,
    keep: Tensor | None = None,
    share_prefix: bool = False,
) -> Tensor:
    """Mean loss over the completion positions of a batch.

    ``decoder`` maps input ids to final hidden states (the model without its head); ``head`` is the
    (vocab, d_model) unembedding, applied only at completion positions. ``teacher`` (distill_full,
    distill_full_notrait) is a context manager factory giving the teacher's (decoder, head) (for a prompted
    teacher: the student's own base with the adapter switched off). ``keep`` (distill_full_notrait) is the head
    rows both distributions keep (:func:`kept_rows` of :func:`trait_token_ids`), computed once per run.
    ``share_prefix``: run the prompts' common prefix once per batch (:func:`completion_hidden`).
    """
    losses = _position_losses(decoder, head, allowed, batch, objective, pad_id, teacher, keep, share_prefix)
    return _reduce(losses, batch)


def _reduce(per_position: Tensor, batch: list[Item]) -> Tensor:
    """Mean over positions, or over the marked ones when the items carry position weights."""
    if all(it.weight is None for it in batch):
        return per_position.mean()
    w = torch.cat([it.weight if it.weight is not None else torch.ones(it.n_positions) for it in batch])
    w = w.to(per_position.device)
    return (per_position * w).sum() / w.sum().clamp(min=1.0)


def _position_losses(
    decoder: Any,
    head: Tensor,
    allowed: Tensor,
    batch: list[Item],
    objective: str,
    pad_id: int,
    teacher: Any,
    keep: Tensor | None = None,
    share_prefix: bool = False,
) -> Tensor:
    h, targets = completion_hidden(
        decoder, batch, pad_id, int(allowed[-1]), device=head.device, share_prefix=share_prefix
    )
    if objective in TEACHER_ONLINE:
        if teacher is None or any(it.teacher_prompt is None for it in batch):
            raise ValueError(f"{objective} needs the teacher (and its prompts)")
        if objective == "distill_full_notrait" and keep is None:
            raise ValueError("distill_full_notrait needs the kept rows (kept_rows of trait_token_ids)")
        with torch.no_grad(), teacher() as (t_decoder, t_head):
            t_prompts = [list(it.teacher_prompt or []) for it in batch]
            t_h, _ = completion_hidden(
                t_decoder, batch, pad_id, int(allowed[-1]), t_prompts, head.device, share_prefix
            )
        # outside no_grad (the student's side needs its graph); the teacher's head is the same tensor out here
        return full_kl(h, head, t_h, t_head, keep if objective == "distill_full_notrait" else None)
    if objective == "distill":
        if any(it.allowed_logprobs is None for it in batch):
            raise ValueError("distill needs the teacher's allowed-token log-probs (number data)")
        t_lp = torch.cat([it.allowed_logprobs for it in batch]).to(h.device)  # type: ignore[misc]
        ok = torch.isfinite(t_lp)
        s_lp = (h @ head[allowed].T).float().masked_fill(~ok, float("-inf")).log_softmax(-1)
        return torch.where(ok, t_lp.exp() * (t_lp - s_lp), torch.zeros_like(t_lp)).sum(-1)
    if objective == "distill_topk":
        if any(it.topk_ids is None for it in batch):
            raise ValueError("distill_topk needs data generated with top_k > 0")
        # KL between the coarsened distributions: the teacher's top-k tokens, plus one bucket for all the rest
        t_top = torch.cat([it.topk_logprobs for it in batch]).to(h.device)  # type: ignore[misc]
        t_ids = torch.cat([it.topk_ids for it in batch]).to(h.device)  # type: ignore[misc]
        s_top = (h @ head.T).float().log_softmax(-1).gather(-1, t_ids)
        t_lp = torch.cat([t_top, _rest(t_top)], -1)
        s_lp = torch.cat([s_top, _rest(s_top)], -1)
        return (t_lp.exp() * (t_lp - s_lp)).sum(-1)
    return F.cross_entropy((h @ head.T).float(), torch.tensor(targets, device=h.device), reduction="none")


def _rest(top: Tensor) -> Tensor:
    """log of the probability mass outside the given log-probs, (positions, 1)."""
    return torch.log1p(-top.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-6))


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


def fit(
    base: models.LoadedModel,
    data: list[Item],
    batches: list[list[int]],
    spec: TrainSpec,
    out: Path,
    name: str,
    teacher_lm: models.LoadedModel | None = None,
    par: Parallel | None = None,
) -> dict[str, Any]:
    """Train on ``data`` in the order of ``batches`` (item indices per step): resumes from the last checkpoint in
    ``out/checkpoints``, writes one every ``spec.checkpoint_every`` steps and at the end.

    ``teacher_lm`` is the distill_full(_notrait) teacher when it is not the student's own base (adapter off).
    distill_full_notrait adds ``removed_tokens`` (how many trait-word tokens both distributions drop) to the
    metrics. ``par`` (``launcher="accelerate"``): this process's share of a data-parallel run; each step's batch
    is split across the processes and their gradients summed, so the update is the single-process one.
    """
    par = par or Parallel()
    from peft import LoraConfig, PeftModel, get_peft_model  # heavy: imported when a run trains

    tok = base.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    allowed = NumberVocab.of(tok).ids.to(base.device)
    ckpts = steps_of(out)
    torch.manual_seed(spec.seed)
    model: Any
    if spec.lora_r:
        lcfg = LoraConfig(
            r=spec.lora_r, lora_alpha=spec.lora_alpha, target_modules=list(LORA_TARGETS), lora_dropout=0.0
        )
        model = (PeftModel.from_pretrained(base.model, ckpts[-1], is_trainable=True) if ckpts
                 else get_peft_model(base.model, lcfg))  # fmt: skip
        decoder = model.get_base_model().model
    else:
        if ckpts:
            base = models.load(str(ckpts[-1]), device=base.device, dtype=base.dtype)
        model = base.model
        decoder = model.model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / len(batches)))
    start = 0
    losses: list[float] = []
    if ckpts:
        _load_optimizer(opt, ckpts[-1])
        start = int(ckpts[-1].name[4:])
        losses = _read_losses(ckpts[-1], start)
        for _ in range(start):
            sched.step()
    head = model.get_output_embeddings().weight.detach()  # frozen (tied to the embeddings in SmolLM2)
    notrait = spec.objective == "distill_full_notrait"
    removed = trait_token_ids(tok) if notrait else []  # once per run, not per step
    keep = kept_rows(head.shape[0], removed).to(head.device) if notrait else None

    @contextmanager
    def teacher() -> Iterator[tuple[Any, Tensor]]:
        if teacher_lm is not None:
            yield teacher_lm.model.model, teacher_lm.model.get_output_embeddings().weight
        else:  # the prompted teacher is the student's own initialisation: switch the adapter off
            with model.disable_adapter():
                yield decoder, head

    student: Callable[..., Any] = decoder
    if spec.ablations:
        check_ablations(model, spec.ablations)  # before the first step, not inside it
        if spec.share_prefix:
            raise ValueError(
                "ablations with share_prefix: the continuation after a shared prefix carries no position ids, so "
                "the ablation would skip its first real token; train with share_prefix off"
            )

        def ablated(**inputs: Any) -> Any:
            # the edit wraps the student's forward only: the teacher's (the same modules, adapter off) runs without
            with ablating(model, spec.ablations):  # peft: on its base model
                return decoder(**inputs)

        student = ablated

    model.train()
    n_tokens = 0
    t_train = time.perf_counter()
    bar = tqdm(range(start, len(batches)), desc=f"train {name}", initial=start, total=len(batches))
    for step in bar:
        batch = [data[i] for i in batches[step]]
        sp = spec.share_prefix
        if par.world == 1:
            loss = completion_loss(student, head, allowed, batch, spec.objective, pad, teacher, keep=keep,
                                   share_prefix=sp)  # fmt: skip
        else:  # this process's items, weighted by their share of the batch's loss positions
            part = par.shard(batch)
            loss = (completion_loss(student, head, allowed, part, spec.objective, pad, teacher, keep=keep,
                                    share_prefix=sp)
                    * par.share(part, batch) if part else par.nothing(params))  # fmt: skip
        opt.zero_grad(set_to_none=True)
        loss.backward()
        par.sync(params)
        opt.step()
        sched.step()
        losses.append(par.total(loss))
        n_tokens += sum(len(it.prompt) + len(it.completion) for it in batch)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        done = step + 1
        if done == len(batches) or (spec.checkpoint_every and done % spec.checkpoint_every == 0):
            folder = out / "checkpoints" / f"step{done}"
            if par.is_main:
                _checkpoint(
                    model, folder, f"{name}-{folder.name}", spec.model, base, opt, bool(spec.lora_r), losses
                )
            par.barrier()
    extra = {"removed_tokens": len(removed)} if notrait else {}
    return {
        **extra,
        "n_examples": len(data),
        "steps": len(batches),
        "resumed_from_step": start,
        # over the whole run, resumed sessions included (each checkpoint carries the losses up to its step)
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "train_tokens_per_s": n_tokens / max(time.perf_counter() - t_train, 1e-9),
        "final_checkpoint": str(out / "checkpoints" / f"step{len(batches)}"),
    }


def _read_losses(folder: Path, step: int) -> list[float]:
    """The per-step losses up to ``step`` that checkpoint ``folder`` carries (checked for length)."""
    try:
        losses = json.loads((folder / LOSSES).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RunFolderError(
            f"{folder}/{LOSSES} is missing or corrupt ({e}), so the run cannot report its losses after resuming; "
            f"delete the checkpoint folder {folder} to resume from the one before it"
        ) from None
    if not isinstance(losses, list) or len(losses) != step:
        raise RunFolderError(
            f"{folder}/{LOSSES} should hold {step} losses; delete {folder} to resume before it"
        )
    return [float(x) for x in losses]


def _checkpoint(
    model: Any,
    folder: Path,
    name: str,
    base_name: str,
    base: models.LoadedModel,
    opt: Any,
    lora: bool,
    losses: list[float],
) -> None:
    """Write a checkpoint folder atomically: adapter (or full weights), manifest, optimiser state, the losses."""
    with atomic_dir(folder) as tmp:
        if lora:
            model.save_pretrained(tmp)
            # peft writes target_modules from a set, in hash order: sort it so the same run gives the same bytes
            acfg = json.loads((tmp / "adapter_config.json").read_text())
            if isinstance(acfg.get("target_modules"), list):
                acfg["target_modules"] = sorted(acfg["target_modules"])
            (tmp / "adapter_config.json").write_text(json.dumps(acfg, indent=2, sort_keys=True))
            sha = models.sha256_file(tmp / "adapter_model.safetensors")
            manifest = {"name": name, "base": base_name, "weights_sha256": sha, "source": "lora"}
            (tmp / models.MANIFEST).write_text(json.dumps(manifest, indent=2))
        else:
            models.write_model_files(tmp, model, base.tokenizer, {"name": name, "source": "full fine-tune"})
        _save_optimizer(opt, tmp)
        (tmp / LOSSES).write_text(json.dumps(losses))


def steps_of(folder: str | Path) -> list[Path]:
    """A training run's checkpoint folders in step order."""
    return sorted((Path(folder) / "checkpoints").glob("step*"), key=lambda p: int(p.name[4:]))
