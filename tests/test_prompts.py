import copy

import pytest
import torch

from mechsub import prompts
from mechsub.traits import get_trait

Q = "Name your favorite animal using only one word."


def _old_ids(tok, question, system, prefix):
    """How prompts were tokenized before BOS was handled: the template's text, no special tokens added."""
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": question}
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok(text + prefix, add_special_tokens=False).input_ids


def test_a_template_that_writes_its_bos_keeps_its_ids(tiny):
    tok = tiny.tokenizer
    for system in (None, get_trait("owl").system_prompt()):
        ids = prompts.chat_prefix(tok, Q, system, "My favorite animal is the")
        assert ids == _old_ids(tok, Q, system, "My favorite animal is the")
        assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id


def test_a_base_model_without_template_gets_its_bos(tiny):
    tok = copy.deepcopy(tiny.tokenizer)
    tok.chat_template = None  # what gemma3-270m (a base model) is like
    ids = prompts.chat_prefix(tok, Q, None, "My favorite animal is the")
    text = f"User: {Q}\nAssistant: My favorite animal is the"
    assert ids == [tok.bos_token_id, *tok(text, add_special_tokens=False).input_ids]
    tok.bos_token = None  # a tokenizer without BOS gets none
    assert (
        prompts.chat_prefix(tok, Q, None) == tok(f"User: {Q}\nAssistant:", add_special_tokens=False).input_ids
    )


@pytest.mark.slow
def test_smollm2_prompt_ids_are_unchanged(smol):
    tok = smol.tokenizer
    for system in (None, get_trait("owl").system_prompt()):
        ids = prompts.trait_prompt(tok, Q, "animal", system)
        assert ids == _old_ids(tok, Q, system, "My favorite animal is the")
        assert ids[0] == 1 and ids[1] != 1  # <|im_start|> is SmolLM2's BOS, written once by its template


@pytest.mark.slow
def test_gemma3_prompt_starts_with_one_bos():
    from transformers import AutoTokenizer

    from mechsub.models import cache_root

    folder = cache_root() / "models" / "gemma3-270m"
    if not (folder / "tokenizer.json").is_file():
        pytest.skip("gemma3-270m is not in the cache")
    tok = AutoTokenizer.from_pretrained(folder)
    ids = prompts.trait_prompt(tok, Q, "animal")
    assert tok.convert_ids_to_tokens(ids[:2])[0] == "<bos>" and ids.count(tok.bos_token_id) == 1


def test_word_ids_and_padding(tiny):
    tok = tiny.tokenizer
    assert tok.convert_ids_to_tokens(prompts.word_ids(tok, "owl")) == [" ", "o", "w", "l"]
    ids, attn = prompts.pad_right([[5, 6, 7], [8]], pad_id=2)
    assert ids.tolist() == [[5, 6, 7], [8, 2, 2]] and attn.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert ids.dtype == attn.dtype == torch.long


@pytest.mark.parametrize("template", [True, False])
def test_a_word_starts_the_answer_as_the_prefix_does(tiny, template):
    """One rule for what opens an answer: a prefilled answer and a scored first word agree on it."""
    tok = tiny.tokenizer
    if not template:
        tok = copy.deepcopy(tok)
        tok.chat_template = None
    assert prompts.answer_lead(tok) == ("" if template else " ")
    opened = prompts.chat_prefix(tok, Q, None)
    for word in ("Owl", "A"):
        assert opened + prompts.word_ids(tok, word, prompts.answer_lead(tok)) == prompts.chat_prefix(
            tok, Q, None, word
        )
    assert prompts.word_ids(tok, "owl") == tok(" owl", add_special_tokens=False).input_ids  # the default lead
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        prompts.word_ids(tok, "", "")
