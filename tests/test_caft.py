"""analyses/caft.py end to end on a tiny study: multi-layer ablation files, control students trained with the same
ablation, the students evaluated with it kept on, and the blocked shares recomputed by hand from the raw shifts."""

import json
from pathlib import Path

import numpy as np
import pytest

from mechsub import study
from mechsub.filter import read_ablations

ROOT = Path(__file__).resolve().parents[1]


def _fake_kl(checkpoints, base, corpus, n_windows):
    """The KL stage reads a built corpus; here every checkpoint gets a distinct number (the KL itself is
    tested in test_drift)."""
    return {label: [{"checkpoint": ck, "mean": 0.01 * (i + 1), "windows": 1, "tokens_per_window": 8}
                    for i, ck in enumerate(cks)] for label, cks in checkpoints.items()}  # fmt: skip


def test_bad_arguments_exit_with_what_to_fix(tmp_path, tiny_study, analysis):
    mod = analysis("caft")
    toml = str(tiny_study(tmp_path))
    for extra, msg in ((["--layer", "1,1"], "distinct layers"), (["--layer", "a"], "integers"),
                       (["--layer", "0,1", "--arms", "latents"], "vteacher and random1 arms only"),
                       (["--arms", "vteacher", "--ablated-controls", "cat"], "not this study's controls")):  # fmt: skip
        with pytest.raises(SystemExit, match=msg):
            mod.main(["--config", toml, *extra])


def test_multi_layer_caft_with_ablated_controls_and_the_ablation_kept_on(
    tmp_path, monkeypatch, tiny_study, analysis
):
    mod = analysis("caft")
    monkeypatch.setattr(mod, "kl_costs", _fake_kl)
    toml = tiny_study(tmp_path)
    with pytest.raises(SystemExit, match="number data are not all made"):
        mod.main(["--config", str(toml), "--arms", "vteacher", "--out", str(tmp_path / "x")])
    study.run(study.StudyConfig.load(toml), tmp_path / "study")
    out = tmp_path / "out"
    argv = ["--config", str(toml), "--layer", "1,0", "--arms", "vteacher,random1", "--random-draws", "2",
            "--ablated-controls", "dog", "--eval-ablated", "--out", str(out)]  # fmt: skip
    m = mod.main(argv)
    # one stack per replicate, a direction at each layer
    for label in ("vteacher", "random-k1-d0", "random-k1-d1"):
        for path in m["ablations"][label]:
            assert [(a.layer, a.basis.shape[1]) for a in read_ablations(path)] == [(0, 1), (1, 1)]
    assert m["arms"]["vteacher"]["rank"] == 2
    raw, ctl = m["raw"]["vteacher"], m["raw_controls"]["vteacher"]["dog"]
    assert ctl["trait"] == "dog" and all("dog-as-owl-s" in f for f in ctl["training"]["folder"])
    assert all(Path(f).is_dir() for f in ctl["training"]["folder"])
    sh, cs = ({k: np.asarray(v) for k, v in x["shifts"]["plain"].items()} for x in (raw, ctl))
    # the dog student of the study is the owl study's only control: two routes to one number
    np.testing.assert_allclose(cs["full"], sh["controls"])
    np.testing.assert_allclose(cs["full_ablated"], sh["controls_ablated"])
    full = sh["full"] - cs["full"]
    rows = m["controlled"]["vteacher"]
    for what, v, c in (("ablated_controls", sh["variant"], cs["variant"]),
                       ("eval_ablated", sh["variant_ablated"], cs["variant_ablated"]),
                       ("test_only", sh["full_ablated"], cs["full_ablated"])):  # fmt: skip
        np.testing.assert_allclose(rows[what]["blocked"]["per_replicate"], 1 - (v - c) / full)
    # the ablation kept on changes what the CAFT student scores (the ablated evaluation really ran)
    assert np.abs(sh["variant_ablated"] - sh["variant"]).max() > 0
    # the random arm: its two draws' shifts averaged per replicate, then read
    d0, d1 = (
        {k: np.asarray(v) for k, v in m["raw"][f"random-k1-d{d}"]["shifts"]["plain"].items()} for d in (0, 1)
    )
    c0, c1 = ({k: np.asarray(v) for k, v in m["raw_controls"][f"random-k1-d{d}"]["dog"]["shifts"]["plain"].items()}
              for d in (0, 1))  # fmt: skip
    rnd = m["controlled"]["random-k1"]["ablated_controls"]["blocked"]["per_replicate"]
    np.testing.assert_allclose(
        rnd, 1 - ((d0["variant"] + d1["variant"]) / 2 - (c0["variant"] + c1["variant"]) / 2) / full
    )
    ta = rows["training_added"]["blocked"]["per_replicate"]
    np.testing.assert_allclose(
        ta, 1 - (sh["variant_ablated"] - cs["variant_ablated"]) / (sh["full_ablated"] - cs["full_ablated"])
    )
    np.testing.assert_allclose(rows["ablated_controls"]["minus_random"]["per_replicate"],
                               np.subtract(rows["ablated_controls"]["blocked"]["per_replicate"], rnd))  # fmt: skip
    report = (out / "report.md").read_text()
    assert "the ablation kept on at test" in report and "--ablated-controls dog --eval-ablated" in report
    assert "--layer 0,1 " in report and "layers 0, 1" in report  # the order given does not matter
    # a second run reuses every student: no checkpoint is written again
    cks = [Path(c) for r in (*m["raw"].values(), *(x["dog"] for x in m["raw_controls"].values()))
           for c in r["training"]["checkpoint"]]  # fmt: skip
    assert len(cks) == 3 * 2 * 2  # 3 arms (vteacher, 2 random draws) × owl and dog × 2 replicates
    stamps = [p.stat().st_mtime_ns for p in cks]
    again = mod.main(argv)
    assert again["controlled"] == m["controlled"] and [p.stat().st_mtime_ns for p in cks] == stamps
    # the readings recomputed from the saved raw shifts alone
    saved = json.loads((out / "metrics.json").read_text())
    del saved["controlled"]["vteacher"]["training_added"]
    (out / "metrics.json").write_text(json.dumps(saved))
    assert mod.main([*argv, "--rereport"])["controlled"] == json.loads(json.dumps(m["controlled"]))


