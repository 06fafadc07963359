"""Activation capture at TransformerLens hook names: batched, aligned by position, streamed to disk in shards.

Every activation has one address, its TransformerLens hook name (``blocks.3.hook_resid_post``), read through
the TransformerBridge view of any model mechsub loads. Sequences are right-padded in batches; only the chosen
positions of each sequence are kept (by default the completion positions: the positions whose next token is a
completion token, so teacher and student line up token by token even when their prompts differ in length).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import Tensor
from tqdm.auto import tqdm

from mechsub.runs import atomic_write_bytes, read_json, write_json


class HookNameError(KeyError):
    """An unknown hook name; the message lists the closest known ones."""

    def __str__(self) -> str:
        return str(self.args[0])


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


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded (batch, width) input ids and their attention mask."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for j, s in enumerate(seqs):
        ids[j, : len(s)] = torch.tensor(list(s))
        attn[j, : len(s)] = 1
    return ids, attn


def check_hooks(tl: Any, names: Sequence[str]) -> None:
    """Raise HookNameError for any name the model does not have, with the nearest real names."""
    known = list(tl.hook_dict)
    for n in names:
        if n not in known:
            near = difflib.get_close_matches(n, known, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise HookNameError(f"unknown hook name {n!r}{hint} (e.g. blocks.0.hook_resid_post)")


def iter_activations(
    tl: Any, batch: Batch, hooks: Sequence[str], batch_size: int = 16, pad_id: int = 0, desc: str = "capture"
) -> Iterator[dict[str, Tensor]]:
    """Yield, per chunk of ``batch_size`` sequences, {hook: (kept positions, ...)} in sequence order."""
    check_hooks(tl, hooks)
    wanted = set(hooks)
    for i in tqdm(range(0, len(batch.ids), batch_size), desc=desc, leave=False):
        seqs, poss = batch.ids[i : i + batch_size], batch.positions[i : i + batch_size]
        ids, attn = pad_right(seqs, pad_id)
        rows = torch.tensor([j for j, ps in enumerate(poss) for _ in ps], dtype=torch.long)
        cols = torch.tensor([q for ps in poss for q in ps], dtype=torch.long)
        with torch.no_grad():
            _, cache = tl.run_with_cache(ids, attention_mask=attn, names_filter=lambda n: n in wanted)
        yield {h: cache[h][rows, cols].detach().clone() for h in hooks}


def capture(
    tl: Any,
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
    if out is None:
        chunks = list(iter_activations(tl, batch, hooks, batch_size, pad_id))
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
        (acts,) = iter_activations(tl, sub, hooks, batch_size, pad_id, desc=f"capture shard {k}")
        atomic_write_bytes(out / f"{k:05d}.safetensors", save({h: v.contiguous() for h, v in acts.items()}))
    return load_shards(out)


def load_shards(folder: str | Path) -> dict[str, Tensor]:
    folder = Path(folder)
    meta = read_json(folder / "index.json")
    shards = [load_file(p) for p in sorted(folder.glob("*.safetensors"))]
    return {h: torch.cat([s[h] for s in shards]) for h in meta["hooks"]}


def mean_activations(
    tl: Any, batch: Batch, hooks: Sequence[str], batch_size: int = 16, pad_id: int = 0
) -> dict[str, Tensor]:
    """Mean over all kept positions at each hook (streamed: nothing but the running sums is kept)."""
    sums: dict[str, Tensor] = {}
    n = 0
    for acts in iter_activations(tl, batch, hooks, batch_size, pad_id, desc="means"):
        for h, v in acts.items():
            sums[h] = sums.get(h, 0) + v.double().sum(0)  # type: ignore[assignment]
        n += next(iter(acts.values())).shape[0]
    return {h: (s / n).float() for h, s in sums.items()}
