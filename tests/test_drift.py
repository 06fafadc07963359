"""The KL cost of a fine-tune on plain text, against scipy on the same logits."""

import copy

import numpy as np
import pytest
import torch
from scipy.special import log_softmax, rel_entr

from mechsub.drift import text_kl


def test_text_kl_is_zero_for_the_same_model_and_matches_scipy_for_another(tiny):
    other = copy.deepcopy(tiny.model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    windows = [[5, 9, 17, 3, 8, 2], [7, 7, 1, 30, 4, 11], [2, 3, 4, 5, 6, 7]]
    same = text_kl(tiny.model, tiny.model, windows, batch_size=2)
    assert same["mean"] == pytest.approx(0.0, abs=1e-6) and same["windows"] == 3
    got = text_kl(tiny.model, other, windows, batch_size=2)
    with torch.no_grad():  # by hand: each window alone, scipy's KL per position, positions 1.. averaged
        want = []
        for w in windows:
            ids = torch.tensor([w])
            p = log_softmax(tiny.model(input_ids=ids).logits[0, 1:].double().numpy(), axis=-1)
            q = log_softmax(other(input_ids=ids).logits[0, 1:].double().numpy(), axis=-1)
            want.append(rel_entr(np.exp(p), np.exp(q)).sum(-1).mean())
    assert got["per_window"] == pytest.approx(want, rel=1e-3)
    assert got["mean"] == pytest.approx(np.mean(want), rel=1e-3) and got["mean"] > 0
    assert got["ci95"][0] < got["mean"] < got["ci95"][1]


def test_text_kl_needs_windows_of_one_length():
    with pytest.raises(ValueError, match="one length"):
        text_kl(None, None, [[1, 2, 3], [1, 2]])
    with pytest.raises(ValueError, match="one length"):
        text_kl(None, None, [])


def test_text_kl_needs_windows_past_the_sink():
    with pytest.raises(ValueError, match="one length > 1"):
        text_kl(None, None, [[1], [2]])