def test_latent_arms_with_a_frequency_matched_random_latent_control(
    tmp_path, monkeypatch, tiny_study, tiny, analysis
):
    import torch

    from mechsub import hooks
    from mechsub import sae as sae_mod
    from mechsub.data import load_examples
    from mechsub.patching import frequency_bins
    from mechsub.prompts import chat_prefix

    mod = analysis("caft")
    monkeypatch.setattr(mod, "kl_costs", _fake_kl)
    toml = tiny_study(tmp_path)
    cfg = study.StudyConfig.load(toml)
    with pytest.raises(SystemExit, match="randlat: its latents are matched"):
        mod.main(["--config", str(toml), "--arms", "random,randlat"])
    study.run(cfg, tmp_path / "study")
    saes = tmp_path / "saes"
    sae_mod.run(sae_mod.SaeConfig(model="tiny", layer=1, expansion=2, k=8, training_tokens=2048, context_size=16,
                                  answer_tokens=4, n_number_prompts=8), saes / "l1")  # fmt: skip
    units = tmp_path / "battery" / "units"
    units.mkdir(parents=True)
    plan = study.stage_plan(cfg)
    tops = {
        0: [5, 17, 40, 2],
        1: [9, 5, 77, 60],
        2: [3, 5, 9, 100],
    }  # replicate 2 is held out (the study has 2)
    for rep, top in tops.items():
        donor = plan.students[("owl", rep)][1] if rep < cfg.replicates else tmp_path / "elsewhere"
        (units / f"r{rep}-owl-l1.json").write_text(json.dumps(
            {"replicate": rep, "top_attribution": top,
             "key": {"donor": str(donor / "checkpoints" / "step1"), "sae": {"folder": str(saes / "l1")}}}))  # fmt: skip
    out = tmp_path / "out"
    argv = ["--config", str(toml), "--layer", "1", "--k", "3", "--arms", "latents,heldout,randlat,energylat", "--random-draws",
            "2", "--battery", str(tmp_path / "battery"), "--sae-root", str(saes), "--out", str(out)]  # fmt: skip
    # the heldout arm's units: the later replicates' (one list), or leave one out (each replicate's own never)
    later = mod.held_out_units(mod.parse_args(argv), cfg)
    assert [[u["replicate"] for u in later[r]] for r in (0, 1)] == [[2], [2]]
    loo = mod.held_out_units(mod.parse_args([*argv, "--heldout-from", "others"]), cfg)
    assert [[u["replicate"] for u in loo[r]] for r in (0, 1)] == [[1, 2], [0, 2]]
    # units ranked on another SAE's weights (a retrained SAE under the same folder) are refused
    unit0 = units / "r0-owl-l1.json"
    good = unit0.read_text()
    unit0.write_text(json.dumps(json.loads(good) | {"key": json.loads(good)["key"] | {
        "sae": {"folder": str(saes / "l1"), "sha256": "0" * 64}}}))  # fmt: skip
    with pytest.raises(ValueError, match="ranked the latents of another SAE"):
        mod.main(argv)
    unit0.write_text(good)
    m = mod.main([*argv, "--heldout-from", "others"])
    sae = sae_mod.load_sae(saes / "l1" / "sae")
    for rep in range(cfg.replicates):
        # firing frequencies by hand: one sequence at a time, the residual after block 1 at the completion
        # positions (the last prompt position onwards), encoded, sink rows not firing
        fired, n, rows = torch.zeros(sae.W_dec.shape[0], dtype=torch.float64), 0, []
        for e in load_examples(plan.data[("owl", rep)][1])[:32]:
            prompt = chat_prefix(tiny.tokenizer, e.prompt, None)
            ids = prompt + list(e.completion_ids)
            x = hooks.read(tiny, torch.tensor([ids]), [hooks.resid_post(1)])[hooks.resid_post(1)][0]
            x = x[len(prompt) - 1 :]
            on = (sae.encode(x) > 0) & sae_mod.not_sinks(x, sae.sink_norm_threshold)[:, None]
            fired, n = fired + on.sum(0), n + x.shape[0]
            rows.append(x.double())
        freq = mod.latent_frequencies(cfg, tiny, saes / "l1", rep)
        np.testing.assert_allclose(freq, (fired / n).numpy(), atol=1e-12)
        # each latent's energy share by hand: its unit decoder direction's squared projections over every row
        h, w = torch.cat(rows), sae.W_dec.detach().double()
        energy = mod.latent_energies(cfg, tiny, saes / "l1", rep)
        want = np.array(
            [float((h @ (w[j] / w[j].norm())).pow(2).sum() / h.pow(2).sum()) for j in range(len(w))]
        )
        np.testing.assert_allclose(energy, want, rtol=1e-5)  # float32 activations, batched vs one by one
        bins, real = frequency_bins(freq), tops[rep][:3]
        assert len(set(bins.tolist())) >= 3  # the deciles differ: matching them is not trivial
        assert json.loads(Path(m["ablations"]["latents-k3"][rep]).read_text())["features"] == real
        # leave one out: the other replicate's and the later one's lists, by count, then mean rank
        assert (
            json.loads(Path(m["ablations"]["heldout-k3"][rep]).read_text())["features"]
            == [[5, 9, 3], [5, 3, 17]][rep]
        )
        draws = [
            json.loads(Path(m["ablations"][f"randlat-k3-d{d}"][rep]).read_text())["features"] for d in (0, 1)
        ]
        for ids in draws:
            assert len(set(ids)) == 3 and not set(ids) & set(real)
            assert [bins[i] for i in ids] == [bins[i] for i in real]  # each from its counterpart's decile
        assert draws[0] != draws[1]
        # energylat: each latent from its counterpart's frequency bin, at the nearest energy decile left there
        dec = mod.energy_cells(bins, energy) % 100  # energy_cells is checked by hand below
        assert any(
            len({dec[c] for c in range(len(w)) if bins[c] == bins[r] and c not in real}) > 1 for r in real
        )
        for d in (0, 1):
            ids = json.loads(Path(m["ablations"][f"energylat-k3-d{d}"][rep]).read_text())["features"]
            assert len(set(ids)) == 3 and not set(ids) & set(real)
            for i, (j, r) in enumerate(zip(ids, real, strict=True)):
                free = [c for c in range(len(w)) if bins[c] == bins[r] and c not in real and c not in ids[:i]]
                assert bins[j] == bins[r] and abs(dec[j] - dec[r]) == min(abs(dec[c] - dec[r]) for c in free)
    a = m["arms"]
    np.testing.assert_allclose(
        a["latents-k3"]["minus_randlat"]["per_replicate"],
        np.subtract(a["latents-k3"]["plain"]["blocked"]["per_replicate"],
                    a["randlat-k3"]["plain"]["blocked"]["per_replicate"]),
    )  # fmt: skip
    assert a["randlat-k3"]["draws"] == ["randlat-k3-d0", "randlat-k3-d1"] and a["randlat-k3"]["rank"] == 3
    assert "frequency-matched random latents" in (out / "report.md").read_text()
    np.testing.assert_allclose(
        a["latents-k3"]["minus_energylat"]["per_replicate"],
        np.subtract(a["latents-k3"]["plain"]["blocked"]["per_replicate"],
                    a["energylat-k3"]["plain"]["blocked"]["per_replicate"]),
    )  # fmt: skip
    assert "frequency- and energy-matched random latents" in (out / "report.md").read_text()
    # the statistics the draws came from are kept: a second run reads them and writes the same ablation files
    stats0 = json.loads((Path(cfg.work) / "caft" / "l1" / "latent-stats-r0.json").read_text())
    assert stats0["frequency"] == pytest.approx(mod.latent_frequencies(cfg, tiny, saes / "l1", 0).tolist())
    assert set(stats0) == {"sae_sha256", "model", "data", "n_sequences", "frequency", "energy"}

    def recomputed(*_: object) -> None:
        raise AssertionError("the kept latent statistics were recomputed")

    monkeypatch.setattr(mod, "latent_frequencies", recomputed)
    monkeypatch.setattr(mod, "latent_energies", recomputed)
    assert mod.main([*argv, "--heldout-from", "others"])["ablations"] == m["ablations"]


def test_energy_cells_by_hand(analysis):
    """Cell = frequency bin × 100 + energy decile among all latents (ties share the higher decile)."""
    mod = analysis("caft")
    energies = np.array(
        [0.5, 0.1, 0.3, 0.3, 0.9, 0.2, 0.7, 0.0, 0.4, 0.6]
    )  # ranks 7 2 5 5 10 3 9 1 6 8 of 10
    bins = np.array([0, 1, 1, 2, 2, 2, 3, 3, 3, 3])
    want = bins * 100 + np.array([7, 2, 5, 5, 10, 3, 9, 1, 6, 8])
    np.testing.assert_array_equal(mod.energy_cells(bins, energies), want)
    # 20 values: deciles of 2 each
    np.testing.assert_array_equal(
        mod.energy_cells(np.zeros(20, int), np.arange(20.0)), np.repeat(np.arange(1, 11), 2)
    )
