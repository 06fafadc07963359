"""Residual-stream activations of a corpus cached on disk, at several layers from one forward, read back
memory-mapped: the data an SAE trains on without running the model again for every layer and every epoch.

A cache folder holds one subfolder per shard of windows (``00000/``, ``00001/``, …), each with one ``.npy``
array per hook, ``(windows × (context_size − 1), d_model)`` in window-major order, and a ``done.json`` written
last (so a shard without it is recomputed after an interruption; nothing else is). Position 0 of every window
is left out: it is the attention sink (its norm is ~30× the rest at layer 15), which an SAE neither trains on
nor replaces. ``index.json`` records the hooks, the windows, dtype and layout; ``.npy`` files are read with
``allow_pickle=False``. The stage ``actcache`` caches a corpus's training windows (from its first) and its
held-out windows (its last) at once.
"""

from __future__ import annotations

import io
import logging
import math
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from mechsub import hooks
from mechsub.config import Config, check, doc
from mechsub.runs import atomic_write_bytes, read_json, stage, write_json

log = logging.getLogger(__name__)

INDEX = "index.json"
SHARD_DONE = "done.json"
DTYPES = {"float16": np.float16, "float32": np.float32}
SKIP = 1  # leading positions of every window left out (the attention sink)


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def shard_dir(folder: Path, k: int) -> Path:
    return folder / f"{k:05d}"


def _shard_done(folder: Path, k: int, hook_names: Sequence[str]) -> bool:
    d = shard_dir(folder, k)
    return (d / SHARD_DONE).is_file() and all((d / f"{h}.npy").is_file() for h in hook_names)


