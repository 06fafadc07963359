"""analyses/invert_compare.py: two invert runs read side by side, the difference paired by teacher seed."""

import json
from pathlib import Path

import pytest
from scipy import stats as st

ROOT = Path(__file__).resolve().parents[1]


def _run(folder, inverted, families=("next", "choice")):
    """A metrics.json with the inverted teacher's per-seed shares (correct = 1 − inverted, nothing else)."""

    def share(ps):
        return {"mean": sum(ps) / len(ps), "ci95": [0.0, 1.0], "per_seed": list(ps)}

    fam = {f: {"inverted": share(v), "correct": share([1 - x for x in v]), "hashed": share([0.0] * len(v)),
               "other": share([0.0] * len(v))} for f, v in zip(families, inverted, strict=True)}  # fmt: skip
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps({
        "design": {"seeds": [0, 1, 2], "n_test_per_family": 16, "families": list(families)},
        "verification": {"inv": {"families": fam, "known_families": None}}}))  # fmt: skip
    return folder


def test_the_difference_is_paired_by_seed(tmp_path, analysis):
    mod = analysis("invert_compare")
    a = _run(tmp_path / "a", [[0.5, 0.75, 0.5], [0.25, 0.5, 0.5]])
    b = _run(tmp_path / "b", [[0.75, 1.0, 0.5625], [0.5, 0.5, 0.4375]])
    c = mod.main(["--a", str(a), "--b", str(b), "--kinds", "inv", "--out", str(tmp_path / "o")])
    d = c["inv"]["next"]["inverted"]["b_minus_a"]
    assert d["mean"] == pytest.approx((0.25 + 0.25 + 0.0625) / 3)
    assert d["t_p"] == pytest.approx(st.ttest_rel([0.75, 1.0, 0.5625], [0.5, 0.75, 0.5]).pvalue)
    assert d["sign_flip_floor"] == 0.25 and "known families" not in c["inv"]
    assert (
        "| inv | choice | inverted | 42% [0%, 100%] | 48% [0%, 100%] | +6%"
        in (tmp_path / "o" / "compare.md").read_text()
    )
    other = _run(tmp_path / "c", [[0.5, 0.5, 0.5]], families=("next",))
    with pytest.raises(ValueError, match="differ in families"):
        mod.main(["--a", str(a), "--b", str(other), "--kinds", "inv", "--out", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="kind 'true' is not in both runs"):
        mod.main(["--a", str(a), "--b", str(b), "--kinds", "true", "--out", str(tmp_path / "o")])
