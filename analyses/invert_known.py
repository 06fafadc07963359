"""Which task families does the base model know? `invert.base_knowledge` (the invert run's own check: greedy
accuracy and the forced choice between the correct answer and T(correct), plain and framed after the family's
lead) on every held-out problem of each family. Writes artifacts/invert_known/base_knowledge.json (the README's
"Which families does the base model know?" table).

    .venv/bin/python analyses/invert_known.py [--families next choice antonym] [--out artifacts/invert_known]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from mechsub import models, tasks
from mechsub.files import write_json
from mechsub.invert import TEST_SEED, base_knowledge

ap = argparse.ArgumentParser()
ap.add_argument("--families", nargs="+", default=list(tasks.KNOWN_FAMILIES))
ap.add_argument("--model", default="smollm2-135m-instruct")
ap.add_argument("--out", default="artifacts/invert_known")
args = ap.parse_args()
base = models.load(args.model)
res = {}
for f in args.families:
    t0 = time.perf_counter()
    probs = tasks.problems(f, tasks.split_size(f, "test"), TEST_SEED, "test")
    res[f] = {**base_knowledge(base, probs, 20), "seconds": round(time.perf_counter() - t0, 1)}
    print(f, {k: v for k, v in res[f].items() if k != "examples"}, flush=True)
write_json(Path(args.out) / "base_knowledge.json", {"model": args.model, "split": "test", "families": res})
