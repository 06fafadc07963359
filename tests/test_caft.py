"""analyses/caft.py end to end on a tiny study: multi-layer ablation files, control students trained with the same
ablation, the students evaluated with it kept on, and the blocked shares recomputed by hand from the raw shifts."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from mechsub import study
from mechsub.filter import read_ablations

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("caft_script", ROOT / "analyses" / "caft.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["caft_script"] = mod
    spec.loader.exec_module(mod)  # defines functions only: nothing runs on import
    return mod


def _fake_kl(checkpoints, base, corpus, n_windows):
    """The KL stage reads a built corpus; here every checkpoint gets a distinct number (the KL itself is
    tested in test_drift)."""
    return {label: [{"checkpoint": ck, "mean": 0.01 * (i + 1), "windows": 1, "tokens_per_window": 8}
                    for i, ck in enumerate(cks)] for label, cks in checkpoints.items()}  # fmt: skip


def test_bad_arguments_exit_with_what_to_fix(tmp_path, tiny_study):
    mod = _script()
    toml = str(tiny_study(tmp_path))
    for extra, msg in ((["--layer", "1,1"], "distinct layers"), (["--layer", "a"], "integers"),
                       (["--layer", "0,1", "--arms", "latents"], "vteacher and random1 arms only"),
                       (["--arms", "vteacher", "--ablated-controls", "cat"], "not this study's controls")):  # fmt: skip
        with pytest.raises(SystemExit, match=msg):
            mod.main(["--config", toml, *extra])


def test_multi_layer_caft_with_ablated_controls_and_the_ablation_kept_on(tmp_path, monkeypatch, tiny_study):
    mod = _script()
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
