"""Issue 16's cost model: what each stage costs on this machine, read from the run folders' own records.

Every finished stage run records its time: ``seconds_this_session`` in metrics.json (teacher, data, student,
invert-teacher, corpus; runs resumed from a checkpoint are left out, their time is partial), or the span from
config.json's ``created`` to done.json's ``finished`` (eval, which records no time of its own, model loading
included). Per unit of work (per teacher step, per 1,000 number completions, per student step, per evaluation)
the table gives the median and the range over runs and how many runs. The runs were timed under whatever else
ran beside them (two jobs on 2 cores slow each other 2-4×): the minimum is the closest to an idle machine.

    .venv/bin/python analyses/cost_model.py [--runs runs] [--out artifacts/cost]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from mechsub.files import atomic_write_text, write_json

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--runs", default="runs")
ap.add_argument("--out", default="artifacts/cost")
ap.add_argument(
    "--studies", default="artifacts/demo,artifacts/study_full", help="study folders whose wall time to quote"
)
args = ap.parse_args()


def _read(p: Path) -> Any:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _time(s: str) -> dt.datetime:
    return dt.datetime.fromisoformat(s.replace("Z", "+00:00"))


samples: dict[str, list[float]] = defaultdict(list)
for cfg_path in sorted(Path(args.runs).rglob("config.json")):
    folder = cfg_path.parent
    cfg, done, m = _read(cfg_path), _read(folder / "done.json"), _read(folder / "metrics.json")
    if not isinstance(cfg, dict) or not isinstance(done, dict) or not isinstance(m, dict):
        continue
    stage, c = cfg.get("stage"), cfg.get("config", {})
    sec = m.get("seconds_this_session")
    if stage in ("teacher", "student", "invert-teacher"):
        if m.get("resumed_from_step") or not sec or not m.get("steps"):
            continue
        kind = stage
        if stage == "student":
            kind += f" ({c.get('objective', '?')}, {'full FT' if c.get('lora_r') == 0 else 'LoRA r' + str(c.get('lora_r'))})"
        samples[f"{kind}: seconds per step (batch {c.get('batch_size', '?')})"].append(sec / m["steps"])
        samples[f"{kind}: minutes per run ({m['steps']} steps)"].append(sec / 60)
    elif stage == "data" and sec and m.get("n_prompts"):
        samples["data: minutes per 1,000 number completions"].append(sec / m["n_prompts"] * 1000 / 60)
    elif stage == "eval" and "created" in cfg and "finished" in done:
        wall = (_time(done["finished"]) - _time(cfg["created"])).total_seconds()
        samples[
            f"eval: seconds per evaluation ({c.get('n_questions', '?')} questions, {c.get('n_samples', 0)} samples)"
        ].append(wall)
    elif stage == "corpus" and sec:
        samples["corpus: minutes per build"].append(sec / 60)

rows = {
    k: {"median": float(np.median(v)), "min": float(np.min(v)), "max": float(np.max(v)), "n_runs": len(v)}
    for k, v in sorted(samples.items())
}
studies = {}
for s in args.studies.split(","):
    m = _read(Path(s) / "metrics.json")
    if isinstance(m, dict) and m.get("wall_seconds"):
        studies[s] = {"wall_minutes": m["wall_seconds"] / 60, "replicates": m.get("replicates"),
                      "n_teachers": m.get("n_teachers")}  # fmt: skip
metrics = {"stages": rows, "studies": studies, "runs_folder": args.runs}
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
write_json(out / "metrics.json", metrics)
lines = ["# What each stage costs on this machine (2 CPU cores)", "",
         "Read from the run folders' own time records; median [min, max] over runs. Runs were timed beside other "
         "work: the minimum is the closest to an idle machine.", "",
         "| unit | median | min | max | runs |", "|---|--:|--:|--:|--:|"]  # fmt: skip
lines += [
    f"| {k} | {r['median']:.2f} | {r['min']:.2f} | {r['max']:.2f} | {r['n_runs']} |" for k, r in rows.items()
]
if studies:
    lines += ["", "| study | replicates | teachers | wall minutes (stages already done are reused, not re-timed) |",
              "|---|--:|--:|--:|"]  # fmt: skip
    lines += [
        f"| {s} | {v['replicates']} | {v['n_teachers']} | {v['wall_minutes']:.1f} |"
        for s, v in studies.items()
    ]
atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
print("\n".join(lines))
