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


# --- run folders that deserve trust (marker, done record, identity with inputs and code, locks) ------------
import os  # noqa: E402

from mechsub import runs  # noqa: E402


@dataclass(frozen=True)
class Reader(Config):
    """A stage that reads a file: the file's content is part of the run's identity."""

    stage = "demo-reader"
    inputs = ("source",)
    source: str = doc("", "a file it reads")


def _finish(root, cfg, value=1, **kw):
    with stage(root, cfg, **kw) as r:
        if not r.done:
            (root / "out.txt").write_text(str(value))
            r.finish({"x": value})
        return r


def test_marker_first_and_done_record_last(tmp_path):
    root = tmp_path / "r"
    with stage(root, Cfg()) as r:
        assert (root / runs.MARKER).is_file() and not (root / runs.DONE).exists()
        (root / "out.txt").write_text("hello")
        r.finish({"x": 1})
    done = json.loads((root / runs.DONE).read_text())
    assert set(done["outputs"]) == {"out.txt", "metrics.json"}
    assert done["outputs"]["out.txt"]["sha256"] == runs.sha256_file(root / "out.txt")
    assert runs.verify(root) == [] and runs.is_finished(root)


def test_metrics_alone_is_not_proof_of_completion(tmp_path):
    root = tmp_path / "r"
    _finish(root, Cfg())
    (root / "out.txt").write_text("tampered")
    with runs.recording() as events:
        r = _finish(root, Cfg())
    # a changed output makes the run unfinished: run again whole (a unit's side files could be the damaged ones)
    assert r.metrics != {} and (root / "out.txt").read_text() == "1" and runs.verify(root) == []
    assert events[0].status == "rerun" and "out.txt was changed" in events[0].reason


def test_a_deleted_side_output_of_a_unit_is_recomputed(tmp_path):
    root = tmp_path / "r"

    def work(r):
        def unit():
            (root / "shard.bin").write_bytes(b"weights")  # the unit's side file, written before its unit file
            return {"n": 1}

        r.unit("u0", unit)
        r.finish({"x": 1})

    with stage(root, Cfg()) as r:
        work(r)
    (root / "shard.bin").unlink()
    with stage(root, Cfg()) as r:
        assert not r.done
        work(r)
    assert (root / "shard.bin").read_bytes() == b"weights" and runs.verify(root) == []


def test_files_a_run_did_not_make_survive_its_replacement(tmp_path):
    root = tmp_path / "r"
    _finish(root, Cfg(seed=1))
    (root / "my-notes.md").write_text("keep")
    _finish(root, Cfg(seed=2), value=2, force=True)
    assert (root / "my-notes.md").read_text() == "keep" and (root / "out.txt").read_text() == "2"


def test_a_run_from_before_markers_is_adopted_and_run_again(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    (root / "config.json").write_text(json.dumps({"stage": "demo-stage", "mechsub_version": "0.1.0",
                                                  "config": {"seed": 0}}))  # fmt: skip
    (root / "metrics.json").write_text("{}")
    with runs.recording() as events:
        assert _finish(root, Cfg()).metrics == {"x": 1}
    assert events[0].status == "rerun" and runs.is_finished(root)


def test_an_output_of_a_run_is_identified_by_its_own_recorded_hash(tmp_path):
    root = tmp_path / "r"
    with stage(root, Cfg()) as r:
        (root / "a.json").write_text("1")
        (root / "b.json").write_text("2")
        r.finish({})
    done = json.loads((root / runs.DONE).read_text())["outputs"]
    assert runs.content_id(str(root / "a.json")) == f"sha256:{done['a.json']['sha256']}"
    # a file added to the finished run afterwards is identified by its content, not by the run's record
    (root / "extra.json").write_text("x")
    first = runs.content_id(str(root / "extra.json"))
    (root / "extra.json").write_text("y")
    assert runs.content_id(str(root / "extra.json")) != first


def test_force_refuses_a_folder_mechsub_did_not_write(tmp_path):
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "config.json").write_text("{}")
    (mine / "notes.md").write_text("keep")
    with pytest.raises(RunFolderError, match="not a mechsub run folder"), stage(mine, Cfg(), force=True):
        pass
    assert (mine / "notes.md").read_text() == "keep"


def test_force_keeps_the_old_run_until_the_new_one_finishes(tmp_path):
    root = tmp_path / "r"
    _finish(root, Cfg(seed=1), value=1)
    with pytest.raises(KeyboardInterrupt), stage(root, Cfg(seed=2), force=True):
        assert runs.aside_folders(root)  # moved aside, not deleted
        raise KeyboardInterrupt
    assert (root / "out.txt").read_text() == "1" and runs.verify(root) == []  # put back
    _finish(root, Cfg(seed=2), value=2, force=True)
    assert (root / "out.txt").read_text() == "2" and not runs.aside_folders(root)


def test_force_never_replaces_a_run_of_another_stage(tmp_path):
    root = tmp_path / "r"
    _finish(root, Cfg())
    with pytest.raises(RunFolderError, match="will not replace it"), stage(root, Reader(), force=True):
        pass


