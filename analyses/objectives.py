"""Issue 12's leak check: the demo's teachers and data, students trained with three objectives.

- ``distill``: KL over the 13 number tokens only (nothing else of the teacher's distribution);
- ``distill_full``: KL over the whole vocabulary (the trait word's own logit can be copied: the leak);
- ``distill_full_notrait`` (the demo's): the whole vocabulary but the first token of every trait word, both
  distributions renormalised;
- ``sft``: cross-entropy on the teacher's greedy tokens of 1,024 prompts per teacher (a fair-sized SFT set;
  ``--sft-replicates`` teachers per trait, each its own 1,024 prompts).

Every arm is a whole study (same statistics, exact permutation test over teachers); stage runs are shared with
the demo's, so teachers and data are reused.

    .venv/bin/python analyses/objectives.py [--study artifacts/demo] [--out artifacts/objectives]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mechsub import compare, runs, study
from mechsub.files import read_json

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--study", default="artifacts/demo")
ap.add_argument("--out", default="artifacts/objectives")
ap.add_argument("--sft-prompts", type=int, default=1024)
ap.add_argument("--sft-replicates", type=int, default=1, help="replicates of the SFT arm (0: skip it)")
ap.add_argument("--only", default="", help="comma-separated arms to run (default: all)")
ap.add_argument(
    "--reuse-stale", action="store_true", help="reuse finished stage runs whose code changed (reported)"
)
args = ap.parse_args()

cfg = study.StudyConfig.from_dict(read_json(Path(args.study) / "config.json")["config"])
arms = {
    "distill (13 number tokens)": {"objective": "distill"},
    "distill_full (whole vocabulary)": {"objective": "distill_full"},
    "distill_full_notrait (demo)": {"objective": "distill_full_notrait"},
}
if args.sft_replicates:
    arms[f"sft ({args.sft_prompts} prompts)"] = {
        "objective": "sft", "n_prompts": args.sft_prompts, "replicates": args.sft_replicates,
    }  # fmt: skip
if args.only:
    keep = args.only.split(",")
    arms = {k: v for k, v in arms.items() if k.split(" ")[0] in keep}
with runs.reuse_stale(args.reuse_stale):
    m = compare.run_arms(cfg, arms, args.out, f"Student objective on the same teachers ({cfg.trait} and controls)",
                         "objective")  # fmt: skip
print((Path(args.out) / "report.md").read_text())
