"""Activation capture at TransformerLens hook names: batched, aligned by position, streamed to disk in shards.

Every activation has one address, its TransformerLens hook name (``blocks.3.hook_resid_post``), read by
`mechsub.hooks` from the model itself. Sequences are right-padded in batches; only the chosen
positions of each sequence are kept (by default the completion positions: the positions whose next token is a
completion token, so teacher and student line up token by token even when their prompts differ in length).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import Tensor
from tqdm.auto import tqdm

from mechsub.hooks import check, read
from mechsub.prompts import pad_right
from mechsub.runs import atomic_write_bytes, read_json, write_json


@dataclass
class Batch:
    """Sequences to run: token ids and, per sequence, the positions whose activations are kept."""

    ids: list[list[int]]
    positions: list[list[int]]

    @classmethod
    def completions(cls, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]) -> Batch:
        """Prompt + completion, keeping the positions that predict each completion token and the end."""
        ids = [list(p) + list(c) for p, c in zip(prompts, completions, strict=True)]
        # position len(prompt) - 1 predicts the first completion token, the last position predicts the end
        return cls(ids, [list(range(len(p) - 1, len(s))) for p, s in zip(prompts, ids, strict=True)])

    @classmethod
    def last(cls, ids: Sequence[Sequence[int]]) -> Batch:
        return cls([list(s) for s in ids], [[len(s) - 1] for s in ids])


def iter_activations(
    model: Any,
    batch: Batch,
    hooks: Sequence[str],
    batch_size: int = 16,
    pad_id: int = 0,
    desc: str = "capture",
) -> Iterator[dict[str, Tensor]]:
    """Yield, per chunk of ``batch_size`` sequences, {hook: (kept positions, d_model)} in sequence order.

    ``model``: a LoadedModel or a Hugging Face model; each chunk's forward stops after the last hook.
    """
    for i in tqdm(range(0, len(batch.ids), batch_size), desc=desc, leave=False):
        seqs, poss = batch.ids[i : i + batch_size], batch.positions[i : i + batch_size]
        ids, attn = pad_right(seqs, pad_id)
        rows = torch.tensor([j for j, ps in enumerate(poss) for _ in ps], dtype=torch.long)
        cols = torch.tensor([q for ps in poss for q in ps], dtype=torch.long)
        acts = read(model, ids, hooks, attention_mask=attn)
        yield {h: acts[h][rows.to(acts[h].device), cols.to(acts[h].device)].cpu() for h in hooks}


def capture(
    model: Any,
    batch: Batch,
    hooks: Sequence[str],
    out: str | Path | None = None,
    batch_size: int = 16,
    pad_id: int = 0,
) -> dict[str, Tensor]:
    """Activations at ``hooks`` for the kept positions, concatenated: {hook: (positions, ...)}.

    With ``out``, each chunk is written as a safetensors shard first (finished shards are not recomputed after
    an interruption) and the result is read back from the shards; ``index.json`` records hooks and sizes.
    """
    check(model, hooks)  # before anything is written
    if out is None:
        chunks = list(iter_activations(model, batch, hooks, batch_size, pad_id))
        return {h: torch.cat([c[h] for c in chunks]) for h in hooks}
    out = Path(out)
    n_chunks = (len(batch.ids) + batch_size - 1) // batch_size
    meta = {"hooks": list(hooks), "n_sequences": len(batch.ids), "batch_size": batch_size,
            "n_positions": sum(map(len, batch.positions))}  # fmt: skip
    if (out / "index.json").is_file() and read_json(out / "index.json") != meta:
        raise ValueError(f"{out} holds a capture of other sequences or hooks: pick another folder")
    write_json(out / "index.json", meta)
    done = {int(p.stem) for p in out.glob("*.safetensors")}
    for k in range(n_chunks):
        if k in done:
            continue
        sub = Batch(batch.ids[k * batch_size : (k + 1) * batch_size],
                    batch.positions[k * batch_size : (k + 1) * batch_size])  # fmt: skip
        (acts,) = iter_activations(model, sub, hooks, batch_size, pad_id, desc=f"capture shard {k}")
        atomic_write_bytes(out / f"{k:05d}.safetensors", save({h: v.contiguous() for h, v in acts.items()}))
    return load_shards(out)


def load_shards(folder: str | Path) -> dict[str, Tensor]:
    """The activations a capture wrote to ``folder``, concatenated in shard order.

    A damaged, foreign or missing shard raises ValueError naming it: read silently, it would hand back a
    garbage or shorter capture. Deleting a bad shard is safe (the capture recomputes just that one).
    """
    folder = Path(folder)
    if not (folder / "index.json").is_file():
        raise FileNotFoundError(f"{folder} holds no capture (no index.json)")
    meta = read_json(folder / "index.json")
    hooks = list(meta["hooks"])
    paths = sorted(folder.glob("*.safetensors"))
    if not paths:
        raise ValueError(f"{folder} holds no activation shards; capture again")
    shards = []
    for p in paths:
        try:
            shard = load_file(p)
        except Exception as e:  # safetensors raises its own SafetensorError on a damaged file
            raise ValueError(
                f"{p} is not a readable activation shard ({e}); delete it and capture again"
            ) from None
        missing = [h for h in hooks if h not in shard]
        if missing:
            raise ValueError(f"{p} has no activations at {', '.join(missing)}; delete it and capture again")
        shards.append(shard)
    out = {h: torch.cat([s[h] for s in shards]) for h in hooks}
    if "n_positions" in meta and any(len(v) != meta["n_positions"] for v in out.values()):
        raise ValueError(
            f"{folder} holds {len(out[hooks[0]])} positions in {len(paths)} shards, not the "
            f"{meta['n_positions']} its index.json records: the capture is incomplete; run it again (it resumes)"
        )
    return out


def mean_activations(
    model: Any, batch: Batch, hooks: Sequence[str], batch_size: int = 16, pad_id: int = 0
) -> dict[str, Tensor]:
    """Mean over all kept positions at each hook (streamed: nothing but the running sums is kept)."""
    sums: dict[str, Tensor] = {}
    n = 0
    for acts in iter_activations(model, batch, hooks, batch_size, pad_id, desc="means"):
        for h, v in acts.items():
            sums[h] = sums.get(h, 0) + v.double().sum(0)  # type: ignore[assignment]
        n += next(iter(acts.values())).shape[0]
    return {h: (s / n).float() for h, s in sums.items()}
