"""Fault injection for run folders: kill stages at random points, corrupt and delete their files, race them.

Each scenario runs real ``mechsub`` commands (subprocesses, the tiny model) in a scratch folder and returns what
was expected and what happened. ``mechsub reliability`` writes them as a table; the tests assert every verdict.
Verdicts: "recovered, identical" (the resumed or recomputed result equals a clean run), "clear error" (exit 2,
one line that says what to do, no traceback, nothing lost), and the failures "silent", "data lost",
"traceback" and "different".
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mechsub.runs import DONE, aside_folders, lock_path, read_json

GOOD = ("recovered, identical", "clear error")
# metrics that measure time or how a run was resumed, not what it computed
VOLATILE = ("seconds", "wall", "per_s", "resumed", "created", "finished")


@dataclass(frozen=True)
class Outcome:
    scenario: str
    fault: str
    expected: str
    observed: str
    verdict: str

    @property
    def ok(self) -> bool:
        return self.verdict in GOOD


# --- running commands ---------------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    return {**os.environ, "TQDM_DISABLE": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}


def cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """Run ``mechsub ARGS`` in a subprocess (the way a user does)."""
    cmd = [sys.executable, "-m", "mechsub.cli", *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, check=False)


def start(*args: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "mechsub.cli", *args]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _error_verdict(r: subprocess.CompletedProcess[str], must_say: str = "") -> tuple[str, str]:
    """(observed, verdict) for a command that should have refused with a clear error."""
    first = (r.stderr.strip().splitlines() or [""])[-1]
    if r.returncode == 0:
        return "exit 0: it went ahead", "silent"
    if "Traceback" in r.stderr:
        return f"exit {r.returncode} with a traceback: {first[:160]}", "traceback"
    if r.returncode == 2 and first.startswith("error:") and must_say.lower() in first.lower():
        return f"exit 2: {first[:220]}", "clear error"
    return f"exit {r.returncode}: {first[:200]}", "unclear error"


def _strip(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if not any(w in k for w in VOLATILE)}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _relocate(obj: Any, root: Path) -> Any:
    """``obj`` with the run folder's own path written as ``<run>`` (two copies of a run live in two folders)."""
    return json.loads(json.dumps(obj).replace(str(root), "<run>"))


def compare_runs(a: Path, b: Path) -> list[str]:
    """How finished runs ``a`` and ``b`` differ: every output byte for byte, except metrics.json, compared
    without its timing and resume-bookkeeping keys (``VOLATILE``) and with each run's own folder path made
    equal. Empty when they are the same result."""
    diffs = []
    for r in (a, b):
        if not (r / DONE).is_file():
            return [f"{r} is not finished"]
    oa, ob = read_json(a / DONE)["outputs"], read_json(b / DONE)["outputs"]
    for rel in sorted(set(oa) | set(ob)):
        if rel not in oa or rel not in ob:
            diffs.append(f"{rel} only in {'the clean run' if rel in ob else 'the resumed run'}")
        elif rel.endswith("metrics.json"):
            ma, mb = (_strip(_relocate(read_json(r / rel), r)) for r in (a, b))
            if ma != mb:
                keys = (
                    sorted(k for k in set(ma) | set(mb) if ma.get(k) != mb.get(k))
                    if isinstance(ma, dict)
                    else []
                )
                diffs.append(f"{rel} differs (timings aside): {', '.join(keys[:5])}")
        elif oa[rel]["sha256"] != ob[rel]["sha256"]:
            diffs.append(f"{rel} differs")
    return diffs


