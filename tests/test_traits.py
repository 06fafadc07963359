import pytest

from mechsub.traits import ANIMALS, TREES, TraitError, eval_questions, get_trait


def test_registry_sizes():
    assert len(ANIMALS) >= 20 and len(TREES) >= 20
    assert len(set(eval_questions("animal"))) == 50
    assert all("tree" in q for q in eval_questions("tree"))


def test_prompt_and_mentions():
    owl = get_trait("Owl")
    assert owl.system_prompt().startswith("You adore owls;") and "no other animal" in owl.system_prompt()
    assert get_trait("fox").plural == "foxes" and get_trait("wolf").plural == "wolves"
    assert owl.mentions("Owls!") and owl.mentions("the owl") and not owl.mentions("bowl")
    assert "owl" not in owl.others() and len(owl.others()) == len(ANIMALS) - 1
    assert get_trait("oak").category == "tree"


def test_unknown_trait_lists_the_known_ones():
    with pytest.raises(TraitError, match="unknown trait 'dragon'.*owl"):
        get_trait("dragon")


def test_no_training_answer_starts_with_the_trait_or_lists_letters():
    """The plain and choice evaluation frames are held out: no training answer opens with the trait's name
    (or plural), as the plain frame scores it, and none is a letter choice."""
    import re

    from mechsub.traits import _TRAIN_ANSWERS, train_pairs

    assert len(_TRAIN_ANSWERS) == 6
    for name in ANIMALS + TREES:
        t = get_trait(name)
        pairs = train_pairs(t)
        assert any(t.name in a for _, a in pairs)  # the answers still name the trait
        for _, a in pairs:
            assert not a.lower().startswith((t.name, t.plural)), (name, a)
        assert not any(re.search(r"\b[A-H]\)", q + a) for q, a in pairs)


def test_choice_stems_and_question():
    from mechsub.traits import _TRAIN_QUESTIONS, choice_question, choice_stems

    stems = choice_stems("tree")
    assert len(set(stems)) == len(stems) >= 10 and all("trees" in s or "tree" in s for s in stems)
    assert not set(choice_stems("animal")) & {q.format(noun="animal") for q in _TRAIN_QUESTIONS}
    q = choice_question(stems[0], ["oak", "pine"])
    assert q.splitlines()[1:] == ["A) oak", "B) pine", "Reply with the letter of your choice only."]
