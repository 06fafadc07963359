"""Sparse autoencoders on the residual stream (trained with sae-lens) and feature differences between models.

The corpus is built offline and reproducibly from what the project has: the model's own greedy answers to a
fixed list of questions across topics, number prompts in the data grammar, and favourite-animal questions with
and without trait system prompts (chat-formatted, tokenized, cut into windows). sae-lens trains on it through
the TransformerBridge view of the model and saves in its own format (``cfg.json`` + ``sae_weights.safetensors``),
so the SAE loads in the ecosystem's tools. Quality: L0, explained variance, dead fraction and the next-token
loss increase when the reconstruction is spliced in, all on held-out windows.

With ``corpus`` set (a `mechsub corpus` folder) the SAE reads that corpus instead: its activations are cached on
disk first (`mechsub.actcache`: one forward for several layers, memory-mapped shards; position 0 of every
window, the attention sink, left out), and sae-lens's own SAE classes and training loop (``SAETrainer``) train
from the cache in seeded shuffled batches. The corpus's last ``held_out_windows`` windows are never trained on;
on them the stage reports explained variance, L0 and the dead fraction (every held-out token), and the
next-token loss with the reconstruction spliced in against the clean and the zero-ablated residual
(``ce_recovered``).
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import einops
import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from mechsub import hooks
from mechsub.config import Config, check, doc
from mechsub.runs import atomic_write_text, read_json, stage, write_json

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
    inputs = ("model", "corpus", "cache")

    model: str = doc("smollm2-135m-instruct", "model whose residual stream is encoded")
    layer: int = doc(3, "the SAE reads blocks.{layer}.hook_resid_post")
    expansion: int = doc(8, "dictionary size = expansion × d_model")
    architecture: str = doc(
        "topk",
        "topk (exactly k features fire per token), batchtopk (k per token on average over a batch) or "
        "standard (ReLU + L1 penalty)",
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
    corpus: str = doc("", "a `mechsub corpus` folder; empty: today's small built-in corpus", optional=True)
    cache: str = doc(
        "", "with a corpus: an activation cache of it holding this layer (`mechsub actcache`); empty: the "
        "stage caches the windows it needs itself and deletes them when done", optional=True,
    )  # fmt: skip
    held_out_windows: int = doc(
        256, "with a corpus: its last windows, never trained on, for the quality figures (a cache brings "
        "its own, which must agree)", optional=True,
    )  # fmt: skip
    ce_windows: int = doc(
        32, "with a corpus: held-out windows for the next-token loss figures", optional=True
    )
    batch_tokens: int = doc(1024, "activations per SAE training step", optional=True)
    lr_decay: float = doc(
        0.2, "with a corpus: the last fraction of the steps, over which the learning rate falls linearly to 0",
        optional=True,
    )  # fmt: skip
    cache_dtype: str = doc(
        "float16", "with a corpus and no cache: dtype of the stage's own cache", optional=True
    )
    sink_norm_ratio: float = doc(
        10.0, "with a corpus: tokens whose residual norm exceeds this × the median token norm (massive "
        "activations: secondary attention sinks such as <|endoftext|> inside a window, ~2% of tokens at layer 15, "
        "78× the median norm) are left out of training and of the quality figures and never spliced; 0: keep all",
        optional=True,
    )  # fmt: skip

    def validate(self) -> None:
        check(self.layer >= 0, f"layer: must be ≥ 0, got {self.layer}")
        check(self.expansion >= 1, f"expansion: must be ≥ 1, got {self.expansion}")
        check(
            self.architecture in ("topk", "batchtopk", "standard"),
            f"architecture: must be topk, batchtopk or standard, not {self.architecture!r}",
        )
        check(not self.cache or bool(self.corpus), "cache: a cache is read with its corpus: set corpus too")
        check(self.held_out_windows >= 1, f"held_out_windows: must be ≥ 1, got {self.held_out_windows}")
        check(
            1 <= self.ce_windows <= self.held_out_windows,
            f"ce_windows: must be in 1..held_out_windows ({self.held_out_windows}), got {self.ce_windows}",
        )
        check(self.batch_tokens >= 1, f"batch_tokens: must be ≥ 1, got {self.batch_tokens}")
        check(0 <= self.lr_decay < 1, f"lr_decay: must be in [0, 1), got {self.lr_decay}")
        check(
            self.cache_dtype in ("float16", "float32"),
            f"cache_dtype: float16 or float32, not {self.cache_dtype!r}",
        )
        check(
            self.sink_norm_ratio == 0 or self.sink_norm_ratio > 1,
            f"sink_norm_ratio: 0 (keep every token) or > 1 (× the median norm), got {self.sink_norm_ratio}",
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
            self.architecture == "standard" or self.k <= d_sae,
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
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig

    from mechsub import models

    if cfg.corpus:
        return _run_corpus(cfg, out, force)
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
        sae_cfg = training_sae_config(cfg, d)
        rcfg = LanguageModelSAERunnerConfig(
            sae=sae_cfg,
            model_name=cfg.model, hook_name=cfg.hook, dataset_path="", is_dataset_tokenized=True,
            context_size=cfg.context_size, training_tokens=cfg.training_tokens,
            train_batch_size_tokens=cfg.batch_tokens,
            # sae-lens needs its mixing buffer (batches × context) to hold at least two training batches
            n_batches_in_buffer=max(16, -(-2 * cfg.batch_tokens // cfg.context_size)), store_batch_size_prompts=16, lr=cfg.lr, seed=cfg.seed,
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


def training_sae_config(cfg: SaeConfig, d_model: int, normalize: str = "none") -> Any:
    """The sae-lens training config of ``cfg``'s architecture (its defaults otherwise: TopK and BatchTopK bring
    sae-lens's auxiliary loss for dead latents, AuxK with coefficient 1)."""
    from sae_lens import BatchTopKTrainingSAEConfig, StandardTrainingSAEConfig, TopKTrainingSAEConfig

    d_sae = d_model * cfg.expansion
    if cfg.architecture == "topk":
        return TopKTrainingSAEConfig(d_in=d_model, d_sae=d_sae, k=cfg.k, normalize_activations=normalize)
    if cfg.architecture == "batchtopk":
        return BatchTopKTrainingSAEConfig(d_in=d_model, d_sae=d_sae, k=cfg.k, normalize_activations=normalize)
    return StandardTrainingSAEConfig(d_in=d_model, d_sae=d_sae, l1_coefficient=cfg.l1_coefficient,
                                     normalize_activations=normalize)  # fmt: skip


