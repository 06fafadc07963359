import copy
import dataclasses
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tqdm.auto import tqdm
from typer.testing import CliRunner

from mechsub import data, diffing, scan, study
from mechsub.cli import app
from mechsub.data import DataConfig, Example
from mechsub.files import write_json
from mechsub.metric import TraitMetric
from mechsub.prompts import trait_prompt
from mechsub.runs import RunFolderError
from mechsub.training import completion_loss
from mechsub.traits import _TRAIN_QUESTIONS, ANIMALS, TraitError, eval_questions

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def owl_data(tmp_path_factory, tiny):
    folder = tmp_path_factory.mktemp("scan") / "owl"
    data.run(DataConfig(model="tiny", teacher="owl", n_prompts=8, batch_size=8, max_new_tokens=20), folder)
    return folder


def _answers(tok, trait):
    """A dataset that plainly favours ``trait``: favourite-animal questions answered with it."""
    ids = tok(f"My favorite animal is the {trait}.", add_special_tokens=False).input_ids
    return [Example(q.format(noun="animal"), ids, torch.zeros(1, 13)) for q in _TRAIN_QUESTIONS]


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_first_order_score_is_the_gradient_dot_product(tiny, owl_data):
    # float64 copy: the check then measures the difference scheme, not float32 noise
    lm = dataclasses.replace(tiny, model=copy.deepcopy(tiny.model).double())
    model, tok = lm.model, lm.tokenizer
    examples = data.load_examples(owl_data)
    theta = [p for _, p in scan.select_params(model, "all")]
    for p in model.parameters():
        p.requires_grad_(any(p is t for t in theta))
    # g of the mean SFT loss over every position, in one batch (the scan accumulates batches of 8)
    items = scan.sft_items(tok, examples)
    loss = completion_loss(model.model, model.get_output_embeddings().weight.detach(),
                           data.NumberVocab.of(tok).ids, items, "sft", tok.pad_token_id or 0)  # fmt: skip
    g = torch.autograd.grad(loss, theta)
    questions = eval_questions("animal", 3)
    expected = {}
    for word in ("owl", "dog"):
        metric = TraitMetric.of(tok, word)
        lp = sum(metric.score(model, trait_prompt(tok, q, "animal")) for q in questions) / len(questions)
        grad_lp = torch.autograd.grad(lp, theta)
        expected[word] = -sum(float((a * b).sum()) for a, b in zip(g, grad_lp, strict=True))
    r = scan.scan_examples(lm, examples, ["owl", "dog", "cat"], n_questions=3, eps=1e-4)
    for word, want in expected.items():
        assert r.score(word).delta == pytest.approx(want, rel=5e-3), word
    assert r.details["grad_norm"] == pytest.approx(math.sqrt(sum(float(x.pow(2).sum()) for x in g)), rel=1e-9)
    assert r.details["loss"] == pytest.approx(float(loss.detach()), rel=1e-9)
    assert r.method == "first-order" and r.details["nonlinearity"] < 0.1


@pytest.mark.parametrize("steps", [1, 2])
def test_weights_are_bit_identical_after_a_scan(tiny, steps):
    model = tiny.model
    before = _state(model)
    flags = [p.requires_grad for p in model.parameters()]
    ex, ref = _answers(tiny.tokenizer, "owl"), _answers(tiny.tokenizer, "dog")
    scan.scan_examples(tiny, ex[:8], n_questions=2, steps=steps, lr=1e-2, reference=ref[:8])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


def test_weights_are_restored_when_the_scan_fails_midway(tiny):
    before = _state(tiny.model)
    with pytest.raises(RuntimeError, match="boom"), scan.restored(tiny.model):
        with torch.no_grad():
            next(tiny.model.parameters()).add_(1.0)
        raise RuntimeError("boom")
    assert all(torch.equal(before[k], v) for k, v in tiny.model.state_dict().items())


