"""The localisation battery on the replicated students (issue 13, item 6): per layer, what share of each trait
student's specific effect do its top-k SAE latents (k = 1, 5, 20, 100) carry, against frequency-matched random
latents? `mechsub.battery` has the design; this script finds the study's students and the SAEs.

A unit is (pair, layer): the trait's student patched into the same replicate's student of the next trait, one
JSON in ``OUT/units/`` (reused when present with the same settings); then ``OUT/metrics.json``, ``OUT/report.md``
and ``OUT/shares.png``.

    .venv/bin/python analyses/battery.py [--study artifacts/study_full] [--root .]
        [--sae-root runs/saes --layers 3,9,15,21,27 | --saes runs/saes/l3,runs/saes/l9]
        [--replicates 0,1,2] [--traits owl,dog] [--n-random 20] [--questions 10] [--out artifacts/analyze/battery]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from mechsub import battery, models, study
from mechsub.files import atomic_write_text, read_json, write_json
from mechsub.runs import is_finished
from mechsub.training import steps_of
from mechsub.traits import get_trait

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--study", default="artifacts/study_full", help="a study folder (its config.json)")
ap.add_argument("--root", default=".", help="the folder the study's `work` path is relative to")
ap.add_argument(
    "--saes", default="", help="SAE folders, comma-separated (`mechsub sae` runs or sae-lens folders)"
)
ap.add_argument("--sae-root", default="runs/saes", help="with --layers: the SAE of layer L is SAE_ROOT/l{L}")
ap.add_argument("--layers", default="3,9,15,21,27", help="layers under --sae-root (ignored with --saes)")
ap.add_argument("--replicates", default="", help="e.g. 0,1,2 (default: every replicate of the study)")
ap.add_argument(
    "--traits", default="", help="donor traits, e.g. owl,dog (default: all; receivers by rotation)"
)
ap.add_argument("--ks", default="1,5,20,100")
ap.add_argument("--n-random", type=int, default=20, help="matched random latent sets per (pair, k)")
ap.add_argument("--questions", type=int, default=10, help="evaluation questions (and as many ranking ones)")
ap.add_argument(
    "--min-gap", type=float, default=0.05, help="pairs with a smaller specific gap (nats) don't count"
)
ap.add_argument(
    "--word",
    default="",
    help="score every pair on log P(WORD) instead of the donor's trait: the selection-matched null (e.g. "
    "--traits dog --word owl: the dog student patched into the cat student, ranked and scored on owl)",
)
ap.add_argument(
    "--null",
    default="",
    help="a battery folder run with --word (the selection-matched null): adds the shares beyond it per replicate",
)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--batch", type=int, default=64, help="rows per forward (speed and memory only)")
ap.add_argument("--out", default="artifacts/analyze/battery")
args = ap.parse_args()
t0 = time.perf_counter()
ints = lambda s: [int(x) for x in s.split(",") if x.strip()]  # noqa: E731

cfg = study.StudyConfig.from_dict(read_json(Path(args.study) / "config.json")["config"])
plan = study.stage_plan(cfg)
root = Path(args.root)
bcfg = battery.BatteryConfig(ks=tuple(ints(args.ks)), n_random=args.n_random, n_questions=args.questions,
                             n_rank_questions=args.questions, seed=args.seed, min_gap=args.min_gap,
                             batch=args.batch)  # fmt: skip
replicates = ints(args.replicates) if args.replicates else list(range(cfg.replicates))
bad = [r for r in replicates if not 0 <= r < cfg.replicates]
if bad:
    raise SystemExit(f"replicates {bad}: {args.study} has replicates 0–{cfg.replicates - 1}")
if (
    args.word and get_trait(args.word).category != get_trait(cfg.trait).category
):  # get_trait: unknown words fail
    raise SystemExit(f"--word {args.word}: not a {get_trait(cfg.trait).category} like the study's traits")
todo = battery.pairs(cfg.traits, replicates, args.word)
if args.traits:
    wanted = [t.strip() for t in args.traits.split(",")]
    if set(wanted) - set(cfg.traits):
        raise SystemExit(
            f"traits {sorted(set(wanted) - set(cfg.traits))} are not in the study ({cfg.traits})"
        )
    todo = [p for p in todo if p.trait in wanted]

students: dict[tuple[str, int], str] = {}
for p in todo:
    for u in ((p.trait, p.replicate), (p.control, p.replicate)):
        folder = root / plan.students[u][1]
        if not is_finished(folder):
            raise SystemExit(f"the student of {u} ({folder}) is not a finished run")
        students[u] = str(steps_of(folder)[-1])

shape = models.shape_of(cfg.model)
assert shape is not None, cfg.model
if args.saes:
    folders, layers = [s.strip() for s in args.saes.split(",") if s.strip()], None
else:
    layers = ints(args.layers)
    folders = [str(Path(args.sae_root) / f"l{L}") for L in layers]
try:
    saes = battery.load_saes(folders, cfg.model, shape.n_layers, shape.d_model, layers)
except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"SAEs: {e}") from None

null_units = sorted((Path(args.null) / "units").glob("*.json")) if args.null else []
if args.null and not null_units:  # checked before the run, not after it
    raise SystemExit(
        f"--null {args.null}: no unit files under {args.null}/units (run the battery with --word there)"
    )

n_units = len(todo) * len(saes)
print(f"{len(todo)} pairs × layers {list(saes)} = {n_units} units; {bcfg.n_questions}+{bcfg.n_rank_questions} "
      f"questions, k {list(bcfg.ks)}, {bcfg.n_random} matched draws", flush=True)  # fmt: skip
out = Path(args.out)
metrics = battery.run(bcfg, todo, students, lambda ck: models.load(ck, verify=False), saes,
                      get_trait(cfg.trait).category, out, progress=lambda s: print(s, flush=True))  # fmt: skip
if args.null:
    metrics["null_folder"] = args.null
    metrics["null_adjusted"] = battery.null_adjusted(
        [read_json(p) for p in sorted((out / "units").glob("*.json"))],
        [read_json(p) for p in null_units],
        bcfg,
    )
    write_json(out / "metrics.json", metrics)
command = shlex.join([".venv/bin/python", "analyses/battery.py", *sys.argv[1:]])
header = (f"Study `{args.study}` ({cfg.model}, traits {', '.join(cfg.traits)}, replicates {replicates}); SAEs: "
          + ", ".join(f"layer {L} `{s.folder}`" for L, s in saes.items()) + ".\n")  # fmt: skip
atomic_write_text(out / "report.md", battery.report_md(metrics, command, time.perf_counter() - t0, header))
battery.plot(metrics, out / "shares.png")
g = metrics["goal"]
print(
    f"goal (≥ {g['share']:.0%} by ≤ {g['k']} latents): {'met' if g['met_by_corrected_ci'] else 'not established' if g['met'] else 'not met'}; best {g['best']}"
)
print(f"wrote {out}/metrics.json, report.md, shares.png ({(time.perf_counter() - t0) / 60:.1f} min)")