def train_from_cache(
    acts: Any, cfg: SaeConfig, out: str | Path | None, *, model_name: str = "", tokens: int | None = None,
    normalize: str = "expected_average_only_in",
) -> tuple[Any, dict[str, Any]]:  # fmt: skip
    """Train ``cfg``'s SAE with sae-lens's ``SAETrainer`` on a :class:`~mechsub.actcache.CachedActivations`
    (seeded shuffled batches, epochs repeat when ``tokens`` exceed the cache); save it in sae-lens's format
    into ``out`` (unless None). ``normalize``: sae-lens scales the inputs to norm √d_model while training (the
    same learning rate then suits every layer) and folds the scale into the weights at the end.
    Returns the SAE and its training figures (tokens, seconds, tokens/s)."""
    from sae_lens import LoggingConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.registry import get_sae_training_class
    from sae_lens.training.sae_trainer import SAETrainer
    from safetensors.torch import save_file

    tokens = cfg.training_tokens if tokens is None else tokens
    torch.manual_seed(cfg.seed)
    sae_cfg = training_sae_config(cfg, acts.d_model, normalize)
    sae = get_sae_training_class(cfg.architecture)[0](sae_cfg)
    meta = sae.cfg.metadata
    meta.hook_name, meta.model_name, meta.dataset_path = cfg.hook, model_name or cfg.model, cfg.corpus
    meta.context_size, meta.seqpos_slice, meta.prepend_bos = acts.index["context_size"], (1, None), False
    steps = tokens // cfg.batch_tokens
    tcfg = SAETrainerConfig(
        total_training_samples=tokens, train_batch_size_samples=cfg.batch_tokens, lr=cfg.lr, lr_end=cfg.lr,
        lr_decay_steps=int(cfg.lr_decay * steps), dead_feature_window=cfg.dead_window, device="cpu",
        logger=LoggingConfig(log_to_wandb=False),
    )  # fmt: skip
    # statistics from a fixed sample of the cache (evenly spaced rows): the sink threshold, the input scale
    # sae-lens would estimate from its first batches, and the mean as the decoder bias's start (sae-lens 6 starts
    # it at 0; a residual stream's mean is large, and a short run would spend its first hundreds of steps on it)
    sample = acts.rows(np.linspace(0, len(acts) - 1, min(len(acts), 32_768)).astype(np.int64))
    threshold = sink_threshold(sample, cfg.sink_norm_ratio)
    sample = sample[not_sinks(sample, threshold)]
    batches = acts.batches(cfg.batch_tokens, cfg.seed)
    provider = batches if threshold is None else (b[not_sinks(b, threshold)] for b in batches)
    trainer = SAETrainer(cfg=tcfg, sae=sae, data_provider=provider)
    factor = 1.0
    if normalize == "expected_average_only_in":
        factor = float(acts.d_model**0.5 / sample.norm(dim=-1).mean())
        trainer.activation_scaler.scaling_factor = factor  # set: fit() does not estimate it again
    with torch.no_grad():
        sae.b_dec.copy_(sample.mean(0) * factor)
    t0 = time.perf_counter()
    sae = trainer.fit()
    seconds = time.perf_counter() - t0
    if out is not None:
        out = Path(out)
        sae.save_inference_model(str(out))
        save_file({"sparsity": trainer.log_feature_sparsity}, out / "sparsity.safetensors")
        write_json(
            out / SINKS_FILE, {"sink_norm_threshold": threshold, "sink_norm_ratio": cfg.sink_norm_ratio}
        )
        _deterministic_configs(out)
    figures = {"training_tokens": trainer.n_training_samples, "training_steps": trainer.n_training_steps,
               "training_seconds": round(seconds, 1), "training_tokens_per_s": round(trainer.n_training_samples / seconds, 1),
               "epochs": round(trainer.n_training_samples / len(acts), 3),
               "dead_in_training": int(trainer.dead_neurons.sum()), "sink_norm_threshold": threshold}  # fmt: skip
    sae.sink_norm_threshold = threshold
    return sae, figures