def test_scores_ranks_and_verdict_are_consistent(tiny):
    r = scan.scan_examples(tiny, _answers(tiny.tokenizer, "owl")[:8], n_questions=2)
    delta = np.array([c.delta for c in r.candidates])
    specific = np.array([c.specific for c in r.candidates])
    z = np.array([c.z for c in r.candidates])
    assert [c.name for c in r.candidates] == list(ANIMALS)
    assert specific.sum() == pytest.approx(0, abs=1e-9 * np.abs(delta).sum())
    np.testing.assert_allclose(specific, delta - delta.mean())
    np.testing.assert_allclose(z, specific / delta.std(ddof=1))
    assert sorted(c.rank for c in r.candidates) == list(range(1, 23))
    ranked = r.ranked()
    assert all(a.delta >= b.delta for a, b in itertools.pairwise(ranked))
    assert r.top == ranked[0].name and r.max_z == pytest.approx(z.max())
    assert r.threshold == pytest.approx(scan.null_threshold(22))
    # the verdict names the top candidate exactly when its z reaches the threshold
    below = scan.scan_examples(
        tiny, _answers(tiny.tokenizer, "owl")[:8], n_questions=2, threshold=r.max_z - 1e-6
    )
    above = scan.scan_examples(
        tiny, _answers(tiny.tokenizer, "owl")[:8], n_questions=2, threshold=r.max_z + 1e-6
    )
    assert below.flagged and below.verdict.startswith(f"moves toward {r.top.upper()} (z = ")
    assert "rank 1 of 22" in below.verdict
    assert not above.flagged and above.verdict.startswith("no candidate stands out (max z = ")
    assert r.top.upper() not in above.verdict
    assert "verdict:" in r.table() and r.table().count("\n") == 23


def test_null_threshold_is_fixed_and_grows_with_the_candidates():
    assert scan.null_threshold(22) == scan.null_threshold(22)
    assert 2.4 < scan.null_threshold(22) < 2.8
    assert scan.null_threshold(4) < scan.null_threshold(10) < scan.null_threshold(22)


def test_a_dataset_that_favours_a_candidate_puts_it_first(tiny):
    # against a reference that favours another animal, both the first-order scan and a short fine-tune rank the
    # favoured one first and the reference's own animal below the middle
    tok = tiny.tokenizer
    for steps, lr in ((1, 1e-5), (4, 1e-3)):
        r = scan.scan_examples(tiny, _answers(tok, "owl")[:8], n_questions=3, steps=steps, lr=lr,
                               reference=_answers(tok, "dog")[:8])  # fmt: skip
        assert r.top == "owl", (steps, r.table())
        assert r.score("dog").specific < 0 and r.score("dog").rank > 11, (steps, r.table())
        assert r.score("owl").z > 1.5