def write_cache(
    model: Any,
    windows: Sequence[Sequence[int]],
    hook_names: Sequence[str],
    folder: str | Path,
    *,
    dtype: str = "float16",
    batch_size: int = 16,
    shard_windows: int = 256,
    about: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Capture ``hook_names`` on every window (equal lengths) into ``folder``; finished shards are kept.

    One forward per batch reads every hook and stops after the last one. ``about`` (e.g. the corpus and which
    windows) joins the index: a folder whose index differs raises ValueError instead of mixing two captures.
    Returns the index, with this call's capture time and tokens (``seconds``, ``tokens_captured``).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype: use one of {', '.join(DTYPES)}, not {dtype!r}")
    if not windows:
        raise ValueError("no windows to capture")
    context = len(windows[0])
    if context <= SKIP or any(len(w) != context for w in windows):
        raise ValueError(f"windows must all have the same length > {SKIP} (the first has {context})")
    hooks.check(model, hook_names)  # before anything is written
    folder = Path(folder)
    hf: Any = hooks.module_of(model)
    d_model = int(hf.config.hidden_size)
    n_shards = math.ceil(len(windows) / shard_windows)
    meta = {"hooks": list(hook_names), "n_windows": len(windows), "context_size": context,
            "positions": f"{SKIP}:{context} of every window (position 0, the attention sink, left out)",
            "rows_per_window": context - SKIP, "rows": len(windows) * (context - SKIP), "d_model": d_model,
            "dtype": dtype, "shard_windows": shard_windows, "n_shards": n_shards,
            "layout": "SHARD/HOOK.npy: (windows × rows_per_window, d_model), window-major", **(about or {})}  # fmt: skip
    if (folder / INDEX).is_file() and read_json(folder / INDEX) != meta:
        raise ValueError(f"{folder} holds a capture of other windows, hooks or settings: pick another folder")
    write_json(folder / INDEX, meta)
    np_dtype = DTYPES[dtype]
    t0, tokens = time.perf_counter(), 0
    todo = [k for k in range(n_shards) if not _shard_done(folder, k, hook_names)]
    for k in tqdm(todo, desc="activation cache", leave=False):
        ws = windows[k * shard_windows : (k + 1) * shard_windows]
        parts: dict[str, list[np.ndarray]] = {h: [] for h in hook_names}
        ts = time.perf_counter()
        for i in range(0, len(ws), batch_size):
            ids = torch.tensor([list(w) for w in ws[i : i + batch_size]], dtype=torch.long)
            with torch.no_grad():
                acts = hooks.read(model, ids, hook_names)
            for h in hook_names:
                a = acts[h][:, SKIP:].reshape(-1, d_model).float()
                if np_dtype is np.float16 and bool((a.abs() > 65504).any()):
                    raise ValueError(f"{h}: activations beyond float16's range; cache with dtype=float32")
                parts[h].append(a.numpy().astype(np_dtype))
        d = shard_dir(folder, k)
        for h in hook_names:
            atomic_write_bytes(d / f"{h}.npy", _npy_bytes(np.concatenate(parts[h])))
        n = len(ws) * context
        write_json(
            d / SHARD_DONE, {"windows": len(ws), "tokens": n, "seconds": round(time.perf_counter() - ts, 3)}
        )
        tokens += n
    return {**meta, "seconds": time.perf_counter() - t0, "tokens_captured": tokens}


class CachedActivations:
    """One hook's activations in a cache folder, memory-mapped (nothing is read until asked for)."""

    def __init__(self, folder: str | Path, hook: str) -> None:
        folder = Path(folder)
        if not (folder / INDEX).is_file():
            raise FileNotFoundError(f"{folder} holds no activation cache (no {INDEX})")
        self.index = read_json(folder / INDEX)
        if hook not in self.index["hooks"]:
            raise ValueError(f"{folder} caches {', '.join(self.index['hooks'])}, not {hook}")
        self.folder, self.hook = folder, hook
        self.arrays: list[np.ndarray] = []
        for k in range(self.index["n_shards"]):
            if not _shard_done(folder, k, [hook]):
                raise ValueError(
                    f"{shard_dir(folder, k)} is unfinished: the cache is incomplete; run the capture again (it resumes)"
                )
            a = np.load(shard_dir(folder, k) / f"{hook}.npy", mmap_mode="r", allow_pickle=False)
            if a.ndim != 2 or a.shape[1] != self.index["d_model"] or a.dtype != DTYPES[self.index["dtype"]]:
                raise ValueError(
                    f"{shard_dir(folder, k) / hook}.npy has shape {a.shape} {a.dtype}, not the index's"
                )
            self.arrays.append(a)
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])
        if self.offsets[-1] != self.index["rows"]:
            raise ValueError(
                f"{folder}: {self.offsets[-1]} rows in the shards, the index says {self.index['rows']}"
            )

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def d_model(self) -> int:
        return int(self.index["d_model"])

    def rows(self, idx: np.ndarray) -> Float[Tensor, "n d_model"]:
        """Rows ``idx`` (any order) as float32."""
        idx = np.asarray(idx, dtype=np.int64)
        order = np.argsort(idx, kind="stable")
        srt = idx[order]
        shard = np.searchsorted(self.offsets, srt, side="right") - 1
        out = np.empty((len(idx), self.d_model), dtype=np.float32)
        for s in np.unique(shard):
            m = shard == s
            out[order[m]] = self.arrays[s][srt[m] - self.offsets[s]]
        return torch.from_numpy(out)

    def all(self) -> Float[Tensor, "rows d_model"]:
        return torch.from_numpy(np.concatenate([np.asarray(a, dtype=np.float32) for a in self.arrays]))

    def batches(self, batch_size: int, seed: int) -> Iterator[Float[Tensor, "batch d_model"]]:
        """Endless shuffled batches: each epoch a fresh permutation of every row (numpy generator seeded by
        ``seed``), so a row comes back only after all others have; a batch's rows are read sorted (memory-map
        locality; its order does not matter to a mean loss)."""
        rng = np.random.default_rng(seed)
        n = len(self)
        if n < batch_size:
            raise ValueError(f"{self.folder}: {n} cached rows, fewer than one batch of {batch_size}")
        while True:
            perm = rng.permutation(n)
            for i in range(0, n - batch_size + 1, batch_size):
                yield self.rows(np.sort(perm[i : i + batch_size]))


# --- the stage ----------------------------------------------------------------------------------------------
def corpus_split(n_windows: int, train_windows: int, held_out_windows: int) -> tuple[range, range]:
    """Training windows (from the first) and held-out windows (the last ``held_out_windows``), disjoint."""
    if held_out_windows < 1 or train_windows < 1:
        raise ValueError("both the training and the held-out split need at least one window")
    if train_windows + held_out_windows > n_windows:
        raise ValueError(
            f"the corpus has {n_windows} windows: {train_windows} for training + {held_out_windows} held out "
            "do not fit; ask for fewer"
        )
    return range(train_windows), range(n_windows - held_out_windows, n_windows)


