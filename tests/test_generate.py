import pytest
import torch

from mechsub.filter import reject_reasons
from mechsub.generate import NumberVocab, generate_numbers, grammar_mask
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