# --- the stage kinds, at tiny sizes that still take a few seconds -------------------------------------------
def stage_args(kind: str, scratch: Path) -> list[str]:
    """A command line for one stage kind on the tiny model (its inputs are made under ``scratch`` first)."""
    data = scratch / "inputs" / "data"
    if kind in ("student", "divergence") and not (data / DONE).is_file():
        r = cli("data", "--out", str(data), "--set", "model=tiny", "--set", "n_prompts=16", "--set", "batch_size=4",
                "--set", "max_new_tokens=16", "--set", "greedy=true")  # fmt: skip
        if r.returncode:
            raise RuntimeError(f"could not make the input data: {r.stderr[-400:]}")
    args = {
        "mnist": ["mnist", "--set", "n_models=3", "--set", "m_sweep=[1,2,3,5]", "--set", "teacher_epochs=2",
                  "--set", "distill_steps=150", "--set", "distill_batch_size=32", "--set", "hidden=32"],
        "data": ["data", "--set", "model=tiny", "--set", "n_prompts=640", "--set", "batch_size=8",
                 "--set", "max_new_tokens=24"],
        "teacher": ["teacher", "--set", "model=tiny", "--set", "steps=40", "--set", "lr=3e-3"],
        "student": ["student", "--set", "model=tiny", "--set", f"data={data}", "--set", "epochs=6",
                    "--set", "batch_size=2", "--set", "checkpoint_every=4"],
        "eval": ["eval", "--set", "model=tiny", "--set", "n_questions=50", "--set", "n_samples=4"],
        "divergence": ["divergence", "--set", f"data={data}", "--set", 'counterfactuals=["dog","cat","fox"]',
                       "--set", "batch_size=2"],
        "sae": ["sae", "--set", "model=tiny", "--set", "layer=0", "--set", "expansion=2", "--set", "k=8",
                "--set", "training_tokens=8192", "--set", "context_size=16"],
    }  # fmt: skip
    return args[kind]


KINDS = ("mnist", "data", "teacher", "student", "eval", "divergence", "sae")


def kill_and_resume(kind: str, scratch: Path, seed: int = 0) -> Outcome:
    """SIGKILL a ``kind`` run at a random point, rerun it, and compare with an uninterrupted run."""
    rng = random.Random(f"{kind}-{seed}")
    args = stage_args(kind, scratch)
    clean, killed = scratch / f"{kind}-clean", scratch / f"{kind}-killed"
    opened, wall, proc = _timed(start(*args, "--out", str(clean)), clean)
    if proc.returncode:
        return Outcome(
            f"kill-{kind}", "", "", f"the clean run failed: {proc.communicate()[1][-300:]}", "traceback"
        )  # type: ignore[union-attr]
    # kill inside the stage's own work (after its folder is opened), not while Python imports torch
    frac = rng.uniform(0.35, 0.85)
    for _ in range(3):
        p = start(*args, "--out", str(killed))
        while not (killed / "config.json").exists() and p.poll() is None:
            time.sleep(0.02)
        time.sleep(frac * (wall - opened))
        p.send_signal(signal.SIGKILL)
        p.communicate()
        if not (killed / DONE).is_file():
            break
        frac /= 2  # it finished first: kill earlier (a fresh folder each time)
        _rmtree(killed)
    work = wall - opened
    fault = f"SIGKILL of `mechsub {kind}` {frac * work:.1f} s into its {work:.1f} s of stage work, then the same command"
    if (killed / DONE).is_file():
        return Outcome(f"kill-{kind}", fault, "", "the run always finished before the kill", "not tested")
    ckpts = len(list((killed / "checkpoints").glob("step*"))) if (killed / "checkpoints").is_dir() else 0
    what = ("nothing written yet" if not killed.exists()
            else f"{_n_units(killed)} unit(s), {ckpts} checkpoint(s) on disk")  # fmt: skip
    r = cli(*args, "--out", str(killed))
    if r.returncode:
        observed, verdict = _error_verdict(r)
        return Outcome(f"kill-{kind}", fault, "resumes; result identical to an uninterrupted run",
                       f"at the kill: {what}; rerun: {observed}", verdict)  # fmt: skip
    diffs = compare_runs(killed, clean)
    return Outcome(
        f"kill-{kind}", fault, "resumes; result identical to an uninterrupted run",
        f"at the kill: {what}; rerun exit 0; " + ("outputs identical" if not diffs else "; ".join(diffs[:4])),
        "recovered, identical" if not diffs else "different",
    )  # fmt: skip


def _timed(proc: subprocess.Popen[str], folder: Path) -> tuple[float, float, subprocess.Popen[str]]:
    """(seconds until the run folder was opened, seconds until exit, the finished process)."""
    t0 = time.perf_counter()
    opened = None
    while proc.poll() is None:
        if opened is None and (folder / "config.json").exists():
            opened = time.perf_counter() - t0
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    return (opened if opened is not None else 0.0), wall, proc


def _n_units(folder: Path) -> int:
    return len(list((folder / "units").glob("*.json"))) if (folder / "units").is_dir() else 0


def _rmtree(p: Path) -> None:
    import shutil

    shutil.rmtree(p, ignore_errors=True)


# --- scenarios about what a folder holds -------------------------------------------------------------------
DATA = [
    "data",
    "--set",
    "model=tiny",
    "--set",
    "n_prompts=8",
    "--set",
    "batch_size=4",
    "--set",
    "max_new_tokens=12",
]


