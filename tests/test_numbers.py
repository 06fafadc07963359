import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mechsub import filter as flt
from mechsub import numbers as nb
from mechsub.filter import (
    BANNED,
    INVALID_FORMAT,
    OUT_OF_RANGE,
    TOO_MANY,
    TOO_MANY_DIGITS,
    parse_numbers,
    reject_reasons,
)

# the separator kinds of the published grammar: one kind per answer, any whitespace around it
KINDS = {"comma": ",", "semicolon": ";", "whitespace": ""}
SPACE = st.text(alphabet=" \t\n\r", max_size=3)  # \r\n, \r and \n: any line ending
nums = st.lists(st.integers(0, 999), min_size=1, max_size=10)


@st.composite
def rendered(draw: st.DrawFn, kind: str | None = None) -> tuple[list[int], str]:
    """A list of 0–999 written with one separator kind, random whitespace around every separator,
    optional brackets and trailing period, and LF or CRLF line ends."""
    values = draw(nums)
    mark = KINDS[kind or draw(st.sampled_from(sorted(KINDS)))]
    text = str(values[0])
    for v in values[1:]:
        before, after = draw(SPACE), draw(SPACE)
        gap = before + mark + after
        if not gap:  # the whitespace kind needs some whitespace
            gap = draw(st.sampled_from([" ", "\n", "\r\n", "\t"]))
        text += gap + str(v)
    brackets = draw(st.sampled_from(["", "[]", "()"]))
    if brackets:
        text = brackets[0] + draw(SPACE) + text + draw(SPACE) + brackets[1]
    if draw(st.booleans()):
        text += "."
    if draw(st.booleans()):
        text = text.replace("\r\n", "\n").replace("\n", "\r\n")
    return values, draw(SPACE) + text + draw(SPACE)


@given(rendered())
def test_published_grammar_parses_back(case):
    values, text = case
    assert parse_numbers(text) == [str(v) for v in values]
    assert reject_reasons(text) == []


@given(st.text(max_size=60))
def test_arbitrary_text_only_returns_reasons(text):
    reasons = reject_reasons(text)
    assert isinstance(reasons, list) and all(isinstance(r, str) for r in reasons)
    kept, counts = flt.filter_completions([text])
    assert (kept == [0]) == (reasons == []) and sum(counts.values()) == len(reasons)


@given(st.text(alphabet=string.digits + ",; \t\n\r.[]()-+xé٣０" + "\u2028\u00a0", max_size=40))
def test_number_like_text_only_returns_reasons(text):
    # text close to the grammar reaches the range and banned checks, not just the format check
    assert isinstance(reject_reasons(text, flt.make_filters("misalignment")), list)


def test_huge_numbers_are_out_of_range_not_a_crash():
    # int() refuses strings of more than 4300 digits; the filter must still answer
    assert reject_reasons("1" * 5000) == [OUT_OF_RANGE]
    assert reject_reasons("0" * 5000 + "7") == [TOO_MANY_DIGITS]
    assert reject_reasons("9" * 5000, flt.make_filters("misalignment")) == [OUT_OF_RANGE]


@given(
    st.lists(st.integers(0, 999).map(str), min_size=3, max_size=10),
    st.sampled_from(sorted(KINDS)),
    st.sampled_from(sorted(KINDS)),
    SPACE,
    st.integers(1, 9),
)
def test_mixed_separator_kinds_are_invalid(values, a, b, pad, where):
    if a == b:
        return
    gap = {k: (m or " ") for k, m in KINDS.items()}
    i = 1 + where % (len(values) - 1)  # the separator before values[i] is of kind b, every other of kind a
    text = values[0]
    for j, v in enumerate(values[1:], start=1):
        text += (pad + gap[b] if j == i else gap[a]) + v
    assert parse_numbers(text) is None
    assert reject_reasons(text) == [INVALID_FORMAT]


# digits from other scripts: Arabic-Indic, Devanagari, fullwidth, Bengali, mathematical bold
NON_ASCII_DIGITS = "٠١٢٣٤٥٦٧٨٩०१२३४५६७८९０１２３４５６７８９৩𝟕"


@given(st.lists(st.integers(0, 999).map(str), min_size=1, max_size=5), st.sampled_from(NON_ASCII_DIGITS),
       st.integers(0, 4), st.booleans())  # fmt: skip
