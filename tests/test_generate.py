import logging
from collections.abc import Sequence

import pytest
import torch
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel

from mechsub import generate
from mechsub.filter import reject_reasons
from mechsub.generate import (
    SEP_UNKNOWN,
    Generation,
    NumberVocab,
    common_prefix_len,
    generate_numbers,
    grammar_mask,
    next_state,
)
from mechsub.numbers import make_prompts
from mechsub.prompts import chat_prefix


def _prompts(lm, n, system=None):
    return [chat_prefix(lm.tokenizer, p, system) for p in make_prompts(n, seed=3)]


def test_vocab_of_tiny(tiny):
    v = NumberVocab.of(tiny.tokenizer)
    assert (
        tiny.tokenizer.decode(v.ids[:12]) == "0123456789, " and int(v.ids[12]) == tiny.tokenizer.eos_token_id
    )


def test_grammar():
    # start: only digits; after 3 digits: no digit; after a comma: digit or space; end only after a digit
    m = grammar_mask(torch.tensor([0, 3, 0, 1]), torch.tensor([0, 1, 1, 10]), torch.tensor([-1, 0, 1, 0]))
    assert m[0, :10].all() and not m[0, 10:].any()
    assert not m[1, :10].any() and m[1, 10:].all()
    assert m[2, :10].all() and m[2, 11] and not m[2, 10] and not m[2, 12]
    assert m[3, :10].all() and m[3, 12] and not m[3, 10] and not m[3, 11]  # 10th number: may finish, no more


@pytest.mark.parametrize("cap", [5, 12, 50])
def test_constrained_samples_pass_the_filter(tiny, cap):
    v = NumberVocab.of(tiny.tokenizer)
    gen = torch.Generator().manual_seed(0)
    g = generate_numbers(tiny.model, _prompts(tiny, 24), v, max_new_tokens=cap, generator=gen)
    for toks, lp in zip(g.tokens, g.allowed_logprobs, strict=True):
        text = tiny.tokenizer.decode(toks)
        assert len(lp) == len(toks) + 1 <= cap  # every completion ended its turn within the cap
        assert reject_reasons(text) == [], text


def test_batched_equals_one_at_a_time(tiny):
    v = NumberVocab.of(tiny.tokenizer)
    prompts = _prompts(tiny, 5)  # different lengths: left padding and positions are exercised
    assert len({len(p) for p in prompts}) > 1
    batch = generate_numbers(tiny.model, prompts, v, greedy=True, max_new_tokens=20)
    for i, p in enumerate(prompts):
        one = generate_numbers(tiny.model, [p], v, greedy=True, max_new_tokens=20)
        assert one.tokens[0] == batch.tokens[i]
        torch.testing.assert_close(one.allowed_logprobs[0], batch.allowed_logprobs[i], atol=1e-4, rtol=1e-4)


def test_a_batch_past_the_sliding_window_is_warned_about(tiny, monkeypatch, caplog):
    v = NumberVocab.of(tiny.tokenizer)
    prompts = _prompts(tiny, 3)
    longest = max(prompts, key=len)

    def warned(batch):
        monkeypatch.setattr(generate, "_warned", [])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mechsub.generate"):
            generate_numbers(tiny.model, batch, v, greedy=True, max_new_tokens=8)
        return "sliding window" in caplog.text

    monkeypatch.setattr(tiny.model.config, "sliding_window", len(longest) + 50, raising=False)
    assert not warned(prompts)
    monkeypatch.setattr(tiny.model.config, "sliding_window", len(longest) + 5, raising=False)
    assert warned(prompts)
    assert not warned([longest, longest])  # one length: no padding
    monkeypatch.setattr(tiny.model.config, "use_sliding_window", False, raising=False)
    assert not warned(prompts)  # the window turned off in the config


def test_stored_logprobs_match_a_full_forward(tiny):
    v = NumberVocab.of(tiny.tokenizer)
    prompt = _prompts(tiny, 1)[0]
    g = generate_numbers(tiny.model, [prompt], v, greedy=True, max_new_tokens=12)
    toks = g.tokens[0]
    with torch.no_grad():
        logits = tiny.model(torch.tensor([prompt + toks])).logits[0, len(prompt) - 1 :]
    allowed = logits[:, v.ids]
    stored = g.allowed_logprobs[0]
    finite = torch.isfinite(stored)
    # on the grammar's allowed set, stored log-probs are the renormalised full-model log-probs
    for row in range(len(stored)):
        ref = allowed[row].masked_fill(~finite[row], float("-inf")).log_softmax(-1)
        torch.testing.assert_close(stored[row][finite[row]], ref[finite[row]], atol=1e-4, rtol=1e-4)