def force_foreign_folder(scratch: Path) -> Outcome:
    """``--force`` on a user's folder that happens to hold a config.json."""
    folder = scratch / "notes"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"mine": true}')
    (folder / "notes.md").write_text("three weeks of notes")
    r = cli(*DATA, "--out", str(folder), "--force")
    observed, verdict = _error_verdict(r, "not a mechsub run folder")
    if (folder / "notes.md").read_text() != "three weeks of notes":
        verdict, observed = "data lost", "notes.md is gone: " + observed
    return Outcome("force-foreign", "`mechsub data --force --out` a folder of the user's (config.json + notes.md)",
                   "refused, folder untouched", observed, verdict)  # fmt: skip


def bench_foreign_folder(scratch: Path) -> Outcome:
    folder = scratch / "mine"
    folder.mkdir(parents=True)
    (folder / "notes.md").write_text("keep me")
    r = cli("bench", "--out", str(folder), "--set", "model=tiny")
    observed, verdict = _error_verdict(r, "not a mechsub run folder")
    if not (folder / "notes.md").is_file():
        verdict, observed = "data lost", "notes.md is gone: " + observed
    return Outcome("bench-foreign", "`mechsub bench --out` an existing folder of the user's (no --force)",
                   "refused, folder untouched", observed, verdict)  # fmt: skip


def force_other_stage(scratch: Path) -> Outcome:
    folder = scratch / "a-data-run"
    cli(*DATA, "--out", str(folder))
    r = cli("bench", "--out", str(folder), "--set", "model=tiny")
    observed, verdict = _error_verdict(r, "will not replace it")
    if not (folder / DONE).is_file():
        verdict = "data lost"
    return Outcome("bench-over-a-run", "`mechsub bench --out` a finished data run",
                   "refused, the data run untouched", observed, verdict)  # fmt: skip


def stale_data_for_student(scratch: Path) -> Outcome:
    """Regenerate the data a finished student read; the student must not be reused."""
    d, s = scratch / "sd-data", scratch / "sd-student"
    student = [
        "student",
        "--set",
        "model=tiny",
        "--set",
        f"data={d}",
        "--set",
        "batch_size=4",
        "--out",
        str(s),
    ]
    cli(*DATA, "--set", "n_prompts=4", "--out", str(d))
    first = cli(*student)
    cli(*DATA, "--set", "n_prompts=8", "--out", str(d), "--force")
    second = cli(*student)
    n1 = json.loads(first.stdout.split("\nwrote")[0]).get("n_examples") if first.returncode == 0 else None
    n2 = json.loads(second.stdout.split("\nwrote")[0]).get("n_examples") if second.returncode == 0 else None
    said = "inputs changed: data" in second.stderr
    ok = n1 == 4 and n2 == 8 and said
    return Outcome(
        "stale-input-student", "data folder regenerated (4 → 8 prompts) after a student trained on it; "
        "the student command rerun", "the student is trained again on the new data, and says why",
        f"n_examples {n1} → {n2}; reported 'inputs changed: data': {said}",
        "recovered, identical" if ok else "silent",
    )  # fmt: skip


def stale_student_for_eval(scratch: Path) -> Outcome:
    d, s, e = scratch / "se-data", scratch / "se-student", scratch / "se-eval"
    cli(*DATA, "--out", str(d))
    base = ["student", "--set", "model=tiny", "--set", f"data={d}", "--set", "batch_size=4", "--out", str(s)]
    cli(*base)
    ev = ["eval", "--set", f"model={s}/checkpoints/step4", "--set", "n_questions=3", "--out", str(e)]
    first = cli(*ev)
    cli(*base, "--set", "lr=0.05", "--force")  # retrained: another student in the same checkpoint path
    second = cli(*ev)
    said = "inputs changed: model" in second.stderr
    changed = first.stdout != second.stdout
    return Outcome(
        "stale-input-eval", "a student retrained in place (other lr) after its evaluation; eval rerun",
        "the evaluation is recomputed for the new weights, and says why",
        f"reported 'inputs changed: model': {said}; metrics changed: {changed}",
        "recovered, identical" if said and changed else "silent",
    )  # fmt: skip


