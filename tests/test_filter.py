"""The mask and ablation file formats: one writer, one reader, both validating (completion filters: test_numbers)."""

import json
from types import SimpleNamespace

import pytest
import torch

from mechsub.filter import ablation_basis, load_mask, read_mask, write_ablation, write_mask
from mechsub.runs import RunFolderError


def _examples(*lengths):
    return [SimpleNamespace(allowed_logprobs=torch.zeros(n, 13)) for n in lengths]


def test_a_mask_round_trips_and_records_how_it_was_made(tmp_path):
    p = tmp_path / "m.json"
    write_mask(p, [[1, 0, 1], [0, 0]], "runs/data/owl", keep="divergent", counterfactuals=["dog"])
    assert read_mask(p) == [[1, 0, 1], [0, 0]]
    raw = json.loads(p.read_text())
    assert raw["data"] == "runs/data/owl" and raw["keep"] == "divergent" and raw["counterfactuals"] == ["dog"]
    w = load_mask(p, _examples(3, 2))
    assert [t.tolist() for t in w] == [[1.0, 0.0, 1.0], [0.0, 0.0]]


def test_masks_that_do_not_fit_are_refused(tmp_path):
    with pytest.raises(ValueError, match="row 1 of the mask must be a list of 0/1"):
        write_mask(tmp_path / "w.json", [[1], [2]], "d")
    with pytest.raises(ValueError, match="row 0 of the mask must be a list of 0/1"):
        write_mask(tmp_path / "w.json", [[0.5]], "d")
    assert not (tmp_path / "w.json").exists()
    (tmp_path / "bad.json").write_text(json.dumps({"mask": [[1, 0.5]]}))
    with pytest.raises(ValueError, match="row 0 of the mask"):
        read_mask(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[[1, 0]]")
    with pytest.raises(ValueError, match="not a mask file"):
        read_mask(tmp_path / "list.json")
    with pytest.raises(FileNotFoundError, match="mechsub divergence"):
        read_mask(tmp_path / "none.json")
    write_mask(tmp_path / "m.json", [[1, 0, 1], [0, 1]], "d")
    with pytest.raises(ValueError, match="other data"):
        load_mask(tmp_path / "m.json", _examples(3))
    with pytest.raises(ValueError, match="row 1 must be 3 entries"):
        load_mask(tmp_path / "m.json", _examples(3, 3))


def test_a_mask_of_another_replicates_data_is_refused_even_when_the_shapes_agree(tmp_path):
    r0, r1 = tmp_path / "data" / "owl-r0", tmp_path / "data" / "owl-r1"
    write_mask(tmp_path / "m.json", [[1, 0, 1], [0, 1]], r0)
    assert len(load_mask(tmp_path / "m.json", _examples(3, 2), r0)) == 2  # its own data
    with pytest.raises(ValueError, match="was made for the data in .*owl-r0.*one per replicate"):
        load_mask(tmp_path / "m.json", _examples(3, 2), r1)


def test_an_ablation_file_needs_features_and_a_finished_sae(tmp_path):
    with pytest.raises(ValueError, match="at least one feature"):
        write_ablation(tmp_path / "a.json", tmp_path / "sae", [])
    write_ablation(tmp_path / "a.json", tmp_path / "sae", [3, 1])
    assert json.loads((tmp_path / "a.json").read_text()) == {"sae": str(tmp_path / "sae"), "features": [3, 1]}
    with pytest.raises(RunFolderError, match="mechsub sae"):  # the SAE folder was never made
        ablation_basis(tmp_path / "a.json")
    (tmp_path / "b.json").write_text(json.dumps({"sae": "x"}))
    with pytest.raises(ValueError, match="non-empty 'features'"):
        ablation_basis(tmp_path / "b.json")


def test_concept_ablation_leaves_position_0_and_projects_out_the_rest():
    """CAFT's edit: position 0 (the attention sink) keeps its residual; every later position loses its component
    along the basis and keeps the rest."""
    from mechsub.filter import Ablation

    q, _ = torch.linalg.qr(torch.randn(16, 3, generator=torch.Generator().manual_seed(0)))
    h = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    out = Ablation(0, q).project_out(h)
    torch.testing.assert_close(out[:, 0], h[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(out[:, 1:] @ q, torch.zeros(2, 4, 3), rtol=0, atol=1e-5)
    rest = h[:, 1:] - (h[:, 1:] @ q) @ q.T  # what lies outside the span is untouched
    torch.testing.assert_close(out[:, 1:], rest)
    with pytest.raises(ValueError, match=r"\(batch, pos, d_model\)"):
        Ablation(0, q).project_out(h[0])


def test_random_orthonormal_directions_come_from_the_seed_alone():
    from mechsub.filter import random_basis

    a, b, c = random_basis(64, 5, seed=3), random_basis(64, 5, seed=3), random_basis(64, 5, seed=4)
    assert a.shape == (64, 5) and torch.equal(a, b) and not torch.allclose(a, c)
    torch.testing.assert_close(a.T @ a, torch.eye(5), rtol=0, atol=1e-5)
    assert random_basis(64, 64, seed=0).shape == (64, 64)
    with pytest.raises(ValueError, match="1 ≤ k ≤ d_model = 64"):
        random_basis(64, 65, seed=0)


def test_a_random_ablation_file_names_a_rank_and_a_seed(tmp_path):
    from mechsub.filter import write_random_ablation

    write_random_ablation(tmp_path / "r.json", tmp_path / "sae", 4, seed=7)
    assert json.loads((tmp_path / "r.json").read_text()) == {
        "sae": str(tmp_path / "sae"),
        "random": 4,
        "seed": 7,
    }
    with pytest.raises(RunFolderError, match="mechsub sae"):  # valid file; the SAE folder was never made
        ablation_basis(tmp_path / "r.json")
    with pytest.raises(ValueError, match="rank ≥ 1"):
        write_random_ablation(tmp_path / "r0.json", tmp_path / "sae", 0, seed=7)
    (tmp_path / "both.json").write_text(json.dumps({"sae": "x", "random": 4, "seed": 1, "features": [1]}))
    with pytest.raises(ValueError, match="integer 'seed', and no 'features'"):
        ablation_basis(tmp_path / "both.json")


def test_a_vector_ablation_projects_out_exactly_the_span_of_its_vectors(tmp_path):
    from mechsub.filter import write_vector_ablation

    v = torch.tensor([[3.0, 4.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]])
    write_vector_ablation(tmp_path / "v.json", 2, v.tolist())
    a = ablation_basis(tmp_path / "v.json")
    assert a.layer == 2 and a.basis.shape == (4, 2)
    h = torch.tensor([[[9.0, 9.0, 9.0, 9.0], [1.0, 2.0, 3.0, 4.0]]])
    out = a.project_out(h)
    assert torch.equal(out[:, 0], h[:, 0])  # the sink position is left alone
    # by hand: the span of v is {x: x3 = 0 and ... }; its orthogonal complement holds e4 and (4, -3, 3, 0)/sqrt(34)
    e4, w = torch.tensor([0.0, 0, 0, 1]), torch.tensor([4.0, -3, 3, 0]) / 34**0.5
    x = h[0, 1]
    assert torch.allclose(out[0, 1], (x @ e4) * e4 + (x @ w) * w, atol=1e-5)
    assert torch.allclose(out[0, 1] @ v.T, torch.zeros(2), atol=1e-5)


def test_a_vector_ablation_refuses_what_has_no_span(tmp_path):
    from mechsub.filter import write_vector_ablation
    from mechsub.runs import write_json

    with pytest.raises(ValueError, match="one length"):
        write_vector_ablation(tmp_path / "v.json", 2, [[1.0, 0.0], [1.0]])
    with pytest.raises(ValueError, match="layer"):
        write_vector_ablation(tmp_path / "v.json", -1, [[1.0, 0.0]])
    write_json(tmp_path / "dep.json", {"layer": 1, "vectors": [[1.0, 2.0], [2.0, 4.0]]})
    with pytest.raises(ValueError, match="linearly independent"):
        ablation_basis(tmp_path / "dep.json")
    write_json(tmp_path / "nolayer.json", {"vectors": [[1.0, 2.0]]})
    with pytest.raises(ValueError, match="'layer'"):
        ablation_basis(tmp_path / "nolayer.json")


def test_a_student_refuses_an_ablation_of_another_models_width_or_depth(tmp_path, tiny):
    from mechsub import data, student
    from mechsub.data import DataConfig
    from mechsub.filter import write_vector_ablation
    from mechsub.student import StudentConfig

    d = tmp_path / "data"
    data.run(DataConfig(model="tiny", n_prompts=4, batch_size=4, max_new_tokens=8), d)
    for name, layer, width in (("wide", 0, 32), ("deep", 99, tiny.model.config.hidden_size)):
        write_vector_ablation(tmp_path / f"{name}.json", layer, [[1.0] * width])
        scfg = StudentConfig(model="tiny", data=str(d), batch_size=4, ablate=str(tmp_path / f"{name}.json"))
        with pytest.raises(ValueError, match="give directions of this model"):
            student.run(scfg, tmp_path / name)


def test_an_ablating_student_refuses_a_shared_prefix():
    from mechsub.config import ConfigError
    from mechsub.student import StudentConfig

    with pytest.raises(ConfigError, match="share_prefix"):
        StudentConfig(model="tiny", data="d", ablate="a.json", share_prefix=True)


def test_projecting_by_position_ids_is_projecting_by_index_where_they_agree_and_skips_position_0():
    from mechsub.filter import Ablation

    q, _ = torch.linalg.qr(torch.randn(16, 2, generator=torch.Generator().manual_seed(0)))
    h = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    a = Ablation(0, q)
    # equal up to rounding: one product over every position against one over the slice past the sink
    torch.testing.assert_close(a.project_out(h, torch.arange(5)[None]), a.project_out(h), rtol=0, atol=1e-6)
    # a left-padded row: two pads (position 0, as score_prompts gives them), the sink at index 2
    pos = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])
    out = a.project_out(h, pos)
    torch.testing.assert_close(out[0, :3], h[0, :3], rtol=0, atol=0)
    torch.testing.assert_close(out[0, 3:] @ q, torch.zeros(2, 2), rtol=0, atol=1e-5)
    # a continuation from a KV cache: every position is past the sink, index 0 included
    cont = a.project_out(h[:, :2], torch.tensor([[7, 8]]))
    torch.testing.assert_close(cont @ q, torch.zeros(2, 2, 2), rtol=0, atol=1e-5)


def test_an_ablated_evaluation_scores_as_a_full_forward_ablated_by_index(tiny):
    """The evaluation's scoring (left-padded batches, multi-token words continued from a KV cache) under
    `ablating` equals, word by word, one unpadded forward of prompt + word with the span projected out by index
    (an independent route), and differs from the unablated scores."""
    from mechsub import hooks
    from mechsub.filter import Ablation, ablating
    from mechsub.metric import TraitMetric, score_prompts

    model, tok = tiny.model, tiny.tokenizer
    d = model.config.hidden_size
    layers = (0, 1)
    abls = [Ablation(L, torch.linalg.qr(torch.randn(d, 3, generator=torch.Generator().manual_seed(L)))[0])
            for L in layers]  # fmt: skip
    prompts = [
        tok.encode(t) for t in ("my favourite animal is", "name one", "the answer to this question is")
    ]
    metrics = [TraitMetric.of(tok, w) for w in ("owl", "elephant", "dog")]
    assert any(len(m.ids) > 1 for m in metrics)  # the KV-cache continuation runs
    with ablating(model, abls):
        got = score_prompts(model, prompts, metrics, batch_size=3)
    plain = score_prompts(model, prompts, metrics, batch_size=3)
    edits = {hooks.resid_post(a.layer): a.project_out for a in abls}
    want = torch.zeros_like(got)
    with torch.no_grad(), hooks.edit(model, edits):
        for i, p in enumerate(prompts):
            for j, m in enumerate(metrics):
                ids = torch.tensor([[*p, *m.ids]])
                lp = model(input_ids=ids).logits[0].float().log_softmax(-1)
                want[i, j] = sum(lp[len(p) - 1 + k, t] for k, t in enumerate(m.ids))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert (got - plain).abs().max() > 1e-3


def test_a_stack_ablates_several_layers_and_random_directions_need_no_sae(tmp_path, tiny):
    from mechsub.filter import (
        ablation_basis,
        ablation_inputs,
        check_ablations,
        random_basis,
        read_ablations,
        write_ablation_stack,
        write_random_ablation,
        write_vector_ablation,
    )

    d = tiny.model.config.hidden_size
    write_random_ablation(tmp_path / "r.json", None, 2, 5, layer=1, d_model=d)
    r = ablation_basis(tmp_path / "r.json")
    assert r.layer == 1 and torch.equal(r.basis, random_basis(d, 2, 5))
    write_vector_ablation(tmp_path / "v.json", 0, [[1.0] * d])
    write_ablation_stack(tmp_path / "s.json", [tmp_path / "v.json", tmp_path / "r.json"])
    stack = read_ablations(tmp_path / "s.json")
    assert [a.layer for a in stack] == [0, 1] and torch.equal(stack[1].basis, r.basis)
    (one,) = read_ablations(tmp_path / "r.json")  # a single spec reads as a stack of one
    assert one.layer == 1 and torch.equal(one.basis, r.basis)
    assert ablation_inputs(tmp_path / "s.json") == {} and ablation_inputs("") == {}
    check_ablations(tiny.model, stack)
    with pytest.raises(ValueError, match="read it with read_ablations"):
        ablation_basis(tmp_path / "s.json")
    with pytest.raises(ValueError, match="distinct layers"):
        write_ablation_stack(tmp_path / "same.json", [tmp_path / "v.json", tmp_path / "v.json"])
    with pytest.raises(ValueError, match="give each layer once"):
        check_ablations(tiny.model, [stack[0], stack[0]])
    with pytest.raises(ValueError, match="without an SAE needs a layer"):
        write_random_ablation(tmp_path / "x.json", None, 2, 5)
    (tmp_path / "bad.json").write_text(json.dumps({"layer": 1, "random": 2, "seed": 1}))
    with pytest.raises(ValueError, match="integers layer, d_model, random, seed"):
        ablation_basis(tmp_path / "bad.json")


def test_an_ablated_evaluation_refuses_samples_and_records_the_file(tmp_path):
    from mechsub.config import ConfigError
    from mechsub.evaluate import EvalConfig

    with pytest.raises(ConfigError, match="n_samples=0"):
        EvalConfig(model="tiny", ablate="a.json", n_samples=2)
    assert "ablate" in EvalConfig(model="tiny", ablate="a.json").identity()
    assert "ablate" not in EvalConfig(model="tiny").identity()  # evaluations run before it keep their names


def test_a_continuation_without_position_ids_is_ablated_at_every_position(tiny):
    """A KV-cache step given no position ids (as HF generation may run it) is past the sink at every position:
    its logits equal the full unpadded forward's, ablated by index."""
    from mechsub import hooks
    from mechsub.filter import Ablation, ablating

    model = tiny.model
    a = Ablation(1, torch.linalg.qr(torch.randn(model.config.hidden_size, 2,
                                                generator=torch.Generator().manual_seed(3)))[0])  # fmt: skip
    ids = torch.tensor([tiny.tokenizer.encode("one two three four five")])
    with torch.no_grad():
        with ablating(model, [a]):
            first = model(input_ids=ids[:, :3], use_cache=True)
            cont = model(input_ids=ids[:, 3:], past_key_values=first.past_key_values).logits
        with hooks.edit(model, {hooks.resid_post(1): a.project_out}):
            want = model(input_ids=ids).logits[:, 3:]
        plain = model(input_ids=ids).logits[:, 3:]
    torch.testing.assert_close(cont, want, rtol=0, atol=1e-4)
    assert (cont - plain).abs().max() > 1e-3