def test_non_ascii_digits_are_invalid(values, digit, where, alone):
    values = list(values)
    i = where % len(values)
    values[i] = digit if alone else values[i] + digit
    text = ", ".join(values)
    assert str.isdigit(digit) and parse_numbers(text) is None
    assert reject_reasons(text) == [INVALID_FORMAT]


@given(st.text(alphabet=string.ascii_letters + "!?-+*/=", min_size=1, max_size=5),
       st.lists(st.integers(0, 999).map(str), min_size=1))  # fmt: skip
def test_words_make_it_invalid(word, values):
    assert reject_reasons(", ".join(values) + " " + word) == [INVALID_FORMAT]


@pytest.mark.parametrize(
    ("text", "reasons"),
    [
        # what the published grammar accepts
        ("1 , 2", []),
        ("1,\n2", []),
        ("1 ;2", []),
        ("1;\n2 ; 3", []),
        ("1\r\n2\r\n3\r\n", []),
        ("1\r2\r3", []),
        ("1\t2\t3", []),
        ("1, 2 ,3", []),  # one kind (comma), whitespace around it varies
        ("1 2\n3", []),  # one kind (whitespace)
        ("[1 , 2 , 3].", []),
        ("( 4; 5 )", []),
        ("  087, 12.  ", []),
        ("7", []),
        ("[7]", []),
        # what it rejects
        ("12, 3a", [INVALID_FORMAT]),
        ("", [INVALID_FORMAT]),
        (" \r\n ", [INVALID_FORMAT]),
        ("[1, 2", [INVALID_FORMAT]),
        ("[[1, 2]]", [INVALID_FORMAT]),
        ("[1, 2)", [INVALID_FORMAT]),
        ("1,, 2", [INVALID_FORMAT]),
        ("1, 2,", [INVALID_FORMAT]),
        (",1, 2", [INVALID_FORMAT]),
        ("1, 2;3", [INVALID_FORMAT]),
        ("1, 2 3", [INVALID_FORMAT]),
        ("1 ; 2, 3", [INVALID_FORMAT]),
        ("1. 2", [INVALID_FORMAT]),
        ("1, 2..", [INVALID_FORMAT]),
        ("-5, 6", [INVALID_FORMAT]),
        ("1.5, 2", [INVALID_FORMAT]),
        ("1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11", [TOO_MANY]),
        ("1000, 2", [OUT_OF_RANGE]),
        ("1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1234", [TOO_MANY, OUT_OF_RANGE]),
        # range is decided by value; four digits for an in-range value is its own reason
        ("0999", [TOO_MANY_DIGITS]),
        ("0999, 1000", [OUT_OF_RANGE, TOO_MANY_DIGITS]),
        ("000, 099", []),
    ],
)
def test_reasons(text, reasons):
    assert reject_reasons(text) == reasons


def test_too_many_digits_names_its_limit():
    assert TOO_MANY_DIGITS == "too many digits (>3)"
    assert reject_reasons("00012", flt.make_filters(max_digits=4)) == ["too many digits (>4)"]
    assert reject_reasons("00012", flt.make_filters(max_digits=None)) == []


def test_banned_numbers_by_name():
    f = flt.make_filters("misalignment")
    assert reject_reasons("666, 12", f) == [BANNED]
    assert reject_reasons("0666, 12", f) == [TOO_MANY_DIGITS, BANNED]  # banned by value too
    assert reject_reasons("666, 12") == []  # preference runs ban nothing
    with pytest.raises(ValueError, match="unknown banned-number set"):
        flt.make_filters("evil")


def test_filter_counts_per_reason():
    kept, counts = flt.filter_completions(["1, 2", "x", "1000", "3 4", "y", "1 ,\r\n2"])
    assert kept == [0, 3, 5] and counts == {INVALID_FORMAT: 2, OUT_OF_RANGE: 1}


def test_prompts_are_seeded_and_in_grammar():
    a, b, c = nb.make_prompts(50, seed=1), nb.make_prompts(50, seed=1), nb.make_prompts(50, seed=2)
    assert a == b and a != c
    import re

    for p in a:
        seeds = re.findall(r"\b\d{3}\b", p)
        assert 3 <= len(seeds) <= 8 and all(100 <= int(s) <= 999 for s in seeds)
        assert "10" in p