def concurrent_force(scratch: Path) -> Outcome:
    """A run and a concurrent ``--force`` run with another config in the same folder."""
    folder, n = (
        scratch / "race",
        4000,
    )  # long enough (~20 s on 2 cores) to still run when the second one starts
    args = [
        "data",
        "--set",
        "model=tiny",
        "--set",
        f"n_prompts={n}",
        "--set",
        "batch_size=8",
        "--out",
        str(folder),
    ]
    a = start(*args, "--set", "teacher=owl")
    deadline = time.time() + 60
    while not lock_path(folder).exists() and time.time() < deadline and a.poll() is None:
        time.sleep(0.05)
    b = cli(*args, "--set", "teacher=dog", "--force")
    overlapped = a.poll() is None
    a.communicate()
    observed, verdict = _error_verdict(b, "in use")
    cfg = read_json(folder / "config.json")["config"] if (folder / "config.json").is_file() else {}
    rows = read_json(folder / "completions.json") if (folder / "completions.json").is_file() else []
    if a.returncode != 0 or cfg.get("teacher") != "owl" or len(rows) != n:
        verdict = "data lost"
    elif not overlapped:
        verdict = "not tested"
    return Outcome(
        "concurrent-force", "`mechsub data` (owl) running; `mechsub data --force` (dog) on the same folder",
        "the second is refused; the folder holds the first run only",
        f"{observed}; first run still running then: {overlapped}, exit {a.returncode}; folder: teacher "
        f"{cfg.get('teacher')}, {len(rows)} rows",
        verdict,
    )  # fmt: skip


def stale_lock(scratch: Path) -> Outcome:
    folder = scratch / "stale-lock"
    lock_path(folder).parent.mkdir(parents=True, exist_ok=True)
    lock_path(folder).write_text(json.dumps({"pid": 2**22 + 12345, "host": os.uname().nodename}))
    r = cli(*DATA, "--out", str(folder))
    ok = r.returncode == 0 and (folder / DONE).is_file() and not lock_path(folder).exists()
    return Outcome("stale-lock", "a lock left by a process that no longer exists", "taken over; the run completes",
                   f"exit {r.returncode}; finished: {(folder / DONE).is_file()}",
                   "recovered, identical" if ok else "silent")  # fmt: skip


def _data_pair(scratch: Path, name: str) -> tuple[Path, Path]:
    clean, hurt = scratch / f"{name}-clean", scratch / f"{name}-hurt"
    cli(*DATA, "--out", str(clean))
    cli(*DATA, "--out", str(hurt))
    return clean, hurt


def deleted_output(scratch: Path) -> Outcome:
    clean, hurt = _data_pair(scratch, "deleted-output")
    (hurt / "completions.json").unlink()
    r = cli(*DATA, "--out", str(hurt))
    diffs = compare_runs(hurt, clean) if r.returncode == 0 else ["rerun failed"]
    return Outcome("deleted-output", "completions.json deleted from a finished data run; the command rerun",
                   "the folder counts as unfinished; the file is recomputed, identical",
                   "outputs identical" if not diffs else "; ".join(diffs),
                   "recovered, identical" if not diffs else "silent")  # fmt: skip


def corrupt_unit(scratch: Path) -> Outcome:
    clean, hurt = _data_pair(scratch, "corrupt-unit")
    (hurt / "units" / "b0000.json").write_bytes(os.urandom(64))
    r = cli(*DATA, "--out", str(hurt))
    diffs = compare_runs(hurt, clean) if r.returncode == 0 else [f"rerun: {r.stderr[-200:]}"]
    return Outcome("corrupt-unit", "a finished unit file overwritten with random bytes; the command rerun",
                   "the unit is recomputed; result identical", "outputs identical" if not diffs else "; ".join(diffs),
                   "recovered, identical" if not diffs else "silent")  # fmt: skip


def bad_config_json(scratch: Path, how: str) -> Outcome:
    folder = scratch / f"config-{how}"
    cli(*DATA, "--out", str(folder))
    units_before = _n_units(folder)
    if how == "deleted":
        (folder / "config.json").unlink()
    elif how == "corrupt":
        (folder / "config.json").write_text("{not json")
    else:
        (folder / "config.json").write_text("[1, 2, 3]")
    r = cli(*DATA, "--set", "teacher=dog", "--out", str(folder))  # another config: must not adopt the units
    observed, verdict = _error_verdict(r, "config.json is missing or corrupt")
    if _n_units(folder) != units_before:
        verdict = "data lost"
    return Outcome(f"config-{how}", f"config.json {how} in a finished run; rerun with another config",
                   "refused with a safe way out; the old units are not adopted under the new label",
                   observed, verdict)  # fmt: skip