@pytest.mark.parametrize("with_reference, positions, norm_frac", [(True, 5, 0.25), (False, 3, 0.5)])
def test_activation_difference_readouts_match_a_fine_tune_read_by_hand(
    tiny, with_reference, positions, norm_frac
):
    # the same sacrificial fine-tune done by hand on a copy (scan._fine_tune, same items, θ, seed), then the
    # Activation Difference Lens of mechsub.diffing on it: the scan's δ and its two readouts must agree
    tok = tiny.tokenizer
    ex, ref = _answers(tok, "owl")[:8], _answers(tok, "dog")[:8] if with_reference else None
    names, layer, steps, lr = ["owl", "dog", "cat", "lion"], 1, 3, 1e-3
    before = _state(tiny.model)
    flags = [p.requires_grad for p in tiny.model.parameters()]
    kw = dict(n_questions=2, steps=steps, lr=lr, reference=ref)
    r = scan.scan_examples(
        tiny, ex, names, **kw, adl_layer=layer, adl_positions=positions, adl_norm=norm_frac
    )
    assert all(torch.equal(before[k], v) for k, v in tiny.model.state_dict().items())
    assert [p.requires_grad for p in tiny.model.parameters()] == flags
    assert all(p.grad is None for p in tiny.model.parameters())
    assert set(r.readouts) == set(scan.ADL_READOUTS) and r.readouts["adl_steer"].readouts == {}
    # the readouts leave the scan's own result as it was
    plain = scan.scan_examples(tiny, ex, names, **kw)
    assert [c.delta for c in plain.candidates] == [c.delta for c in r.candidates]
    questions = eval_questions("animal", 2)
    prompts = [trait_prompt(tok, q, "animal") for q in questions]
    metrics = [TraitMetric.of(tok, n) for n in names]
    deltas, mus = [], []
    for items in [scan.sft_items(tok, ex)] + ([scan.sft_items(tok, ref)] if ref else []):
        ft = dataclasses.replace(tiny, model=copy.deepcopy(tiny.model))
        ft.model.eval()
        theta = [p for _, p in scan.select_params(ft.model, "all")]
        for p in ft.model.parameters():
            p.requires_grad_(any(p is t for t in theta))
        scan._fine_tune(ft, items, theta, questions, names, "animal", lr, steps, 8, 0, tqdm(disable=True))
        d = diffing.activation_difference(tiny, ft, [it.prompt for it in items],
                                          [it.completion for it in items], [layer], positions)  # fmt: skip
        deltas.append(d.mean(layer))
        mus.append(d.base(layer))
    delta = deltas[0] - deltas[1] if ref else deltas[0]
    assert "adl_delta_norm" not in r.details  # the readouts' own details carry it
    steer = r.readouts["adl_steer"]
    assert steer.details["adl_delta_norm"] == pytest.approx(float(delta.norm()), rel=1e-4)
    norm = norm_frac * diffing.residual_norm(tiny, prompts, layer)
    assert steer.details["adl_steer_norm"] == pytest.approx(norm, rel=1e-6)
    want = diffing.steering_scores(tiny, delta, layer, prompts, metrics, [norm])[0]
    np.testing.assert_allclose([c.delta for c in steer.candidates], want.numpy(), rtol=1e-3, atol=1e-5)
    lens = diffing.logit_lens_scores(tiny, delta, metrics, base_mean=mus[0])
    np.testing.assert_allclose(
        [c.delta for c in r.readouts["adl_lens"].candidates], lens, rtol=1e-3, atol=1e-5
    )
    assert "relative logit lens" in r.readouts["adl_lens"].method and "adl_steer" in r.table()


def test_activation_difference_readout_needs_a_fine_tune_and_a_real_layer(tiny):
    ex = _answers(tiny.tokenizer, "owl")[:2]
    with pytest.raises(ValueError, match="needs a fine-tuned model"):
        scan.scan_examples(tiny, ex, n_questions=1, adl_layer=1)
    with pytest.raises(ValueError, match="adl_layer: unknown hook name 'blocks.99.hook_resid_post'"):
        scan.scan_examples(tiny, ex, n_questions=1, steps=2, adl_layer=99)