SINKS_FILE = "mechsub_sinks.json"


def sink_threshold(x: Float[Tensor, "n d"], ratio: float) -> float | None:
    """The residual norm above which a token counts as a sink (massive activation): ``ratio`` × the median norm of
    the rows ``x``; None for ``ratio`` 0 (no token is a sink)."""
    return float(ratio * x.float().norm(dim=-1).median()) if ratio else None


def not_sinks(x: Float[Tensor, "... d"], threshold: float | None) -> Tensor:
    """Boolean mask (``x``'s leading shape): the tokens whose norm is at most ``threshold`` (all, for None)."""
    if threshold is None:
        return torch.ones(x.shape[:-1], dtype=torch.bool)
    return x.float().norm(dim=-1) <= threshold


@torch.no_grad()
def reconstruction_quality(
    sae: Any, x: Float[Tensor, "n d"], batch: int = 4096, sink_norm_threshold: float | None = None
) -> dict[str, float]:
    """Explained variance (1 − Σ‖x − x̂‖² / Σ‖x − x̄‖², as sae-lens's), L0 and the dead fraction (features that
    fire on none of the ``n`` rows) of ``sae`` on the activations ``x``; with a sink threshold, on the rows at
    or below it only (``sink_share``: the share of rows left out)."""
    n_all = len(x)
    x = x[not_sinks(x, sink_norm_threshold)]
    err = torch.zeros((), dtype=torch.float64)
    s1 = torch.zeros(x.shape[1], dtype=torch.float64)
    s2 = torch.zeros((), dtype=torch.float64)
    l0 = torch.zeros((), dtype=torch.float64)
    fired: Tensor | None = None
    for i in range(0, len(x), batch):
        xb = x[i : i + batch].float()
        f = sae.encode(xb)
        err += (sae.decode(f) - xb).double().pow(2).sum()
        s1 += xb.double().sum(0)
        s2 += xb.double().pow(2).sum()
        on = f != 0
        l0 += on.sum()
        fired = on.any(0) if fired is None else fired | on.any(0)
    n = len(x)
    total = s2 - s1.pow(2).sum() / n
    assert fired is not None, "no rows"
    return {"explained_variance": float(1 - err / total), "l0": float(l0 / n),
            "dead_fraction": float((~fired).float().mean()), "mse_per_token": float(err / n),
            "quality_tokens": n, "sink_share": 1 - n / n_all}  # fmt: skip