def interrupted_force(scratch: Path) -> Outcome:
    """A ``--force`` replacement killed half-way: the previous result must survive."""
    folder = scratch / "replaced"
    cli(*DATA, "--out", str(folder))
    before = read_json(folder / DONE)["outputs"]
    proc = start("data", "--set", "model=tiny", "--set", "n_prompts=2000", "--set", "batch_size=8", "--out",
                 str(folder), "--force")  # fmt: skip
    deadline = time.time() + 120
    while (
        proc.poll() is None
        and time.time() < deadline
        and not (aside_folders(folder) and _n_units(folder) >= 2)
    ):
        time.sleep(0.02)  # kill once the old run is aside and the new one has done some work
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    killed_mid_run = bool(aside_folders(folder)) and not (folder / DONE).is_file()
    r = cli("clean", str(folder), "--restore")
    restored = (folder / DONE).is_file() and read_json(folder / DONE)["outputs"] == before
    return Outcome(
        "interrupted-force", "`--force` with another config SIGKILLed after it moved the old run aside and began; then "
        "`mechsub clean --restore`", "the previous run is kept aside until the new one completes, and can be put back",
        f"killed mid-run: {killed_mid_run}; clean: {r.stdout.strip()[-120:]!r}; previous run back intact: {restored}",
        "recovered, identical" if restored and killed_mid_run else "data lost" if not restored else "not tested",
    )  # fmt: skip