@dataclass(frozen=True)
class CacheConfig(Config):
    stage = "actcache"
    inputs = ("model", "corpus")

    model: str = doc("smollm2-135m-instruct", "model whose residual stream is cached")
    corpus: str = doc("runs/corpus", "a `mechsub corpus` folder")
    layers: tuple[int, ...] = doc(
        (3, 9, 15, 21, 27), "blocks.{L}.hook_resid_post cached, all from one forward"
    )
    train_windows: int = doc(4096, "training windows: the corpus's first ones")
    held_out_windows: int = doc(512, "held-out windows: the corpus's last ones, never trained on")
    dtype: str = doc("float16", "float16 or float32 on disk")
    batch_size: int = doc(16, "windows per forward")
    shard_windows: int = doc(256, "windows per shard (the unit of resumption)")

    def validate(self) -> None:
        check(bool(self.corpus), "corpus: name a `mechsub corpus` folder")
        check(bool(self.layers) and min(self.layers) >= 0, f"layers: need layers ≥ 0, got {self.layers}")
        check(len(set(self.layers)) == len(self.layers), "layers: a layer is listed twice")
        check(self.train_windows >= 1, f"train_windows: must be ≥ 1, got {self.train_windows}")
        check(self.held_out_windows >= 1, f"held_out_windows: must be ≥ 1, got {self.held_out_windows}")
        check(self.dtype in DTYPES, f"dtype: use one of {', '.join(DTYPES)}, not {self.dtype!r}")
        check(self.batch_size >= 1, f"batch_size: must be ≥ 1, got {self.batch_size}")
        check(self.shard_windows >= 1, f"shard_windows: must be ≥ 1, got {self.shard_windows}")

    @property
    def hooks(self) -> list[str]:
        return [hooks.resid_post(layer) for layer in sorted(self.layers)]


def corpus_id(folder: str | Path) -> str:
    """What a cache records about the corpus it read: the content id of the finished corpus run."""
    from mechsub.runs import content_id

    cid = content_id(str(folder))
    if cid is None:
        raise FileNotFoundError(f"the corpus {folder} does not exist")
    return cid


def run(cfg: CacheConfig, out: str | Path, force: bool = False) -> dict[str, Any]:
    """Cache the corpus's training and held-out windows at every layer of ``cfg`` into ``out/train`` and
    ``out/held_out`` (resumable per shard)."""
    from mechsub import corpus, models

    lm = models.load(cfg.model)
    check(
        max(cfg.layers) < lm.n_layers,
        f"layers: {cfg.model} has {lm.n_layers} layers, not {max(cfg.layers) + 1}",
    )
    ds = corpus.load(cfg.corpus)
    train, held = corpus_split(len(ds), cfg.train_windows, cfg.held_out_windows)
    with stage(out, cfg, model=lm.info(), force=force) as r:
        if r.done:
            return r.metrics
        out = Path(out)
        about = {"corpus": corpus_id(cfg.corpus)}
        figures = {}
        for name, rng in (("held_out", held), ("train", train)):
            ws = ds[rng.start : rng.stop]["input_ids"]
            m = write_cache(lm, ws, cfg.hooks, out / name, dtype=cfg.dtype, batch_size=cfg.batch_size,
                            shard_windows=cfg.shard_windows, about={**about, "windows": [rng.start, rng.stop]})  # fmt: skip
            figures[name] = {"windows": len(ws), "rows": m["rows"], "tokens_captured": m["tokens_captured"],
                             "seconds_this_session": m["seconds"]}  # fmt: skip
        metrics = {"hooks": cfg.hooks, "dtype": cfg.dtype, **figures,
                   "bytes": sum(p.stat().st_size for p in out.rglob("*.npy"))}  # fmt: skip
        if figures["train"]["tokens_captured"]:  # all captured in this session: a throughput figure
            t = sum(f["seconds_this_session"] for f in figures.values())
            tokens = sum(f["tokens_captured"] for f in figures.values())
            # a tiny cache can take less than the clock's resolution: no rate then rather than a division by 0
            metrics["capture_tokens_per_s"] = round(tokens / t, 1) if t > 0 else None
        for f in figures.values():
            f["seconds_this_session"] = round(f["seconds_this_session"], 1)
        r.finish(metrics)
        return metrics


def remove(folder: str | Path) -> None:
    """Delete a cache folder (one a stage made for itself once it is done with it)."""
    folder = Path(folder)
    if (folder / INDEX).is_file() or any(folder.glob("*/" + INDEX)):
        shutil.rmtree(folder)
