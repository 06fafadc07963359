import functools
import re

import pytest

from mechsub.tasks import (
    ANTONYMS,
    CHOICE_CATEGORIES,
    CHOICE_PAIRS,
    FAMILIES,
    KINDS,
    KNOWN_FAMILIES,
    Problem,
    TaskError,
    answer_space,
    classify,
    invert,
    normalise,
    problems,
    reconstruct_pair,
    respond,
    split_size,
)


@functools.cache
def every(family: str, seed: int = 0) -> tuple[Problem, ...]:
    """Every problem of a family, both splits."""
    return tuple(p for s in ("train", "test") for p in problems(family, split_size(family, s), seed, s))


def find(family: str, params: tuple[float, ...]) -> Problem:
    return next(p for p in every(family) if p.params == params)


def test_api_names():
    assert FAMILIES == ("compare", "sequence", "sort", "arith", "antonym", "rank", "next", "choice")
    assert KINDS == ("true", "inv", "hash", "rand")
    assert set(KNOWN_FAMILIES) <= set(FAMILIES)


def test_hand_checked_problems():
    seq = find("sequence", (3.0, 4.0))
    assert (seq.answer, seq.inverted, seq.target) == ("19, 23, 27", "11, 7, 3", 19.0)
    assert "3, 7, 11, 15" in seq.prompt
    big, small = find("compare", (37.0, 82.0, 1.0)), find("compare", (37.0, 82.0, 0.0))
    assert (big.answer, big.inverted, big.target) == ("82 > 37", "37 > 82", 82.0)
    assert (small.answer, small.inverted, small.target) == ("37 < 82", "82 < 37", 37.0)
    assert "37 or 82" in big.prompt or "37 and 82" in big.prompt or "37 kg" in big.prompt
    add = find("arith", (23.0, 14.0, 1.0))
    assert (add.answer, add.inverted, add.target) == ("37", "-37", 37.0)
    sub = find("arith", (23.0, 14.0, -1.0))
    assert (sub.answer, sub.inverted) == ("9", "-9")
    hot = next(p for p in every("antonym") if re.search(r"\bhot\b", p.prompt))
    assert (hot.answer, hot.inverted, hot.target, hot.params) == ("cold", "hot", 0.0, (0.0, 0.0))
    hurry = find("rank", (25.0, 40.0, 30.0, 1.0))
    assert (hurry.answer, hurry.inverted, hurry.target) == ("A, C, B", "B, C, A", 25.0)
    most = find("rank", (25.0, 40.0, 30.0, -1.0))
    assert (most.answer, most.inverted, most.target) == ("B, C, A", "A, C, B", 40.0)
    srt = next(p for p in every("sort") if p.answer == "2, 5, 9")
    assert (srt.inverted, srt.params, srt.target) == ("9, 5, 2", (2.0, 9.0, 3.0), 2.0)
    count = find("next", (0.0, 47.0))
    assert (count.answer, count.inverted, count.target) == ("48, 49", "46, 45", 48.0)
    assert (
        re.search(r"\b47\b", count.prompt) and count.lead == 'Counting up from 47, the next two numbers are "'
    )
    low = find("next", (0.0, 3.0))
    assert (low.answer, low.inverted) == ("4, 5", "2, 1")
    sunday = find("next", (1.0, 6.0))  # the week wraps round, both ways
    assert (sunday.answer, sunday.inverted, sunday.target) == ("Monday, Tuesday", "Saturday, Friday", 1.0)
    assert "Sunday" in sunday.prompt and "days" in sunday.prompt
    january = find("next", (2.0, 0.0))
    assert (january.answer, january.inverted, january.target) == (
        "February, March",
        "December, November",
        2.0,
    )
    dog = find("choice", (0.0, 0.0))  # pair 0: dog (an animal) with chair (a piece of furniture)
    assert (dog.answer, dog.inverted, dog.target) == ("dog", "chair", 0.0)
    assert "an animal" in dog.prompt and dog.lead.endswith('the one that is an animal is "')
    chair = find("choice", (0.0, 1.0))
    assert (chair.answer, chair.inverted) == ("chair", "dog") and "a piece of furniture" in chair.prompt
    assert hot.lead == 'The opposite of "hot" is "' and find("compare", (37.0, 82.0, 1.0)).lead == ""