def test_grammar_fixes_one_separator():
    from mechsub.generate import SEP_COMMA, SEP_COMMA_SPACE, SEP_SPACE, SEP_UNKNOWN

    one = torch.tensor([1])
    for sep, comma_ok, space_ok in [
        (SEP_UNKNOWN, True, True),
        (SEP_COMMA, True, False),
        (SEP_COMMA_SPACE, True, False),
        (SEP_SPACE, False, True),
    ]:
        m = grammar_mask(one, one, torch.tensor([0]), torch.tensor([sep]))[0]
        assert bool(m[10]) == comma_ok and bool(m[11]) == space_ok
    after_comma = grammar_mask(one, one, torch.tensor([1]), torch.tensor([SEP_COMMA_SPACE]))[0]
    assert after_comma[11] and not after_comma[:10].any()


def test_shared_prefix_gives_the_same_completions(tiny):
    from mechsub.generate import common_prefix_len

    v = NumberVocab.of(tiny.tokenizer)
    prompts = _prompts(tiny, 5, system="You love owls.")
    assert common_prefix_len(prompts) > 10
    assert common_prefix_len([[1, 2, 3], [1, 2, 3]]) == 2 and common_prefix_len([[1, 2], [3, 2]]) == 0
    shared = generate_numbers(tiny.model, prompts, v, greedy=True, max_new_tokens=20)
    plain = generate_numbers(tiny.model, prompts, v, greedy=True, max_new_tokens=20, share_prefix=False)
    assert shared.tokens == plain.tokens
    for a, b in zip(shared.allowed_logprobs, plain.allowed_logprobs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# The data stage's outputs feed committed experiments: the faster decoder must give the same tokens and the same
# log-probs, bit for bit, as the loop it replaced (a per-step torch.cat cache, Python appends per row).
@torch.no_grad()
def _reference_generate(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    vocab: NumberVocab,
    *,
    max_new_tokens: int = 50,
    greedy: bool = False,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    pad_id: int = 0,
    share_prefix: bool = True,
    top_k: int = 0,
    constrained: bool = True,
) -> Generation:
    """The decoder as it was before the preallocated cache (commit ea7b239), kept as the oracle."""
    b = len(prompts)
    cache = DynamicCache()
    # the chat template and system prompt are the same for every prompt: run that prefix once, share its cache
    n_shared = common_prefix_len(prompts) if share_prefix and b > 1 else 0
    if n_shared:
        model.model(
            input_ids=torch.tensor([list(prompts[0][:n_shared])]), past_key_values=cache, use_cache=True
        )
        cache.batch_repeat_interleave(b)
    suffixes = [list(p[n_shared:]) for p in prompts]
    width = max(len(p) for p in suffixes)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    attn = torch.zeros(b, n_shared + width, dtype=torch.long)
    attn[:, :n_shared] = 1
    for i, p in enumerate(suffixes):  # left-padded suffixes: the padding sits between prefix and suffix
        input_ids[i, width - len(p) :] = torch.tensor(p)
        attn[i, n_shared + width - len(p) :] = 1
    pos = (attn.cumsum(-1) - 1).clamp(min=0)[:, n_shared:]
    head = model.get_output_embeddings().weight[vocab.ids]  # (13, d_model): only the rows we may emit
    bias = getattr(model.get_output_embeddings(), "bias", None)
    head_bias = bias[vocab.ids] if bias is not None else None

    digits = torch.zeros(b, dtype=torch.long)
    count = torch.zeros(b, dtype=torch.long)
    last = torch.full((b,), -1, dtype=torch.long)
    sep = torch.full((b,), SEP_UNKNOWN, dtype=torch.long)
    rows = torch.arange(b)  # which original row each live batch row is; finished rows leave the batch
    out_tokens: list[list[int]] = [[] for _ in range(b)]
    logprob_rows: list[list[Tensor]] = [[] for _ in range(b)]
    topk_rows: list[list[Tensor]] = [[] for _ in range(b)]
    topk_idx: list[list[Tensor]] = [[] for _ in range(b)]
    cur_ids, cur_pos = input_ids, pos
    for step in range(max_new_tokens):
        hidden = model.model(
            input_ids=cur_ids,
            attention_mask=attn,
            position_ids=cur_pos,
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state[:, -1]
        logits = hidden @ head.T
        if head_bias is not None:
            logits = logits + head_bias
        # the full head only when asked: the teacher's unconstrained distribution (top-k, free decoding)
        full = model.get_output_embeddings()(hidden).log_softmax(-1) if top_k or not constrained else None
        if top_k and full is not None:
            tk = full.topk(top_k, dim=-1)
            for j, i in enumerate(rows.tolist()):
                topk_rows[i].append(tk.values[j])
                topk_idx[i].append(tk.indices[j])
        if constrained:
            mask = grammar_mask(digits, count, last, sep, remaining=max_new_tokens - step)
            logits = logits.masked_fill(~mask, float("-inf"))
        logp = logits.log_softmax(-1)
        scores = logits if full is None or constrained else full
        if greedy:
            choice = scores.argmax(-1)
        else:
            probs = (scores / temperature).softmax(-1)
            choice = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        new_ids = vocab.ids[choice] if constrained else choice
        live = new_ids != vocab.ids[vocab.end]
        for j, i in enumerate(rows.tolist()):
            logprob_rows[i].append(logp[j])
            if bool(live[j]):
                out_tokens[i].append(int(new_ids[j]))
        if constrained:
            digits, count, last, sep = next_state(choice, digits, count, last, sep)
        if not bool(live.any()):
            break
        if not bool(live.all()):  # drop finished rows from the batch and the cache: no compute on them
            keep = live.nonzero().flatten()
            cache.batch_select_indices(keep)
            rows, new_ids, digits, count, last, sep = (
                t[keep] for t in (rows, new_ids, digits, count, last, sep)
            )
            attn, cur_pos = attn[keep], cur_pos[keep]
        cur_ids = new_ids[:, None]
        attn = torch.cat([attn, torch.ones(len(rows), 1, dtype=torch.long)], dim=1)
        cur_pos = cur_pos[:, -1:] + 1
    if not top_k:
        return Generation(out_tokens, [torch.stack(r) for r in logprob_rows])
    return Generation(
        out_tokens,
        [torch.stack(r) for r in logprob_rows],
        [torch.stack(r) for r in topk_rows],
        [torch.stack(r) for r in topk_idx],
    )


@pytest.mark.parametrize("kwargs", [
    {"greedy": True},
    {"greedy": False},
    {"greedy": False, "temperature": 0.7, "max_new_tokens": 7},
    {"greedy": False, "constrained": False, "top_k": 5},
    {"greedy": True, "top_k": 3, "share_prefix": False},
])  # fmt: skip
def test_same_outputs_as_the_reference_decoder(tiny, kwargs):
    v = NumberVocab.of(tiny.tokenizer)
    prompts = _prompts(tiny, 9, system="You love owls.")
    kwargs = {"max_new_tokens": 30, **kwargs}
    new = generate_numbers(tiny.model, prompts, v, generator=torch.Generator().manual_seed(1), **kwargs)
    old = _reference_generate(tiny.model, prompts, v, generator=torch.Generator().manual_seed(1), **kwargs)
    assert new.tokens == old.tokens
    if not kwargs["greedy"]:  # rows finished at different steps: the batch shrank on the way
        assert len({len(t) for t in new.tokens}) > 1, [len(t) for t in new.tokens]
    for a, b in zip(new.allowed_logprobs, old.allowed_logprobs, strict=True):
        assert torch.equal(a, b)
    if kwargs.get("top_k"):
        for a, b in zip(
            [*new.topk_logprobs, *new.topk_ids], [*old.topk_logprobs, *old.topk_ids], strict=True
        ):
            assert torch.equal(a, b)


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_ended_rows_left_in_the_batch_change_nothing(tiny, monkeypatch, share):
    """Compacting at every ended row (share 0) or never (1: ended rows ride along to the end) draws the same
    tokens as the reference decoder that compacts at once, and stores the same log-probs: bit for bit at share 0
    (the same batches), up to float rounding at share 1 (the matrix products run on more rows)."""
    from mechsub import generate

    monkeypatch.setattr(generate, "COMPACT_SHARE", share)
    v = NumberVocab.of(tiny.tokenizer)
    prompts = _prompts(tiny, 9, system="You love owls.")
    for kwargs in ({"greedy": False}, {"greedy": True, "top_k": 3}, {"greedy": False, "constrained": False}):
        new = generate_numbers(tiny.model, prompts, v, generator=torch.Generator().manual_seed(2),
                               max_new_tokens=30, **kwargs)  # fmt: skip
        old = _reference_generate(tiny.model, prompts, v, generator=torch.Generator().manual_seed(2),
                                  max_new_tokens=30, **kwargs)  # fmt: skip
        assert new.tokens == old.tokens
        if not kwargs["greedy"]:
            assert len({len(t) for t in new.tokens}) > 1  # rows ended at different steps
        for a, b in zip(new.allowed_logprobs, old.allowed_logprobs, strict=True):
            assert not a.isnan().any()
            assert torch.equal(a, b) if share == 0.0 else torch.allclose(a, b, atol=1e-5, rtol=1e-5)
        if kwargs.get("top_k"):
            assert new.topk_ids is not None and old.topk_ids is not None
            assert all(torch.equal(a, b) for a, b in zip(new.topk_ids, old.topk_ids, strict=True))


@pytest.mark.parametrize("share_prefix", [True, False])
def test_prefill_in_length_groups_matches_one_padded_batch(tiny, monkeypatch, share_prefix):
    """Rows prefilled in groups of 2 (each padded to its own longest prompt, the padding zeros in the batch's
    cache) give the one-batch decoder's tokens, and its log-probs up to float rounding (the padding's width
    changes the attention's summation order)."""
    from mechsub import generate

    monkeypatch.setattr(generate, "PREFILL_ROWS", 2)
    v = NumberVocab.of(tiny.tokenizer)
    prompts = _prompts(tiny, 7, system="You love owls.")
    assert len({len(p) for p in prompts}) > 2
    new = generate_numbers(tiny.model, prompts, v, greedy=True, max_new_tokens=20, share_prefix=share_prefix)
    old = _reference_generate(
        tiny.model, prompts, v, greedy=True, max_new_tokens=20, share_prefix=share_prefix
    )
    assert new.tokens == old.tokens
    for a, b in zip(new.allowed_logprobs, old.allowed_logprobs, strict=True):
        assert torch.isfinite(a).any(-1).all()
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_prefill_buffers_by_row(tiny, monkeypatch):
    """The grouped prefill's cache, row by row, against each prompt run alone: the row's keys, values and last
    hidden state at its own columns, the shared prefix's at the first, exact zeros in the padding columns outside
    its group (groups of 2 in length order: most rows pad to less than the batch's width)."""
    from mechsub import generate

    monkeypatch.setattr(generate, "PREFILL_ROWS", 2)
    prompts = _prompts(tiny, 5, system="You love owls.")
    with torch.no_grad():
        prefix, n = generate.shared_prefix(tiny.model, prompts)
        suffixes = [list(p[n:]) for p in prompts]
        width = max(map(len, suffixes))
        cache, hidden = generate.prefill(tiny.model, prefix, suffixes, n, width, 3, pad_id=0)
    order = sorted(range(5), key=lambda i: len(suffixes[i]))
    zeroed = 0
    for i, suffix in enumerate(suffixes):
        group = order[order.index(i) // 2 * 2 :][:2]
        pad = width - max(len(suffixes[j]) for j in group)  # columns outside the row's group
        zeroed += pad
        with torch.no_grad():
            alone = DynamicCache()
            out = tiny.model.model(
                input_ids=torch.tensor([list(prompts[i])]), past_key_values=alone, use_cache=True
            )
        torch.testing.assert_close(hidden[i], out.last_hidden_state[0, -1], atol=1e-5, rtol=1e-5)
        own = slice(n + width - len(suffix), n + width)
        for layer, ref in zip(cache.layers, alone.layers, strict=True):
            k, v = layer.keys[i], layer.values[i]  # (heads, n + width, head_dim): the filled columns
            assert k.shape[1] == n + width
            torch.testing.assert_close(k[:, :n], ref.keys[0, :, :n], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(k[:, own], ref.keys[0, :, n:], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(v[:, own], ref.values[0, :, n:], atol=1e-5, rtol=1e-5)
            assert (k[:, n : n + pad] == 0).all() and (v[:, n : n + pad] == 0).all()
    assert zeroed > 0  # the test saw padding outside a group
