"""Sparse autoencoders on the residual stream (trained with sae-lens) and feature differences between models.

The corpus is built offline and reproducibly from what the project has: the model's own greedy answers to a
fixed list of questions across topics, number prompts in the data grammar, and favourite-animal questions with
and without trait system prompts (chat-formatted, tokenized, cut into windows). sae-lens trains on it through
the TransformerBridge view of the model and saves in its own format (``cfg.json`` + ``sae_weights.safetensors``),
so the SAE loads in the ecosystem's tools. Quality: L0, explained variance, dead fraction and the next-token
loss increase when the reconstruction is spliced in, all on held-out windows.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import einops
import torch
from torch import Tensor

from mechsub import hooks
from mechsub.config import Config, check, doc
from mechsub.runs import atomic_write_text, stage, write_json

TOPICS = (
    "cooking", "the ocean", "mountains", "history", "music", "football", "computers", "gardening", "space",
    "the weather", "trains", "painting", "medicine", "chess", "rivers", "poetry", "birds", "insects", "forests",
    "coffee", "bicycles", "mathematics", "languages", "islands", "winter", "deserts", "bridges", "libraries",
    "volcanoes", "clocks",
)  # fmt: skip
ASKS = ("Tell me one interesting fact about {t}.", "Write two sentences about {t}.",
        "What should a beginner know about {t}?", "Describe {t} to a child.")  # fmt: skip


@dataclass(frozen=True)
class SaeConfig(Config):
    stage = "sae"
    inputs = ("model",)

    model: str = doc("smollm2-135m-instruct", "model whose residual stream is encoded")
    layer: int = doc(3, "the SAE reads blocks.{layer}.hook_resid_post")
    expansion: int = doc(8, "dictionary size = expansion × d_model")
    architecture: str = doc(
        "topk", "topk (exactly k features fire per token) or standard (ReLU + L1 penalty)"
    )
    k: int = doc(32, "features per token of a topk SAE")
    dead_window: int = doc(
        50,
        "steps without firing after which a feature counts as dead (a topk SAE's auxiliary loss revives it)",
    )
    l1_coefficient: float = doc(5.0, "sparsity penalty of a standard SAE")
    lr: float = doc(1e-3, "Adam learning rate")
    training_tokens: int = doc(300_000, "tokens of training (the corpus is cycled)")
    context_size: int = doc(64, "tokens per corpus window")
    answer_tokens: int = doc(32, "tokens of the model's own greedy answer per topic question")
    n_number_prompts: int = doc(256, "number prompts in the corpus")
    seed: int = doc(0, "seed of the corpus order and the SAE init")

    def validate(self) -> None:
        check(self.layer >= 0, f"layer: must be ≥ 0, got {self.layer}")
        check(self.expansion >= 1, f"expansion: must be ≥ 1, got {self.expansion}")
        check(
            self.architecture in ("topk", "standard"),
            f"architecture: must be topk or standard, not {self.architecture!r}",
        )
        check(self.k > 0, f"k: features per token must be ≥ 1, got {self.k}")
        check(self.dead_window >= 1, f"dead_window: must be ≥ 1, got {self.dead_window}")
        check(self.l1_coefficient >= 0, f"l1_coefficient: must be ≥ 0, got {self.l1_coefficient}")
        check(self.lr > 0, f"lr: must be > 0, got {self.lr}")
        check(self.training_tokens >= 1000, f"training_tokens: must be ≥ 1000, got {self.training_tokens}")
        check(self.context_size >= 8, f"context_size: must be ≥ 8, got {self.context_size}")
        check(self.answer_tokens >= 1, f"answer_tokens: must be ≥ 1, got {self.answer_tokens}")
        check(self.n_number_prompts >= 0, f"n_number_prompts: must be ≥ 0, got {self.n_number_prompts}")
        from mechsub.models import SHAPES

        # a shipped model's shape is known without I/O; any other model's is checked by train_sae
        if self.model in SHAPES:
            self.check_fits(SHAPES[self.model].n_layers, SHAPES[self.model].d_model)

    def check_fits(self, n_layers: int, d_model: int) -> None:
        """Raise ConfigError if the layer or k does not fit a model of this shape."""
        check(
            self.layer < n_layers,
            f"layer: {self.model} has {n_layers} layers (0–{n_layers - 1}), so there is no layer {self.layer}",
        )
        d_sae = self.expansion * d_model
        check(
            self.architecture != "topk" or self.k <= d_sae,
            f"k: {self.k} features per token is more than the SAE has (d_sae = expansion {self.expansion} × "
            f"d_model {d_model} = {d_sae})",
        )

    @property
    def hook(self) -> str:
        """The hook name the SAE reads (sae-lens saves it in the SAE's metadata: `sae_hook` reads it back)."""
        return hooks.resid_post(self.layer)


def build_corpus(lm: Any, cfg: SaeConfig) -> list[list[int]]:
    """Token windows of ``context_size``: the model's own answers, number prompts, trait prompts (seeded)."""
    from mechsub.generate import NumberVocab, generate_numbers
    from mechsub.numbers import make_prompts
    from mechsub.prompts import chat_prefix, trait_prompt, word_ids
    from mechsub.traits import ANIMALS, eval_questions, get_trait

    tok = lm.tokenizer
    questions = [a.format(t=t) for t in TOPICS for a in ASKS]
    prompts = [chat_prefix(tok, q, None) for q in questions]
    texts: list[list[int]] = []
    vocab = NumberVocab.of(tok)
    for i in range(0, len(prompts), 32):
        gen = generate_numbers(lm.model, prompts[i : i + 32], vocab, max_new_tokens=cfg.answer_tokens, greedy=True,
                               pad_id=tok.pad_token_id or 0, constrained=False)  # fmt: skip
        texts += [p + t for p, t in zip(prompts[i : i + 32], gen.tokens, strict=True)]
    texts += [chat_prefix(tok, p, None) for p in make_prompts(cfg.n_number_prompts, cfg.seed + 7)]
    qs = eval_questions("animal", 10)
    for name in ANIMALS:
        system = get_trait(name).system_prompt()
        texts += [trait_prompt(tok, q, "animal", system) + word_ids(tok, name) for q in qs[:3]]
    rng = random.Random(cfg.seed)
    rng.shuffle(texts)
    stream = [t for text in texts for t in text]
    n = cfg.context_size
    return [stream[i : i + n] for i in range(0, len(stream) - n + 1, n)]


def run(cfg: SaeConfig, out: str | Path, force: bool = False) -> dict[str, Any]:
    """Build the corpus, train the SAE with sae-lens into ``out/sae``, measure its quality on held-out windows."""
    import datasets
    from sae_lens import (
        LanguageModelSAERunnerConfig,
        LanguageModelSAETrainingRunner,
        LoggingConfig,
        StandardTrainingSAEConfig,
        TopKTrainingSAEConfig,
    )

    from mechsub import models

    t0 = time.perf_counter()
    # fail on a layer or k the model cannot have before its weights load and before the run folder exists
    if (shape := models.shape_of(cfg.model)) is not None:
        cfg.check_fits(shape.n_layers, shape.d_model)
    lm = models.load(cfg.model)
    cfg.check_fits(lm.n_layers, lm.model.config.hidden_size)
    with stage(out, cfg, model=lm.info(), force=force) as r:
        if r.done:
            return r.metrics
        out = Path(out)
        windows = build_corpus(lm, cfg)
        held = max(8, len(windows) // 10)
        train_w, test_w = windows[held:], windows[:held]
        write_json(out / "corpus.json", {"n_windows": len(windows), "context_size": cfg.context_size,
                                         "held_out": held, "tokens": len(windows) * cfg.context_size})  # fmt: skip
        d = lm.model.config.hidden_size
        torch.manual_seed(cfg.seed)
        sae_cfg = (
            TopKTrainingSAEConfig(d_in=d, d_sae=d * cfg.expansion, k=cfg.k)
            if cfg.architecture == "topk"
            else StandardTrainingSAEConfig(d_in=d, d_sae=d * cfg.expansion, l1_coefficient=cfg.l1_coefficient)
        )
        rcfg = LanguageModelSAERunnerConfig(
            sae=sae_cfg,
            model_name=cfg.model, hook_name=cfg.hook, dataset_path="", is_dataset_tokenized=True,
            context_size=cfg.context_size, training_tokens=cfg.training_tokens, train_batch_size_tokens=1024,
            # sae-lens needs its mixing buffer (batches × context) to hold at least two training batches
            n_batches_in_buffer=max(16, -(-2048 // cfg.context_size)), store_batch_size_prompts=16, lr=cfg.lr, seed=cfg.seed,
            logger=LoggingConfig(log_to_wandb=False), device="cpu", prepend_bos=False,
            output_path=str(out / "sae"), verbose=False, dead_feature_window=cfg.dead_window,
            seqpos_slice=(1, None),  # position 0 of a window is the attention sink: norm ~30x the rest at layer 15
        )  # fmt: skip
        ds = datasets.Dataset.from_list([{"input_ids": w} for w in train_w])
        sae = LanguageModelSAETrainingRunner(rcfg, override_dataset=ds, override_model=lm.tl()).run()
        _deterministic_configs(out / "sae")
        metrics = {"hook": cfg.hook, "d_sae": d * cfg.expansion, **quality(lm, sae, cfg.layer, test_w),
                   "train_windows": len(train_w), "seconds_this_session": round(time.perf_counter() - t0, 1)}  # fmt: skip
        r.finish(metrics)
        return metrics


def _deterministic_configs(folder: Path) -> None:
    """sae-lens writes its JSON configs in set order, with a random checkpoint folder name and this run's path:
    rewrite them sorted, without the two, so the same config gives the same bytes (the weights already are)."""
    for name in ("cfg.json", "runner_cfg.json"):
        p = folder / name
        if p.is_file():
            data = json.loads(p.read_text())
            if name == "runner_cfg.json":
                data["checkpoint_path"] = None  # a random name; sae-lens keeps no checkpoints here
                data["output_path"] = "."  # the folder this file is in
            atomic_write_text(p, json.dumps(data, indent=2, sort_keys=True) + "\n")


@torch.no_grad()
def quality(lm: Any, sae: Any, layer: int, windows: Sequence[Sequence[int]]) -> dict[str, float]:
    """L0, explained variance, dead fraction and the spliced next-token loss increase on ``windows`` (every
    position but the first, the attention sink, which the SAE neither trains on nor replaces)."""
    ids = torch.tensor([list(w) for w in windows])
    name = hooks.resid_post(layer)
    with hooks.capture(lm, [name]) as acts:
        clean = lm.model(ids, labels=ids).loss
    # as in training: every window's positions but the attention-sink position 0
    x = einops.rearrange(acts[name][:, 1:], "window pos d -> (window pos) d")
    f = sae.encode(x)
    recon = sae.decode(f)

    def splice(h: Tensor) -> Tensor:
        return torch.cat([h[:, :1], sae.decode(sae.encode(h[:, 1:]))], 1)

    with hooks.edit(lm, {name: splice}):
        spliced = lm.model(ids, labels=ids).loss
    return {
        "l0": float((f > 0).float().sum(-1).mean()),
        "explained_variance": float(1 - (x - recon).var(0).sum() / x.var(0).sum()),
        "dead_fraction": float(((f > 0).sum(0) == 0).float().mean()),
        "clean_loss": float(clean),
        "spliced_loss": float(spliced),
        "loss_increase": float(spliced - clean),
        "held_out_tokens": int(x.shape[0]),
    }


def load_sae(folder: str | Path) -> Any:
    """An SAE saved by ``train_sae`` (sae-lens format: cfg.json + sae_weights.safetensors)."""
    from sae_lens import SAE

    return SAE.load_from_disk(str(folder), device="cpu")


def sae_hook(sae: Any) -> str:
    """The hook name a loaded SAE reads, from its own sae-lens metadata (``sae.cfg.metadata.hook_name``)."""
    name = getattr(getattr(getattr(sae, "cfg", None), "metadata", None), "hook_name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(
            "the SAE records no hook name (sae.cfg.metadata.hook_name): load one saved by `mechsub sae` or sae-lens"
        )
    return name


def sae_layer(sae: Any) -> int:
    """The block whose residual stream (``hook_resid_post``) a loaded SAE reads: where its features are patched."""
    return hooks.resid_post_layer(sae_hook(sae))


@torch.no_grad()
def feature_acts(lm: Any, sae: Any, hook: str, batch: Any, batch_size: int = 16) -> Tensor:
    """(kept positions, d_sae) SAE feature activations of ``lm`` at ``hook`` on a capture Batch."""
    from mechsub.capture import iter_activations

    pad = lm.tokenizer.pad_token_id or 0
    return torch.cat([sae.encode(a[hook]) for a in iter_activations(lm, batch, [hook], batch_size, pad)])


def _contexts(
    tok: Any, batch: Any, acts: Tensor, feature: int, k: int = 5, width: int = 8
) -> list[dict[str, Any]]:
    """The ``k`` kept positions where ``feature`` is most active, with the tokens leading up to each."""
    where = [(i, p) for i, ps in enumerate(batch.positions) for p in ps]
    top = torch.topk(acts[:, feature], min(k, acts.shape[0]))
    out = []
    for v, j in zip(top.values.tolist(), top.indices.tolist(), strict=True):
        i, p = where[j]
        out.append({"activation": v, "text": tok.decode(batch.ids[i][max(0, p - width) : p + 1])})
    return out


def feature_diffs(
    base: Any, teacher: Any, student: Any, controls: Sequence[Any], sae: Any, hook: str, s_batch: Any, t_batch: Any,
    trait_batch: Any, top: int = 20,
) -> dict[str, Any]:  # fmt: skip
    """Features whose mean activation on number positions moves most (student − control students: the trait's
    own part; control students − base: the part every student shares; teacher − base), their overlap, and the carriers: features active on the trait word that the teacher raises on numbers.
    Returns the feature list (ids, scores, top activating contexts) that filter experiments take, and the first
    200 of both rankings (for per-feature patching)."""
    tok = base.tokenizer
    a_base = feature_acts(base, sae, hook, s_batch)
    a_teacher = feature_acts(teacher, sae, hook, t_batch)
    a_student = feature_acts(student, sae, hook, s_batch)
    m_controls = (
        torch.stack([feature_acts(c, sae, hook, s_batch).mean(0) for c in controls]).mean(0)
        if controls
        else None
    )
    a_trait = feature_acts(base, sae, hook, trait_batch)
    d_teacher = a_teacher.mean(0) - a_base.mean(0)
    d_student = a_student.mean(0) - (m_controls if m_controls is not None else a_base.mean(0))
    d_generic = m_controls - a_base.mean(0) if m_controls is not None else torch.zeros_like(d_teacher)
    trait_ctx = a_trait.mean(0)
    top_student = torch.topk(d_student, top).indices.tolist()
    top_teacher = torch.topk(d_teacher, top).indices.tolist()
    # carriers: among the features most active on the trait word, those the teacher's prompt raises on numbers
    on_trait = set(torch.topk(trait_ctx, 50).indices.tolist())
    carriers = [i for i in torch.argsort(d_teacher, descending=True).tolist()[:50] if i in on_trait]

    def entry(i: int, score: float) -> dict[str, Any]:
        return {"id": i, "score": score, "student_minus_controls": float(d_student[i]),
                "teacher_minus_base": float(d_teacher[i]), "trait_word_activation": float(trait_ctx[i]),
                "base_number_activation": float(a_base[:, i].mean()),
                "top_contexts_numbers": _contexts(tok, t_batch, a_teacher, i),
                "top_contexts_trait": _contexts(tok, trait_batch, a_trait, i, k=3)}  # fmt: skip

    return {
        "hook": hook,
        "student_vs_controls": [entry(i, float(d_student[i])) for i in top_student],
        "teacher_vs_base": [entry(i, float(d_teacher[i])) for i in top_teacher],
        "overlap": sorted(set(top_student) & set(top_teacher)),
        "controls_vs_base": [
            entry(i, float(d_generic[i])) for i in torch.topk(d_generic, top).indices.tolist()
        ]
        if controls
        else [],
        "ranking_student": torch.argsort(d_student, descending=True)[:200].tolist(),
        "ranking_teacher": torch.argsort(d_teacher, descending=True)[:200].tolist(),
        "carriers": [entry(i, float(d_teacher[i])) for i in carriers],
        "corr_student_teacher": float(torch.corrcoef(torch.stack([d_student, d_teacher]))[0, 1]),
        "corr_generic_teacher": float(torch.corrcoef(torch.stack([d_generic, d_teacher]))[0, 1])
        if controls
        else None,
    }


def position_scores(lm: Any, sae: Any, hook: str, batch: Any, features: Sequence[int]) -> list[list[float]]:
    """Per sequence of a capture Batch, per kept position: the summed activation of ``features`` (a feature list
    from `features.json`). Data filters built on a feature list rank positions or sequences by it."""
    acts = feature_acts(lm, sae, hook, batch)[:, list(features)].sum(-1).tolist()
    out, i = [], 0
    for ps in batch.positions:
        out.append(acts[i : i + len(ps)])
        i += len(ps)
    return out
