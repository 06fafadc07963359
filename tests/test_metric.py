import pytest
import torch

from mechsub import hooks, prompts
from mechsub.metric import TraitMetric, score_words
from mechsub.prompts import trait_prompt

Q = "Name your favorite animal using only one word."


def _naive(model, prompt, ids):
    """log P of each token of the word after the prompt, from one forward over prompt + word, summed."""
    with torch.no_grad():
        lp = model(torch.tensor([prompt + list(ids)])).logits[0].log_softmax(-1)
    return sum(float(lp[len(prompt) - 1 + j, t]) for j, t in enumerate(ids))


def test_metric_sums_every_token_of_the_word(tiny):
    tok = tiny.tokenizer
    prompt = trait_prompt(tok, Q, "animal")
    m = TraitMetric.of(tok, "owl")
    # the tiny tokenizer has one token per character: the first token is the space, shared by every word
    assert m.tokens == (" ", "o", "w", "l") and m.info()["token_ids"] == list(m.ids) and len(m.ids) == 4
    with torch.no_grad():
        one = float(m.score(tiny.model, prompt))
    assert one == pytest.approx(_naive(tiny.model, prompt, m.ids), abs=1e-5)
    words = ["owl", "elephant", "ox"]
    batched = score_words(tiny.model, prompt, [TraitMetric.of(tok, w) for w in words])
    with torch.no_grad():
        single = [float(TraitMetric.of(tok, w).score(tiny.model, prompt)) for w in words]
    assert batched.tolist() == pytest.approx(single, abs=1e-4)


def test_metric_is_differentiable_at_any_hook(tiny):
    m = TraitMetric.of(tiny.tokenizer, "owl")
    prompt = trait_prompt(tiny.tokenizer, Q, "animal")
    name = hooks.resid_post(0)
    with hooks.capture(tiny, [name], detach=False) as acts:
        lp = m.score(tiny.model, prompt)
    (g,) = torch.autograd.grad(lp, [acts[name]])
    assert g.shape == (1, len(m.inputs(prompt)), 64)
    # every position the word's tokens are predicted from gets gradient, including the word's own
    assert (g[0, -len(m.ids) :].norm(dim=-1) > 0).all()
    # first order: moving the residual along the gradient raises the score by about eps·|g|²
    eps = 1e-3 / float(g.norm())
    with torch.no_grad(), hooks.edit(tiny, {name: lambda h: h + eps * g}):
        moved = float(m.score(tiny.model, prompt))
    assert moved - float(lp) == pytest.approx(eps * float(g.norm()) ** 2, rel=0.05)


@pytest.mark.slow
def test_smollm2_owl_is_one_token_otter_two_and_patching_scores_what_evaluation_does(smol):
    from mechsub import patching
    from mechsub.evaluate import trait_logprobs

    tok = smol.tokenizer
    assert TraitMetric.of(tok, "owl").tokens == (" owl",)  # owl numbers did not move with the metric
    otter = TraitMetric.of(tok, "otter")
    assert otter.tokens == (" ot", "ter")
    ev = float(trait_logprobs(smol.model, tok, [Q], ["otter"], "animal")[0, 0])
    scan = patching.patch_scan(smol, smol, tok, [Q], "otter", "animal", [3])
    assert scan["target_logp"] == pytest.approx(ev, abs=1e-3)
    assert scan["patched_logp_by_layer"][0] == pytest.approx(ev, abs=1e-3)  # its own residual: nothing moves


@pytest.mark.parametrize("lead", ["", " "])
def test_metric_of_a_word_that_starts_the_answer(tiny, lead):
    """The plain frame's metric: the capitalised word as the answer's first word, with the lead the prompt needs."""
    tok = tiny.tokenizer
    prompt = prompts.chat_prefix(tok, Q, None)
    m = TraitMetric.of(tok, "Owl", lead)
    assert m.tokens == (*([" "] if lead else []), "O", "w", "l") and m.word == "Owl"
    assert list(m.ids) == tok(lead + "Owl", add_special_tokens=False).input_ids
    with torch.no_grad():
        assert float(m.score(tiny.model, prompt)) == pytest.approx(
            _naive(tiny.model, prompt, m.ids), abs=1e-5
        )
    one = TraitMetric.of(tok, "A", lead)  # one token without a lead: scored from the prompt's forward alone
    fast = score_words(tiny.model, prompt, [m, one, TraitMetric.of(tok, "owl")])
    assert fast[:2].tolist() == pytest.approx([_naive(tiny.model, prompt, x.ids) for x in (m, one)], abs=1e-4)
    assert abs(float(fast[0]) - float(fast[2])) > 1e-3  # " owl" is another string


def test_batched_scores_equal_one_prompt_at_a_time(tiny):
    """Left-padded batches (prompts of different lengths, multi-token words) score as each prompt alone."""
    from mechsub.metric import score_prompts

    tok = tiny.tokenizer
    metrics = [TraitMetric.of(tok, w) for w in ("owl", "otter", "ox", "kangaroo")]  # 1 to 9 characters
    prompts = [
        trait_prompt(tok, q, "animal") for q in ("Best?", "Which animal do you like best of all?", "Hm")
    ]
    with torch.no_grad():
        alone = torch.stack([torch.stack([m.score(tiny.model, p) for m in metrics]) for p in prompts])
    for bs in (1, 2, 16):
        assert score_prompts(tiny.model, prompts, metrics, batch_size=bs) == pytest.approx(alone, abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smol", "gemma"])
def test_batched_scores_equal_one_prompt_at_a_time_on_the_real_models(request, name):
    """The embedded models (SmolLM2's chat template; Gemma 3 with <bos> and sliding-window layers): left-padded
    batches of the evaluation's prompts score as each prompt alone, multi-token words included."""
    from mechsub.metric import score_prompts
    from mechsub.traits import eval_questions

    lm = request.getfixturevalue(name)
    tok = lm.tokenizer
    metrics = [TraitMetric.of(tok, w) for w in ("owl", "otter", "kangaroo", "dog")]
    prompts = [trait_prompt(tok, q, "animal") for q in eval_questions("animal", 6)]
    with torch.no_grad():
        alone = torch.stack([torch.stack([m.score(lm.model, p) for m in metrics]) for p in prompts])
    assert score_prompts(lm.model, prompts, metrics, batch_size=4) == pytest.approx(alone, abs=2e-3)