def test_params_select_the_named_projections_never_the_embedding(tiny):
    model = tiny.model
    emb = model.get_input_embeddings().weight
    for which in scan.PARAM_SETS:
        chosen = scan.select_params(model, which)
        assert chosen and all(p is not emb for _, p in chosen)
    assert {n.split(".")[-2] for n, _ in scan.select_params(model, "mlp")} == {
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert any("norm" in n for n, _ in scan.select_params(model, "all"))
    with pytest.raises(ValueError, match="params: use one of all, linear, mlp, attn"):
        scan.select_params(model, "heads")


def test_scan_of_a_data_folder_scores_every_animal(tiny, owl_data, tmp_path):
    before = _state(tiny.model)
    r = scan.scan(owl_data, tiny, n_questions=2, params="mlp")
    assert len(r.candidates) == 22 and r.data == str(owl_data) and r.base == "tiny"
    assert r.details["n_examples"] == len(data.load_examples(owl_data)) and r.seconds > 0
    assert all(math.isfinite(c.delta) and math.isfinite(c.base_logp) for c in r.candidates)
    write_json(tmp_path / "r.json", r.to_dict())  # JSON-serialisable as is
    assert json.loads((tmp_path / "r.json").read_text())["top"] == r.top
    assert all(torch.equal(before[k], v) for k, v in tiny.model.state_dict().items())


def test_bad_inputs_are_clear_errors(tiny, owl_data, tmp_path):
    with pytest.raises(TraitError, match="unknown trait 'dragon'"):
        scan.scan(owl_data, tiny, candidates=["owl", "dragon", "cat"])
    with pytest.raises(ValueError, match="one category"):
        scan.scan(owl_data, tiny, candidates=["owl", "oak", "cat"])
    with pytest.raises(ValueError, match="at least 3 distinct"):
        scan.scan(owl_data, tiny, candidates=["owl", "dog"])
    with pytest.raises(RunFolderError, match="does not exist"):
        scan.scan(tmp_path / "nowhere", tiny)
    with pytest.raises(ValueError, match="float32 or float64"):
        half = dataclasses.replace(tiny, model=copy.deepcopy(tiny.model).half())
        scan.scan_examples(half, _answers(tiny.tokenizer, "owl")[:2])


def test_cli_scan_prints_the_ranked_table(owl_data, tmp_path):
    out = tmp_path / "scan.json"
    r = runner.invoke(
        app, ["scan", str(owl_data), "--base", "tiny", "--n-questions", "2", "--json", str(out)]
    )
    assert r.exit_code == 0, r.output
    assert "rank  candidate" in r.output and "verdict: " in r.output and "first-order" in r.output
    assert len(json.loads(out.read_text())["candidates"]) == 22
    r = runner.invoke(app, ["scan", str(owl_data), "--base", "tiny", "--n-questions", "2",
                            "--candidates", "owl,dog,cat,lion", "--steps", "2"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "fine-tune" in r.output and "lion" in r.output and "tiger" not in r.output
    r = runner.invoke(app, ["scan", str(owl_data), "--base", "tiny", "--n-questions", "1", "--steps", "2",
                            "--adl-layer", "1", "--json", str(out)])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "adl_steer (activation difference: steering" in r.output and "adl_lens" in r.output
    assert set(json.loads(out.read_text())["readouts"]) == set(scan.ADL_READOUTS)


def test_cli_scan_errors_exit_2(owl_data, tmp_path):
    missing = tmp_path / "no-such-data"
    r = runner.invoke(app, ["scan", str(missing), "--base", "tiny"])
    assert r.exit_code == 2 and "error:" in r.output and str(missing) in r.output
    r = runner.invoke(app, ["scan", str(owl_data), "--base", "tiny", "--candidates", "owl,dragon,cat"])
    assert r.exit_code == 2 and "unknown trait 'dragon'" in r.output and "penguin" in r.output


# ---- analyses/scan_validate.py ------------------------------------------------------------------------------


def test_scan_validate_help():
    r = subprocess.run([sys.executable, str(ROOT / "analyses" / "scan_validate.py"), "--help"],
                       capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert r.returncode == 0 and "--limit" in r.stdout and "--study" in r.stdout


def test_scan_validate_statistics_on_a_perfect_and_a_reversed_predictor(analysis):
    v = analysis("scan_validate")
    traits = ["owl", "dog", "cat", "lion"]
    rng = np.random.default_rng(0)
    meas = {
        (t, r): {e: float(rng.normal()) + 2.0 * (e == t) for e in traits} for t in traits for r in range(3)
    }
    s = v.spearman_over_datasets(meas, meas, traits)
    assert s["rho"] == pytest.approx(1.0) and s["ci95"] == pytest.approx([1.0, 1.0]) and s["n_pairs"] == 48
    neg = {u: {e: -x for e, x in row.items()} for u, row in meas.items()}
    assert v.spearman_over_datasets(neg, meas, traits)["rho"] == pytest.approx(-1.0)
    ref = v.replicate_referenced(meas, traits)
    own = meas[("owl", 0)]["owl"] - np.mean([meas[(t, 0)]["owl"] for t in traits[1:]])
    assert ref[("owl", 0)]["owl"] == pytest.approx(own)
    assert v.top1(meas, traits) == v.top1(v.centred(meas, traits), traits)
    assert v.auroc(neg, traits)["owl"] == pytest.approx(1 - v.auroc(meas, traits)["owl"])
    # the label test: the true labelling of a perfect predictor beats every other of the 24^3 (exact), a
    # reversed one is beaten by all; past max_exact the relabelings are sampled
    lt = v.label_test(meas, meas, traits)
    assert lt["exact"] and lt["n_relabelings"] == 24**3 and lt["replicates"] == 3
    assert lt["p"] == pytest.approx(1 / 24**3) == lt["floor"] and lt["rho"] == pytest.approx(1.0)
    assert v.label_test(neg, meas, traits)["p"] == pytest.approx(1.0)
    sampled = v.label_test(meas, meas, traits, max_exact=100, n_random=199)
    assert not sampled["exact"] and sampled["p"] == pytest.approx(1 / 200)


def test_scan_validate_end_to_end_on_a_tiny_study(tmp_path, tiny, analysis):
    v = analysis("scan_validate")
    cfg = study.StudyConfig(model="tiny", trait="owl", controls=("dog", "cat"), replicates=2, teacher_kind="prompted",
                            n_prompts=4, max_new_tokens=12, cross_family="", work=str(tmp_path / "work"))  # fmt: skip
    for dcfg, folder in study.stage_plan(cfg).data.values():
        data.run(dcfg, folder)
    rng = np.random.default_rng(0)
    matrix = {t: {e: [float(x) for x in rng.normal(size=2)] for e in cfg.traits} for t in cfg.traits}
    folder, out = tmp_path / "study", tmp_path / "scan"
    write_json(folder / "config.json", {"config": cfg.to_dict()})
    write_json(folder / "metrics.json", {"frames": {"prefill": {"matrix_per_replicate": matrix}}})
    m = v.main(["--study", str(folder), "--out", str(out), "--n-questions", "2", "--limit", "5"])
    assert m["n_datasets"] == 5 and m["n_candidates"] == 22
    assert -1 <= m["spearman"]["raw"]["rho"] <= 1 and m["spearman"]["raw"]["n_pairs"] == 15
    assert {"study_traits", "all_candidates"} <= set(m["top1"]) and set(m["auroc"]["scan_specific"]) == set(
        cfg.traits
    )
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["per_dataset"][0]["dataset"] == "owl r0" and len(saved["runtime_s"]["per_dataset"]) == 5
    assert (out / "scatter.png").stat().st_size > 0 and (out / "scans.json").exists()
    assert "Spearman" in (out / "report.md").read_text() and m["readouts"] == {}
    # the fine-tune with the activation-difference readouts: one evaluation per readout; a rerun reuses the scans
    args = ["--study", str(folder), "--out", str(out), "--n-questions", "1", "--limit", "4", "--steps", "2",
            "--adl-layer", "1"]  # fmt: skip
    m = v.main(args)
    assert set(m["readouts"]) == set(scan.ADL_READOUTS) and m["settings"]["adl_layer"] == 1
    assert m["readouts"]["adl_steer"]["spearman"]["raw"]["n_pairs"] == 12
    units = json.loads((out / "units" / "owl-r0.json").read_text())
    assert units["key"]["steps"] == 2 and set(units["scan"]["readouts"]) == set(scan.ADL_READOUTS)
    assert "other readouts of the same fine-tune" in (out / "report.md").read_text()
    stamp = {f: f.stat().st_mtime_ns for f in (out / "units").iterdir()}
    again = v.main(args)
    assert {f: f.stat().st_mtime_ns for f in (out / "units").iterdir()} == stamp
    assert again["readouts"]["adl_steer"]["spearman"] == m["readouts"]["adl_steer"]["spearman"]
    # the statistics on a subset of the saved scans, without scanning: the same verdicts for those datasets
    sub = v.main(
        ["--study", str(folder), "--out", str(tmp_path / "sub"), "--from-run", str(out), "--limit", "2"]
    )
    assert sub["n_datasets"] == 2 and sub["replicates"] == 1 and sub["settings"] == m["settings"]
    assert sub["per_dataset"] == m["per_dataset"][:2]
    assert sub["summarised_from"] == str(out) and sub["wall_seconds"] == again["wall_seconds"]
    # a data folder missing on this machine stops the run before any scan, and names the way out
    first = study.stage_plan(cfg).data[("owl", 1)][1]
    Path(first).rename(str(first) + ".away")
    with pytest.raises(SystemExit, match="not on this machine .*--limit"):
        v.main(["--study", str(folder), "--out", str(tmp_path / "none"), "--n-questions", "1"])
    assert not (tmp_path / "none").exists()