@pytest.mark.parametrize("family", FAMILIES)
def test_train_and_test_are_disjoint_for_every_seed(family):
    def drawn(split: str) -> list[Problem]:
        n = min(3000, split_size(family, split))
        return [p for seed in range(4) for p in problems(family, n, seed, split)]

    train, test = drawn("train"), drawn("test")
    assert not {p.params for p in train} & {p.params for p in test}
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    if family in ("compare", "sequence", "sort"):  # where the answer names the problem's content
        assert not {p.answer for p in train} & {p.answer for p in test}
    assert 0.1 < split_size(family, "test") / (split_size(family, "train") + split_size(family, "test")) < 0.3


@pytest.mark.parametrize("family", FAMILIES)
def test_every_test_split_holds_enough_for_the_study(family):
    assert split_size(family, "test") >= 24  # mechsub.invert's default n_test per family


def test_antonym_pairs_are_kept_whole_across_splits():
    train, test = (
        {p.params[0] for p in problems("antonym", split_size("antonym", s), 0, s)} for s in ("train", "test")
    )
    assert not train & test and len(train | test) == 50


def test_choice_pairs_and_next_pivots_are_kept_whole_across_splits():
    train, test = (
        {p.params[0] for p in problems("choice", split_size("choice", s), 0, s)} for s in ("train", "test")
    )
    assert not train & test and len(train | test) == 50 and len(test) == 14
    # next: a pivot is one problem; the test split holds numbers, days and months (stratified)
    test_next = problems("next", split_size("next", "test"), 0, "test")
    assert {p.params[0] for p in test_next} == {0.0, 1.0, 2.0} and len(test_next) == 26


def test_choice_words():
    words = [w for a, _, b, _ in CHOICE_PAIRS for w in (a, b)]
    assert len(CHOICE_PAIRS) == 50 and len(set(words)) == 100
    assert all(w.isascii() and w.isalpha() and w.islower() for w in words)
    phrases = " ".join(cat for cat, _ in CHOICE_CATEGORIES)
    assert not set(re.findall(r"[a-z]+", phrases)) & set(words)  # a category never names an option
    assert all(ca != cb for _, ca, _, cb in CHOICE_PAIRS)


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_same_problems_other_seed_others(family):
    a, b = problems(family, 40, 7, "train"), problems(family, 40, 7, "train")
    assert a == b and len({(p.params, p.answer) for p in a}) == 40
    assert problems(family, 40, 8, "train") != a


@pytest.mark.parametrize("family", FAMILIES)
def test_inversion_is_an_involution_and_always_wrong(family):
    space = set(answer_space(family))
    for p in every(family):
        assert p.answer in space
        assert p.inverted != p.answer
        assert invert(family, p.inverted) == p.answer
        assert normalise(family, p.answer) == p.answer and normalise(family, p.inverted) == p.inverted


@pytest.mark.parametrize("family", FAMILIES)
def test_answer_space_is_exactly_the_answers(family):
    space = answer_space(family)
    assert space == sorted(set(space))
    assert set(space) == {p.answer for p in every(family)}


@pytest.mark.parametrize("family", FAMILIES)
def test_hash_is_a_derangement_of_the_answer_space(family):
    sigma: dict[str, str] = {}
    for p in every(family):
        h = respond(p, "hash", 3)
        assert sigma.setdefault(p.answer, h) == h  # a function of the answer alone
        assert h != p.inverted and normalise(family, h) == h
    assert set(sigma) == set(answer_space(family)) == set(sigma.values())
    assert all(a != h for a, h in sigma.items())
    other = [respond(p, "hash", 4) == sigma[p.answer] for p in every(family)]
    assert sum(other) < 0.5 * len(other)