def unfinished_analyze(scratch: Path) -> Outcome:
    d, s = scratch / "ua-data", scratch / "ua-student"
    cli(*DATA, "--out", str(d))
    args = ["student", "--set", "model=tiny", "--set", f"data={d}", "--set", "batch_size=1", "--set", "epochs=20",
            "--set", "checkpoint_every=2", "--out", str(s)]  # fmt: skip
    proc = start(*args)
    deadline = time.time() + 120
    while not list((s / "checkpoints").glob("step*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    r = cli("analyze", str(s), "--set", f"data={d}", "--out", str(scratch / "ua-analysis"))
    observed, verdict = _error_verdict(r, "unfinished student run")
    return Outcome("analyze-unfinished", "`mechsub analyze` on a student run killed after its first checkpoint",
                   "refused unless a step is named", observed, verdict)  # fmt: skip


def bad_config(scratch: Path, args: list[str], fault: str, must_say: str) -> Outcome:
    """A config that validation must refuse before anything is written or a model loaded."""
    out = scratch / "out"
    r = cli(*args, "--out", str(out))
    observed, verdict = _error_verdict(r, must_say)
    if out.exists() and any(out.iterdir()):
        verdict, observed = "silent", observed + f"; but {out} was written"
    return Outcome(f"config: {fault}", f"`mechsub {' '.join(args)}`", "refused before writing anything", observed,
                   verdict)  # fmt: skip


def _damaged_data(scratch: Path, damage: Callable[[Path], object], fault: str, must_say: str) -> Outcome:
    d = scratch / "data"
    cli(*DATA, "--out", str(d))
    damage(d)
    r = cli("student", "--set", "model=tiny", "--set", f"data={d}", "--out", str(scratch / "student"))
    observed, verdict = _error_verdict(r, must_say)
    return Outcome(f"input: {fault}", f"{fault}; `mechsub student` on it", "a clear error naming the file",
                   observed, verdict)  # fmt: skip


def _drop_kept(d: Path) -> None:
    rows = json.loads((d / "completions.json").read_text())
    del rows[1]["kept"]
    (d / "completions.json").write_text(json.dumps(rows))


def bad_adapter(scratch: Path) -> Outcome:
    d, s = scratch / "data", scratch / "student"
    cli(*DATA, "--out", str(d))
    cli("student", "--set", "model=tiny", "--set", f"data={d}", "--set", "batch_size=4", "--out", str(s))
    ck = s / "checkpoints" / "step4"
    (ck / "adapter_model.safetensors").write_bytes(os.urandom(4096))
    r = cli("eval", "--set", f"model={ck}", "--set", "n_questions=2", "--out", str(scratch / "eval"))
    observed, verdict = _error_verdict(r, "adapter")
    return Outcome("input: LoRA adapter of random bytes", "a checkpoint's adapter overwritten with random bytes; "
                   "`mechsub eval` on it", "a clear error naming the checkpoint", observed, verdict)  # fmt: skip


SCENARIOS: dict[str, Callable[[Path], Outcome]] = {
    **{f"kill-{k}": (lambda s, k=k: kill_and_resume(k, s)) for k in KINDS},  # type: ignore[misc]
    "force-foreign": force_foreign_folder,
    "bench-foreign": bench_foreign_folder,
    "bench-over-a-run": force_other_stage,
    "stale-input-student": stale_data_for_student,
    "stale-input-eval": stale_student_for_eval,
    "concurrent-force": concurrent_force,
    "stale-lock": stale_lock,
    "deleted-output": deleted_output,
    "corrupt-unit": corrupt_unit,
    "config-deleted": lambda s: bad_config_json(s, "deleted"),
    "config-corrupt": lambda s: bad_config_json(s, "corrupt"),
    "config-not-a-dict": lambda s: bad_config_json(s, "list"),
    "interrupted-force": interrupted_force,
    "analyze-unfinished": unfinished_analyze,
    "config-mnist-batch-0": lambda s: bad_config(s, ["mnist", "--set", "distill_batch_size=0"],
                                                 "distill_batch_size=0", "distill_batch_size"),
    "config-sae-layer": lambda s: bad_config(s, ["sae", "--set", "model=tiny", "--set", "layer=7"],
                                             "an SAE layer beyond the model", "layer"),
    "config-sae-k": lambda s: bad_config(s, ["sae", "--set", "model=tiny", "--set", "layer=0", "--set", "k=100000"],
                                         "SAE k larger than the dictionary", "k"),
    "config-unknown-trait": lambda s: bad_config(s, ["data", "--set", "teacher=dragon"], "an unknown trait",
                                                 "unknown trait"),
    "config-unknown-key": lambda s: bad_config(s, ["student", "--set", "lr_rate=1"], "a misspelt field",
                                               "unknown key"),
    "input-row-without-kept": lambda s: _damaged_data(s, _drop_kept, "a data row without 'kept'", "kept"),
    "input-garbage-shard": lambda s: _damaged_data(
        s, lambda d: (d / "shards" / "b0000.safetensors").write_bytes(os.urandom(2048)),
        "a data shard of random bytes", "b0000.safetensors"),
    "input-random-adapter": bad_adapter,
}  # fmt: skip


def run_all(scratch: Path, only: list[str] | None = None) -> list[Outcome]:
    """Run the scenarios (all, or those named) in ``scratch``, one folder each."""
    out = []
    for name, fn in SCENARIOS.items():
        if only and name not in only:
            continue
        folder = scratch / name
        folder.mkdir(parents=True, exist_ok=True)
        try:
            out.append(fn(folder))
        except Exception as e:  # a harness failure is reported as a row, not hidden
            out.append(Outcome(name, "", "", f"harness error: {type(e).__name__}: {e}", "traceback"))
    return out


def write_report(outcomes: list[Outcome], out: Path, seconds: float) -> None:
    """``out/report.md`` (the table) and ``out/metrics.json``."""
    from mechsub.runs import atomic_write_text, write_json

    rows = [
        "| scenario | fault or bad input | expected | observed | verdict |",
        "|---|---|---|---|---|",
        *(f"| {o.scenario} | {o.fault} | {o.expected} | {o.observed.replace('|', '/')} | **{o.verdict}** |"
          for o in outcomes),
    ]  # fmt: skip
    n_ok = sum(o.ok for o in outcomes)
    text = (
        "# Run-folder reliability\n\n"
        f"Written by `mechsub reliability --out {out}` ({seconds / 60:.1f} min on this machine; the tiny model, "
        "every command a subprocess as a user runs it). Kills are SIGKILL at a seeded random point between 35% "
        "and 85% of the uninterrupted run's own stage work (timed from the moment its run folder is opened, so the "
        "kill lands in the work, not in Python's imports); stages that train keep checkpoints, not units. "
        '"Identical" means every output file byte for byte, except '
        "metrics.json, which is compared without its timing and resume-bookkeeping keys "
        f"({', '.join(VOLATILE)}).\n\n"
        f"**{n_ok} of {len(outcomes)} scenarios end in a clear error or an identical recovery.**\n\n"
        + "\n".join(rows)
        + "\n"
    )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.md", text)
    write_json(out / "metrics.json", {"n_scenarios": len(outcomes), "n_ok": n_ok, "seconds": round(seconds, 1),
                                      "outcomes": [asdict(o) for o in outcomes]})  # fmt: skip
