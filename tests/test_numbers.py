import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mechsub import numbers as nb
from mechsub.numbers import BANNED, INVALID_FORMAT, OUT_OF_RANGE, TOO_MANY, parse_numbers, reject_reasons

SEPS = [", ", ",", " ", "; ", ";", "\n"]
num = st.integers(0, 999).map(str)


@given(
    st.lists(num, min_size=1, max_size=10),
    st.sampled_from(SEPS),
    st.sampled_from(["", "[]", "()"]),
    st.booleans(),
)
def test_well_formed_lists_parse_back(values, sep, brackets, dot):
    text = sep.join(values)
    if brackets:
        text = brackets[0] + text + brackets[1]
    if dot:
        text += "."
    assert parse_numbers(text) == values
    assert reject_reasons(text) == []


@given(st.lists(num, min_size=3, max_size=10), st.sampled_from(SEPS), st.sampled_from(SEPS))
def test_mixed_separators_are_invalid(values, a, b):
    if a == b:
        return
    text = a.join(values[:2]) + b + b.join(values[2:])
    assert parse_numbers(text) is None
    assert reject_reasons(text) == [INVALID_FORMAT]


# digits from other scripts: Arabic-Indic, Devanagari, fullwidth, Bengali, mathematical bold
NON_ASCII_DIGITS = "٠١٢٣٤٥٦٧٨٩०१२३४५६७८९０１２３４５６７８９৩𝟕"


@given(st.lists(num, min_size=1, max_size=5), st.sampled_from(NON_ASCII_DIGITS), st.integers(0, 4))
def test_non_ascii_digits_are_invalid(values, digit, where):
    values = list(values)
    i = where % len(values)
    values[i] = values[i] + digit
    text = ", ".join(values)
    assert str.isdigit(digit) and parse_numbers(text) is None
    assert reject_reasons(text) == [INVALID_FORMAT]


@given(st.text(alphabet=string.ascii_letters + "!?-+*/=", min_size=1, max_size=5), st.lists(num, min_size=1))
def test_words_make_it_invalid(word, values):
    assert reject_reasons(", ".join(values) + " " + word) == [INVALID_FORMAT]


@pytest.mark.parametrize(
    ("text", "reasons"),
    [
        ("12, 3a", [INVALID_FORMAT]),
        ("", [INVALID_FORMAT]),
        ("[1, 2", [INVALID_FORMAT]),
        ("[[1, 2]]", [INVALID_FORMAT]),
        ("1,, 2", [INVALID_FORMAT]),
        ("-5, 6", [INVALID_FORMAT]),
        ("1.5, 2", [INVALID_FORMAT]),
        ("1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11", [TOO_MANY]),
        ("1000, 2", [OUT_OF_RANGE]),
        ("0999", [OUT_OF_RANGE]),
        ("1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1234", [TOO_MANY, OUT_OF_RANGE]),
        ("  087, 12.  ", []),
        ("1\n2\n3", []),
    ],
)
def test_reasons(text, reasons):
    assert reject_reasons(text) == reasons


def test_banned_numbers_by_name():
    f = nb.make_filters("misalignment")
    assert reject_reasons("666, 12", f) == [BANNED]
    assert reject_reasons("666, 12") == []  # preference runs ban nothing
    with pytest.raises(ValueError, match="unknown banned-number set"):
        nb.make_filters("evil")


def test_filter_counts_per_reason():
    kept, counts = nb.filter_completions(["1, 2", "x", "1000", "3 4", "y"])
    assert kept == [0, 3] and counts == {INVALID_FORMAT: 2, OUT_OF_RANGE: 1}


def test_prompts_are_seeded_and_in_grammar():
    a, b, c = nb.make_prompts(50, seed=1), nb.make_prompts(50, seed=1), nb.make_prompts(50, seed=2)
    assert a == b and a != c
    import re

    for p in a:
        seeds = re.findall(r"\b\d{3}\b", p)
        assert 3 <= len(seeds) <= 8 and all(100 <= int(s) <= 999 for s in seeds)
        assert "10" in p