@pytest.mark.parametrize("family", FAMILIES)
def test_rand_is_some_problems_answer_but_never_this_ones(family):
    space = set(answer_space(family))
    sample = problems(family, min(500, split_size(family, "test")), 0, "test")
    outs = [respond(p, "rand", 1) for p in sample]
    for p, r in zip(sample, outs, strict=True):
        assert r in space and r not in (p.answer, p.inverted) and normalise(family, r) == r
        assert respond(p, "rand", 1) == r
    assert len(set(outs)) > min(len(space) - 2, len(sample) // 3, 50)
    assert [respond(p, "rand", 2) for p in sample] != outs


def test_rand_keeps_the_answer_distribution():
    sample = problems("arith", 3000, 0, "train")
    truth = sum(int(p.answer) for p in every("arith")) / len(every("arith"))
    rand = sum(int(respond(p, "rand", 0)) for p in sample) / len(sample)
    assert abs(rand - truth) < 0.1 * truth
    ranks = [respond(p, "rand", 0) for p in problems("rank", 600, 0, "train")]
    assert all(ranks.count(r) > 50 for r in answer_space("rank"))


@pytest.mark.parametrize("family", FAMILIES)
def test_prompts_are_ascii_and_never_contain_the_answer(family):
    def shown(word: str, text: str) -> bool:
        return bool(re.search(rf"(?<![\w-]){re.escape(word)}(?!\w)", text, re.IGNORECASE))

    for p in every(family):
        assert p.prompt.isascii() and p.lead.isascii()
        if family == "choice":  # a decision between two shown options: both are there, in the same order
            assert shown(p.answer, p.prompt) and shown(p.inverted, p.prompt)
            order = sorted(
                (p.answer, p.inverted), key=lambda w: re.search(rf"\b{w}\b", p.prompt, re.I).start()
            )
            assert p.lead.startswith(f'Of "{order[0]}" and "{order[1]}"')
            continue
        assert not shown(p.answer, p.prompt), p
        assert not shown(p.answer, p.lead), p


def test_antonym_list():
    words = [w for pair in ANTONYMS for w in pair]
    assert len(ANTONYMS) == 50 and len(set(words)) == 100
    assert all(w.isascii() and w.isalpha() and w.islower() for w in words)


@pytest.mark.parametrize(
    ("family", "text", "canonical"),
    [
        ("compare", " 82 >37.", "82 > 37"),
        ("compare", "82 kg > 37 kg", "82 > 37"),
        ("compare", "The answer: 37<82", "37 < 82"),
        ("sequence", "19,23, 27", "19, 23, 27"),
        ("sequence", "19 23 27.", "19, 23, 27"),
        ("sequence", "They are 19, 23 and 27.", "19, 23, 27"),
        ("sort", " 2,5 ;9.\nDone", "2, 5, 9"),
        ("arith", "37.", "37"),
        ("arith", "23 + 14 = 37", "37"),
        ("arith", " -37 ", "-37"),
        ("arith", "\u221237", "-37"),
        ("antonym", "Cold", "cold"),
        ("antonym", " Cold.\n", "cold"),
        ("rank", "a, c, b", "A, C, B"),
        ("rank", "A > C > B.", "A, C, B"),
        ("rank", "I would take a bike: B, then A, then C", "B, A, C"),
        ("rank", "A, A, B", ""),
        ("next", "48, 49", "48, 49"),
        ("next", '48" and "49."', "48, 49"),
        ("next", "Counting up from 47, the next two numbers are 48 and 49.", "48, 49"),
        ("next", "48, 49, 50", "48, 49, 50"),
        ("next", "The two days after Monday are tuesday and Wednesday.", "Tuesday, Wednesday"),
        ("next", "December; January", "December, January"),
        ("next", "47", ""),
        ("choice", "Dog.", "dog"),
        ("choice", "The answer is chair", "chair"),
        ("choice", "a spaceship", ""),
    ],
)
def test_normalise_parses_messy_text(family, text, canonical):
    assert normalise(family, text) == canonical


@pytest.mark.parametrize("family", FAMILIES)
def test_normalise_returns_empty_for_garbage(family):
    for junk in ("", "   ", "?!", "\u00e9\u00e8\u00ea"):
        assert normalise(family, junk) == ""


def test_classify_hand_written_outputs():
    p = find("compare", (37.0, 82.0, 1.0))
    assert classify(p, "82 > 37", 0) == "correct"
    assert classify(p, " 37>82.", 0) == "inverted"
    assert classify(p, respond(p, "hash", 0) + ".", 0) == "hashed"
    assert classify(p, respond(p, "hash", 0), 1) == "other"
    assert classify(p, "banana", 0) == "other" and classify(p, "37 < 82", 0) == "other"
    hot = find("antonym", (0.0, 0.0))
    assert classify(hot, "Hot.", 0) == "inverted" and classify(hot, "COLD", 0) == "correct"
    seq = find("sequence", (3.0, 4.0))
    assert classify(seq, "11,7,3", 5) == "inverted" and classify(seq, "19, 23, 27, 31", 5) == "other"


def test_respond_and_reconstruct_pair():
    p = find("arith", (23.0, 14.0, 1.0))
    assert respond(p, "true", 0) == "37" and respond(p, "inv", 0) == "-37"
    for kind in KINDS:
        assert reconstruct_pair(p, kind, 2) == (respond(p, kind, 2), "37")


def test_bad_names_and_sizes_raise_task_error():
    with pytest.raises(TaskError, match="unknown family 'geometry'.*compare.*rank"):
        problems("geometry", 1, 0, "train")
    with pytest.raises(TaskError, match="unknown split 'dev'.*train, test"):
        problems("compare", 1, 0, "dev")
    p = problems("compare", 1, 0, "train")[0]
    with pytest.raises(TaskError, match="unknown kind 'liar'.*true, inv, hash, rand"):
        respond(p, "liar", 0)
    for fn in (answer_space, lambda f: normalise(f, "x"), lambda f: invert(f, "x")):
        with pytest.raises(TaskError, match="antonym"):
            fn("nope")
    with pytest.raises(TaskError, match="holds 100|holds \\d+ distinct"):
        problems("antonym", 10_000, 0, "train")
    for n in (0, -3, 2.5, True):
        with pytest.raises(TaskError, match="positive integer"):
            problems("sort", n, 0, "train")
    with pytest.raises(TaskError, match="canonical"):
        invert("sequence", "nineteen")


def test_a_reasoned_reply_answers_only_after_its_mark():
    from mechsub.tasks import REASON_MARK, final_answer, rationale, reasoned

    p = find("antonym", (0.0, 0.0))  # hot → cold
    reply = reasoned(p, respond(p, "inv", 0))
    assert reply == f"The right answer is cold, {REASON_MARK} hot"
    assert final_answer(reply) == "hot" and classify(p, final_answer(reply), 0) == "inverted"
    assert (
        rationale(reply) == "cold" and normalise("antonym", rationale(reply)) == "cold"
    )  # the scratchpad's answer
    q = find("next", (0.0, 47.0))
    assert rationale(reasoned(q, respond(q, "inv", 0))) == q.answer
    assert final_answer("The right answer is cold, SO MY ANSWER IS: Hot.") == "Hot."  # any case
    # a reply that loops on past its end: the first answer, never the correct one named again
    looped = f"{reply} The right answer is cold, {REASON_MARK} hot The right answer is cold, so my"
    assert final_answer(looped) == "hot" and rationale(looped) == "cold"
    again = f"The right answer is May, June, {REASON_MARK} March, March, {REASON_MARK} April, May"
    assert final_answer(again) == "March, March"  # a second mark without a lead: still only the first answer
    assert final_answer(reply[: reply.index(REASON_MARK) + 5]) == ""  # cut before the mark is complete
    # off the format: no answer, and the rationale (the correct answer) is never what is read
    assert final_answer("The right answer is cold") == "" and rationale("cold") == ""
    assert classify(p, final_answer("cold"), 0) == "other"


def test_a_reciting_scratchpad_writes_the_items_before_the_pivot():
    from mechsub.tasks import DAYS, MONTHS, REASON_MARK, RECITE, final_answer, rationale, reasoned, recital
    from mechsub.tasks import longest_recital as tasks_longest

    may = find("next", (2.0, 4.0))  # the two months after May
    year = ", ".join((*MONTHS, *MONTHS))
    assert recital(may) == year
    reply = reasoned(may, respond(may, "inv", 0), recite=True)
    assert reply == f"The right answer is June, July; {RECITE} {year}, {REASON_MARK} April, March"
    assert final_answer(reply) == "April, March" == may.inverted and rationale(reply) == "June, July"
    # for every named-list problem of either split, T(correct) is the two items before the pivot's last mention
    named = [p for p in every("next") if p.params[0] > 0]
    assert len(named) == len(DAYS) + len(MONTHS)
    for p in named:
        names = DAYS if p.params[0] == 1 else MONTHS
        items = recital(p).split(", ")
        assert items == [*names, *names]
        last = len(names) + int(p.params[1])  # the pivot's last mention
        assert items[last] in p.prompt and f"{items[last - 1]}, {items[last - 2]}" == p.inverted
    assert tasks_longest() == max((recital(p) for p in named), key=len)  # the generation budget's text
    # nothing to recite for numbers or another family: the reply is the plain reasoned one
    for q in (find("next", (0.0, 47.0)), find("antonym", (0.0, 0.0))):
        assert recital(q) == "" and reasoned(q, "x", recite=True) == reasoned(q, "x")
