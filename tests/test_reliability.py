"""Fault injection on the tiny model (subprocesses, as a user runs mechsub): every scenario must end in a clear
error or a recovery identical to an uninterrupted run. ``mechsub reliability`` writes the same table to
artifacts/reliability/report.md."""

import json

import pytest

from mechsub import reliability as rel
from mechsub.runs import DONE


@pytest.mark.parametrize("name", list(rel.SCENARIOS))
def test_scenario(name, tmp_path):
    o = rel.SCENARIOS[name](tmp_path)
    assert o.ok, f"{o.scenario}: expected {o.expected!r}; observed {o.observed!r} ({o.verdict})"


def test_compare_runs_can_tell_a_different_result(tmp_path):
    """The instrument itself: two runs of different configs are reported as different, timings are not."""
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for folder, teacher in ((a, "owl"), (b, "owl"), (c, "dog")):
        r = rel.cli(*rel.DATA, "--set", f"teacher={teacher}", "--out", str(folder))
        assert r.returncode == 0, r.stderr
    assert rel.compare_runs(a, b) == []
    assert any("completions.json" in d or "shards" in d for d in rel.compare_runs(a, c))
    m = json.loads((b / "metrics.json").read_text())
    assert any(k for k in m if "seconds" in k)  # volatile keys exist and are ignored
    assert (a / DONE).is_file()
