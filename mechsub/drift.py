"""How far a fine-tune moved a model on text it never trained on: the KL cost of a defence that edits training
(concept-ablation fine-tuning) or of training at all, measured on plain text windows (e.g. the corpus's held-out
windows)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mechsub import stats
from mechsub.hooks import FIRST_POSITION


@torch.no_grad()
def text_kl(
    reference: Any, model: Any, windows: Sequence[Sequence[int]], batch_size: int = 8
) -> dict[str, Any]:
    """KL(reference ‖ model) of the next-token distributions on token windows of one length (HF causal LMs, e.g.
    the base and a student). Per window, the mean over its predictions from positions ≥ 1 (position 0, the
    attention sink, is left out as everywhere), in nats; the mean over windows with a t-interval (the unit: a
    window)."""
    lengths = {len(w) for w in windows}
    if not windows or len(lengths) != 1 or lengths.pop() <= FIRST_POSITION:
        raise ValueError(f"text_kl needs token windows of one length > {FIRST_POSITION}, at least one")
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    dev = next(model.parameters()).device
    per_window: list[float] = []
    for i in range(0, len(windows), batch_size):
        ids = torch.tensor([list(w) for w in windows[i : i + batch_size]], device=dev)
        ref = reference(input_ids=ids).logits[:, FIRST_POSITION:].float().log_softmax(-1)
        got = model(input_ids=ids).logits[:, FIRST_POSITION:].float().log_softmax(-1)
        kl = (ref.exp() * (ref - got)).sum(-1)  # (batch, positions)
        per_window += kl.mean(-1).tolist()
    mean, ci = stats.mean_ci95(per_window)
    return {"mean": mean, "ci95": ci, "per_window": per_window, "windows": len(per_window),
            "tokens_per_window": len(windows[0]), "positions": f">= {FIRST_POSITION}"}  # fmt: skip