@torch.no_grad()
def loss_recovered(
    lm: Any, sae: Any, layer: int, windows: Sequence[Sequence[int]], batch_size: int = 16,
    sink_norm_threshold: float | None = None,
) -> dict[str, float]:  # fmt: skip
    """Next-token loss (mean over every predicted token of ``windows``) with the residual after ``layer``
    clean, replaced by ``sae``'s reconstruction, and zeroed, at every position but the attention sink (0) and
    the sink tokens above ``sink_norm_threshold`` (both keep the model's own residual in either edit);
    ``ce_recovered = (zero − spliced) / (zero − clean)``: 1 is a perfect reconstruction, 0 no better than none."""
    name = hooks.resid_post(layer)

    def keep(h: Tensor) -> Tensor:
        """(batch, pos, 1): True where the model's own residual stays (position 0 and sink tokens)."""
        k = ~not_sinks(h, sink_norm_threshold)
        k[:, 0] = True
        return k[..., None]

    def spliced(h: Tensor) -> Tensor:
        return torch.where(keep(h), h, sae.decode(sae.encode(h)).to(h.dtype))

    def zero(h: Tensor) -> Tensor:
        return torch.where(keep(h), h, torch.zeros_like(h))

    sums = {"clean": 0.0, "spliced": 0.0, "zero": 0.0}
    n = 0
    for i in range(0, len(windows), batch_size):
        ids = torch.tensor([list(w) for w in windows[i : i + batch_size]], dtype=torch.long)
        k = ids.shape[0] * (ids.shape[1] - 1)
        n += k
        sums["clean"] += float(lm.model(ids, labels=ids).loss) * k
        for what, fn in (("spliced", spliced), ("zero", zero)):
            with hooks.edit(lm, {name: fn}):
                sums[what] += float(lm.model(ids, labels=ids).loss) * k
    ce = {w: v / n for w, v in sums.items()}
    return {"ce_clean": ce["clean"], "ce_spliced": ce["spliced"], "ce_zero_ablation": ce["zero"],
            "ce_recovered": (ce["zero"] - ce["spliced"]) / (ce["zero"] - ce["clean"])
            if ce["zero"] != ce["clean"] else float("nan"),
            "loss_increase": ce["spliced"] - ce["clean"], "ce_tokens": n}  # fmt: skip


