"""Is subliminal transfer a LoRA artifact? The demo's teachers and data, students at LoRA rank 1, 4, 8 (the
demo's), 16, 64 and full fine-tuning (rank 0), everything else equal; LoRA alpha = 2 × rank, so the update's
scale alpha / rank is the demo's at every rank and only the rank changes. arXiv 2606.00831 reports an inverted U over
rank that vanishes with full fine-tuning.

Every arm is a whole study over ``--replicates`` replicates (default 1: the demo's first replicate of every trait,
so teachers, data and the rank-8 students are reused; intervals then run over the traits, one teacher each).

    .venv/bin/python analyses/rank_sweep.py [--study artifacts/demo] [--out artifacts/rank_sweep] [--replicates N]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mechsub import compare, study
from mechsub.files import read_json

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--study", default="artifacts/demo")
ap.add_argument("--out", default="artifacts/rank_sweep")
ap.add_argument("--ranks", default="1,4,8,16,64,0", help="LoRA ranks (0: full fine-tuning)")
ap.add_argument("--replicates", type=int, default=1)
args = ap.parse_args()

cfg = study.StudyConfig.from_dict(read_json(Path(args.study) / "config.json")["config"])
ranks = [int(r) for r in args.ranks.split(",")]
# full fine-tuning at a tenth of the LoRA learning rate (the usual ratio; at the LoRA rate it diverges)
arms = {
    ("full FT" if r == 0 else f"r{r}"): {
        "lora_r": r,
        "lora_alpha": 2 * r if r else 16,  # alpha / rank = 2 at every rank (the demo's 16 / 8)
        "replicates": args.replicates,
        **({"lr": cfg.lr / 10} if r == 0 else {}),
    }
    for r in ranks
}
m = compare.run_arms(cfg, arms, args.out, f"Student LoRA rank ({cfg.objective}, lr {cfg.lr})", "rank")
print((Path(args.out) / "report.md").read_text())