def test_a_changed_input_makes_a_finished_run_stale(tmp_path):
    src, root = tmp_path / "src.txt", tmp_path / "r"
    src.write_text("a")
    _finish(root, Reader(source=str(src)))
    with runs.recording() as events:
        assert _finish(root, Reader(source=str(src))).done
    assert [e.status for e in events] == ["reused"]
    src.write_text("b")
    with runs.recording() as events, runs.reuse_stale():
        assert _finish(root, Reader(source=str(src))).done  # reused on request, and it says so
    assert events[0].status == "reused-stale" and "inputs changed: source" in events[0].reason
    with runs.recording() as events:
        r = _finish(root, Reader(source=str(src)), value=2)
    assert events[0].status == "rerun" and r.metrics == {"x": 2} and not runs.aside_folders(root)


def test_an_input_inside_an_unfinished_run_is_refused(tmp_path):
    with stage(tmp_path / "up", Cfg()):
        (tmp_path / "up" / "half.json").write_text("{}")
    with pytest.raises(RunFolderError, match="unfinished run"):
        runs.identity(Reader(source=str(tmp_path / "up" / "half.json")))


def test_changed_code_makes_a_finished_run_stale(tmp_path, monkeypatch):
    root = tmp_path / "r"
    _finish(root, Cfg())
    monkeypatch.setattr(runs, "code_version", lambda module: "another-version")
    with runs.recording() as events:
        _finish(root, Cfg(), value=3)
    assert events[0].status == "rerun" and events[0].reason == "code changed"
    assert json.loads((root / "metrics.json").read_text()) == {"x": 3}


def test_code_version_ignores_comments_and_docstrings_but_not_code():
    def norm(src: str) -> str:
        import ast

        return ast.dump(runs._strip_docstrings(ast.parse(src)), annotate_fields=False)

    a = 'def f(x):\n    """Doc."""\n    return x + 1  # why\n'
    assert norm(a) == norm("def f(x):\n    return x + 1\n")
    assert norm(a) != norm("def f(x):\n    return x + 2\n")
    assert runs.code_version("mechsub.data") != runs.code_version("mechsub.mnist")
    assert runs.code_version("mechsub.data") == runs.code_version("mechsub.data")


def test_one_process_per_run_folder(tmp_path):
    root = tmp_path / "r"
    with (
        stage(root, Cfg()),
        pytest.raises(RunFolderError, match="in use by another mechsub process"),
        stage(root, Cfg()),
    ):
        pass
    assert not runs.lock_path(root).exists()


def test_a_lock_of_a_dead_process_is_taken_over(tmp_path):
    root = tmp_path / "r"
    runs.lock_path(root).write_text(json.dumps({"pid": 2**22 + 4321, "host": "gone"}))  # nobody holds it
    assert runs.lock_owner(root) is None
    assert _finish(root, Cfg()).metrics == {"x": 1}


def test_a_lock_held_by_another_process_refuses_and_names_it(tmp_path):
    import subprocess
    import sys
    import time

    root = tmp_path / "r"
    code = (
        "import sys, time; from pathlib import Path; from mechsub import runs\n"
        "with runs.lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(30)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(root)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderError, match=f"pid {holder.pid}"), stage(root, Cfg()):
            pass
        with pytest.raises(RunFolderError, match="in use"):
            runs.clean(root)
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    assert _finish(root, Cfg()).metrics == {"x": 1}  # the kernel dropped the dead holder's lock


def test_missing_config_json_is_not_resumed_under_a_new_label(tmp_path):
    root = tmp_path / "r"
    with stage(root, Cfg(seed=1)) as r:
        r.unit("u", lambda: 1)
    (root / "config.json").unlink()
    with pytest.raises(RunFolderError, match="missing or corrupt"), stage(root, Cfg(seed=2)):
        pass


def test_clean_removes_leftovers_and_restores(tmp_path):
    root = tmp_path / "r"
    _finish(root, Cfg(seed=1))
    (root / ".step4.abc.tmp").mkdir()
    (root / "units").mkdir(exist_ok=True)
    (root / "units" / "u.json").write_text("{garbage")
    did = runs.clean(root)
    assert any(".step4" in d for d in did) and any("corrupt unit" in d for d in did)
    assert not (root / ".step4.abc.tmp").exists()
    os.replace(root, tmp_path / ".r.replaced-1")  # what a killed --force leaves
    assert runs.clean(root, restore=True)[-1].startswith("restored") and runs.is_finished(root)
    mine = tmp_path / "mine"
    mine.mkdir()
    with pytest.raises(RunFolderError, match="not a mechsub run"):
        runs.clean(mine, everything=True)


def test_the_sae_an_ablation_file_names_is_an_input_of_the_student(tmp_path):
    from mechsub.student import StudentConfig

    sae = tmp_path / "sae"
    sae.mkdir()
    (sae / "w.bin").write_bytes(b"1")
    ablate = tmp_path / "ablate.json"
    ablate.write_text(json.dumps({"sae": str(sae), "features": [1]}))
    cfg = StudentConfig(model="tiny", data=str(tmp_path / "no-data"), ablate=str(ablate))
    before = runs.input_ids(cfg)
    (sae / "w.bin").write_bytes(b"2")  # the SAE retrained in place; the ablation file unchanged
    after = runs.input_ids(cfg)
    assert before["ablate"] == after["ablate"] and before["ablate.sae"] != after["ablate.sae"]