def bench_cache_vs_store(
    lm: Any, windows: Sequence[Sequence[int]], cfg: SaeConfig, folder: str | Path, dtype: str = "float16"
) -> dict[str, Any]:
    """Tokens/s of the two ways to feed sae-lens on the same windows, layer, SAE and batch, in one process:
    capture once to a disk cache and train from it (``cache``), against sae-lens's own ``ActivationsStore``
    pulling activations from the model (its TransformerLens view, stopped after the layer) as it trains
    (``store``). Both train one epoch over the windows (position 0 left out); ``folder`` (deleted after) holds
    the cache. Timings only: nothing here is asserted."""
    import datasets
    from sae_lens import LoggingConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.registry import get_sae_training_class
    from sae_lens.training.activations_store import ActivationsStore
    from sae_lens.training.sae_trainer import SAETrainer

    from mechsub import actcache

    folder = Path(folder)
    context = len(windows[0])
    tokens = len(windows) * (context - actcache.SKIP) // cfg.batch_tokens * cfg.batch_tokens
    t0 = time.perf_counter()
    actcache.write_cache(lm, windows, [cfg.hook], folder, dtype=dtype, batch_size=16)
    t1 = time.perf_counter()
    acts = actcache.CachedActivations(folder, cfg.hook)
    # every row, as the store serves them (no sink filter): the same tokens on both sides
    _, fig = train_from_cache(
        acts, dataclasses.replace(cfg, sink_norm_ratio=0.0), None, tokens=tokens, normalize="none"
    )
    t2 = time.perf_counter()
    actcache.remove(folder)

    tl = lm.tl()
    store = ActivationsStore(
        model=tl, dataset=datasets.Dataset.from_dict({"input_ids": [list(w) for w in windows]}), streaming=False,
        hook_name=cfg.hook, hook_head_index=None, context_size=context, d_in=acts.d_model,
        n_batches_in_buffer=max(16, -(-2 * cfg.batch_tokens // (context - 1))), total_training_tokens=tokens,
        store_batch_size_prompts=16, train_batch_size_tokens=cfg.batch_tokens, prepend_bos=False,
        normalize_activations="none", device=torch.device("cpu"), dtype="float32", seqpos_slice=(1, None),
        disable_concat_sequences=True,
    )  # fmt: skip
    torch.manual_seed(cfg.seed)
    sae = get_sae_training_class(cfg.architecture)[0](training_sae_config(cfg, acts.d_model))
    tcfg = SAETrainerConfig(total_training_samples=tokens, train_batch_size_samples=cfg.batch_tokens, lr=cfg.lr,
                            lr_end=cfg.lr, dead_feature_window=cfg.dead_window, device="cpu",
                            logger=LoggingConfig(log_to_wandb=False))  # fmt: skip
    t3 = time.perf_counter()
    SAETrainer(cfg=tcfg, sae=sae, data_provider=store).fit()
    t4 = time.perf_counter()
    return {
        "hook": cfg.hook, "windows": len(windows), "tokens": tokens, "batch_tokens": cfg.batch_tokens,
        "cache_dtype": dtype,
        "cache": {"capture_seconds": round(t1 - t0, 2), "train_seconds": round(t2 - t1, 2),
                  "capture_tokens_per_s": round(len(windows) * context / (t1 - t0), 1),
                  "train_tokens_per_s": fig["training_tokens_per_s"],
                  "tokens_per_s": round(tokens / (t2 - t0), 1)},
        "store": {"seconds": round(t4 - t3, 2), "tokens_per_s": round(tokens / (t4 - t3), 1)},
        "ratio_cache_over_store": round((t4 - t3) / (t2 - t0), 3),
        "note": "one layer, one epoch: the cache pays its capture once for every layer it holds and every epoch; "
        "the store's mixing buffer holds back half of itself, so it runs the model on that many more rows than "
        "it serves",
    }  # fmt: skip


def _check_cache(index: dict[str, Any], cfg: SaeConfig, hook: str, what: str) -> None:
    from mechsub.actcache import corpus_id

    if index.get("corpus") != corpus_id(cfg.corpus):
        raise ValueError(
            f"the cache {cfg.cache} was made from another corpus than {cfg.corpus}: cache it again"
        )
    if hook not in index["hooks"]:
        raise ValueError(f"the cache {cfg.cache} holds {', '.join(index['hooks'])}, not {hook}")
    if what == "held_out" and index["n_windows"] != cfg.held_out_windows:
        raise ValueError(
            f"the cache {cfg.cache} holds {index['n_windows']} held-out windows, the config asks for "
            f"{cfg.held_out_windows}: set held_out_windows={index['n_windows']}"
        )


def _run_corpus(cfg: SaeConfig, out: str | Path, force: bool) -> dict[str, Any]:
    """The stage on a `mechsub corpus` folder: cache (or read a cache), train from it, measure on held-out windows."""
    from mechsub import actcache, corpus, models

    t0 = time.perf_counter()
    if (shape := models.shape_of(cfg.model)) is not None:
        cfg.check_fits(shape.n_layers, shape.d_model)
    lm = models.load(cfg.model)
    cfg.check_fits(lm.n_layers, lm.model.config.hidden_size)
    ds = corpus.load(cfg.corpus)
    rows_per_window = len(ds[0]["input_ids"]) - actcache.SKIP
    want = -(-cfg.training_tokens // rows_per_window)  # one epoch of training_tokens, when the corpus has it
    train, held = actcache.corpus_split(
        len(ds), min(want, len(ds) - cfg.held_out_windows), cfg.held_out_windows
    )
    with stage(out, cfg, model=lm.info(), force=force) as r:
        if r.done:
            return r.metrics
        out = Path(out)
        if cfg.cache:
            folder = Path(cfg.cache)
            for what in ("train", "held_out"):
                index = actcache.CachedActivations(folder / what, cfg.hook).index
            _check_cache(index, cfg, cfg.hook, what)
            if what == "held_out" and index.get("windows") != [held.start, held.stop]:
                raise ValueError(
                    f"the cache {cfg.cache} holds other held-out windows than the corpus's last ones"
                )
            capture: dict[str, Any] = {"cache": cfg.cache}
        else:
            folder = out / "cache"
            about = {"corpus": actcache.corpus_id(cfg.corpus)}
            secs = toks = 0.0
            for what, rng in (("held_out", held), ("train", train)):
                m = actcache.write_cache(lm, ds[rng.start : rng.stop]["input_ids"], [cfg.hook], folder / what,
                                         dtype=cfg.cache_dtype, about={**about, "windows": [rng.start, rng.stop]})  # fmt: skip
                secs, toks = secs + m["seconds"], toks + m["tokens_captured"]
            capture = {"cache": "own", "capture_seconds": round(secs, 1),
                       "capture_tokens_per_s": round(toks / secs, 1) if toks else None}  # fmt: skip
        acts = actcache.CachedActivations(folder / "train", cfg.hook)
        sae, figures = train_from_cache(acts, cfg, out / "sae", model_name=cfg.model)
        sae.eval()
        held_acts = actcache.CachedActivations(folder / "held_out", cfg.hook)
        thr = figures["sink_norm_threshold"]
        q = reconstruction_quality(sae, held_acts.all(), sink_norm_threshold=thr)
        ce_w = ds[held.start : held.start + cfg.ce_windows]["input_ids"]
        ce = loss_recovered(lm, sae, cfg.layer, ce_w, sink_norm_threshold=thr)
        if not cfg.cache:
            actcache.remove(folder)  # re-creatable and large: the run folder keeps only the SAE and figures
        metrics = {"hook": cfg.hook, "d_sae": sae.cfg.d_sae, "corpus": cfg.corpus, **q, **ce, **figures,
                   **capture, "train_windows": [train.start, len(acts) // rows_per_window],
                   "held_out_windows": [held.start, held.stop], "ce_windows": cfg.ce_windows,
                   "positions": "every position of a window but 0 (the attention sink)",
                   "dead_definition": f"fires on none of the {q['quality_tokens']} held-out tokens (sink tokens "
                                      f"above {thr} left out: {q['sink_share']:.2%})",
                   "seconds_this_session": round(time.perf_counter() - t0, 1)}  # fmt: skip
        r.finish(metrics)
        return metrics


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

    sae = SAE.load_from_disk(str(folder), device="cpu")
    sinks = Path(folder) / SINKS_FILE
    sae.sink_norm_threshold = read_json(sinks)["sink_norm_threshold"] if sinks.is_file() else None
    return sae


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
def feature_acts(
    lm: Any, sae: Any, hook: str, batch: Any, batch_size: int = 16, features: Sequence[int] | None = None
) -> Tensor:
    """(kept positions, d_sae) SAE feature activations of ``lm`` at ``hook`` on a capture Batch; with
    ``features``, (kept positions, len(features)): only those columns are kept, chunk by chunk, so a long
    batch never holds the whole dictionary's activations. Sink tokens (norm above the SAE's recorded
    ``sink_norm_threshold``, which it never trained on) read as all-zero rows, so rows stay aligned with
    ``batch.positions``."""
    from mechsub.capture import iter_activations

    pad = lm.tokenizer.pad_token_id or 0
    cols = list(features) if features is not None else slice(None)
    threshold = getattr(sae, "sink_norm_threshold", None)

    def encode(x: Tensor) -> Tensor:
        return sae.encode(x)[:, cols] * not_sinks(x, threshold)[:, None].to(x.dtype)

    return torch.cat([encode(a[hook]) for a in iter_activations(lm, batch, [hook], batch_size, pad)])


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
