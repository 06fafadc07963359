import json
from dataclasses import dataclass

import pytest

from mechsub.config import Config, doc
from mechsub.runs import RunFolderError, atomic_write_text, stage


@dataclass(frozen=True)
class Cfg(Config):
    stage = "demo-stage"
    seed: int = doc(0, "seed")


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_text(tmp_path / "a" / "x.txt", "hello")
    atomic_write_text(tmp_path / "a" / "x.txt", "world")
    assert (tmp_path / "a" / "x.txt").read_text() == "world"
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["x.txt"]


def test_config_json_first_then_metrics(tmp_path):
    with stage(tmp_path / "r", Cfg(seed=3), model={"name": "tiny"}) as r:
        cfg = json.loads((tmp_path / "r" / "config.json").read_text())
        assert cfg["config"] == {"seed": 3} and cfg["seed"] == 3 and cfg["stage"] == "demo-stage"
        assert cfg["model"] == {"name": "tiny"} and "git_commit" in cfg and "mechsub_version" in cfg
        assert not (tmp_path / "r" / "metrics.json").exists()
        r.finish({"x": 1})
    assert json.loads((tmp_path / "r" / "metrics.json").read_text()) == {"x": 1}


def test_finished_stage_is_skipped(tmp_path):
    with stage(tmp_path, Cfg()) as r:
        r.finish({"x": 1})
    with stage(tmp_path, Cfg()) as r:
        assert r.done and r.metrics == {"x": 1}


def test_different_config_is_refused(tmp_path):
    with stage(tmp_path, Cfg(seed=1)) as r:
        r.finish({})
    with pytest.raises(RunFolderError, match="different config"), stage(tmp_path, Cfg(seed=2)):
        pass


@dataclass(frozen=True)
class Grown(Config):
    """Cfg after a release added a field whose default keeps the old behaviour."""

    stage = "demo-stage"
    seed: int = doc(0, "seed")
    extra: str = doc("", "added later", optional=True)


def test_an_optional_field_at_its_default_keeps_old_runs_and_names(tmp_path):
    with stage(tmp_path, Cfg(seed=1)) as r:  # written before the field existed
        r.finish({"x": 1})
    with stage(tmp_path, Grown(seed=1)) as r:
        assert r.done and r.metrics == {"x": 1}
    assert Grown(seed=1).identity() == Cfg(seed=1).to_json()  # the same folder names (hashes) as before
    assert Grown(seed=1, extra="m.json").identity() != Cfg(seed=1).to_json()
    with (
        pytest.raises(RunFolderError, match="different config"),
        stage(tmp_path, Grown(seed=1, extra="m.json")),
    ):
        pass


def test_units_resume_without_recomputing(tmp_path):
    calls = []

    def work(k):
        calls.append(k)
        if k == 2 and len(calls) == 3:
            raise KeyboardInterrupt  # the first attempt dies in unit 2
        return {"k": k}

    with pytest.raises(KeyboardInterrupt), stage(tmp_path, Cfg()) as r:
        for k in range(4):
            r.unit(f"u{k}", lambda k=k: work(k))
    assert calls == [0, 1, 2]
    with stage(tmp_path, Cfg()) as r:
        results = [r.unit(f"u{k}", lambda k=k: work(k)) for k in range(4)]
        assert r.resumed_units == ["u0", "u1"] and r.computed_units == ["u2", "u3"]
    assert results == [{"k": k} for k in range(4)]
    assert calls == [0, 1, 2, 2, 3]


def test_force_starts_over(tmp_path):
    with stage(tmp_path, Cfg(seed=1)) as r:
        r.unit("u", lambda: 1)
        r.finish({"x": 1})
    with stage(tmp_path, Cfg(seed=2), force=True) as r:
        assert not r.done and not (tmp_path / "units").exists()


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path):
    from mechsub.runs import atomic_dir

    target = tmp_path / "ck"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "b").write_text("2")
        raise RuntimeError("killed while writing")
    assert [p.name for p in tmp_path.iterdir()] == ["ck"] and [p.name for p in target.iterdir()] == ["a"]
