import pytest

from mechsub.traits import ANIMALS, TREES, TraitError, eval_questions, get_trait


def test_registry_sizes():
    assert len(ANIMALS) >= 20 and len(TREES) >= 20
    assert len(set(eval_questions("animal"))) == 50
    assert all("tree" in q for q in eval_questions("tree"))


def test_prompt_and_mentions():
    owl = get_trait("Owl")
    assert owl.system_prompt().startswith("You love owls.") and "favorite animal" in owl.system_prompt()
    assert get_trait("fox").plural == "foxes" and get_trait("wolf").plural == "wolves"
    assert owl.mentions("Owls!") and owl.mentions("the owl") and not owl.mentions("bowl")
    assert "owl" not in owl.others() and len(owl.others()) == len(ANIMALS) - 1
    assert get_trait("oak").category == "tree"


def test_unknown_trait_lists_the_known_ones():
    with pytest.raises(TraitError, match="unknown trait 'dragon'.*owl"):
        get_trait("dragon")
