"""Do the polysemantic carriers carry the trait? Patch and ablate each carrier feature of the localise run alone.

Carriers (REFERENCE §4) are SAE features that fire on the trait word and that the teacher raises on numbers;
`analyses/localise.py --sae` lists them in artifacts/analyze/starved_sae_l15s/features.json. Here each one, and all of them, is
patched from the demo's student into the base (and ablated from the student) on 10 evaluation questions, with 10
other questions ranking features by attribution and random features as the control (`patching.feature_patch_scan`).
Writes artifacts/analyze/starved_sae_l15s/carriers.{json,md}.

    .venv/bin/python analyses/carriers.py [--features artifacts/analyze/starved_sae_l15s]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mechsub import models, patching, sae, study
from mechsub.runs import atomic_write_text, read_json, write_json
from mechsub.traits import eval_questions, get_trait

ap = argparse.ArgumentParser()
ap.add_argument("--features", default="artifacts/analyze/starved_sae_l15s")
ap.add_argument("--study", default="artifacts/demo")
ap.add_argument("--seed", type=int, default=0)
args = ap.parse_args()
acfg = read_json(Path(args.features) / "config.json")["config"]
feats = read_json(Path(args.features) / "features.json")
cfg = study.StudyConfig.from_dict(read_json(Path(args.study) / "config.json")["config"])
trait = get_trait(cfg.trait)
base = models.load(cfg.model)
student = models.load(str(study.stage_plan(cfg).checkpoint(cfg.trait, args.seed)))
the_sae = sae.load_sae(Path(acfg["sae"]) / "sae")
layer = sae.sae_layer(the_sae)
qs = eval_questions(trait.category, 20)
carriers = [f["id"] for f in feats["carriers"]]
lists = {f"feature {i}": [i] for i in carriers} | {"all carriers": carriers}
r = patching.feature_patch_scan(base, student, the_sae, layer, qs[:10], qs[10:], trait.name, trait.category, lists,
                                ks=(1, len(carriers)), seed=args.seed)  # fmt: skip
write_json(Path(args.features) / "carriers.json", {"carriers": feats["carriers"], "patching": r})


def cell(d: dict, key: str, j: int) -> str:
    lo, hi = d[f"{key}_ci95"][j]
    return f"{d[key][j]:+.3f} [{lo:+.3f}, {hi:+.3f}]"


rows = [(f"feature {i}", 0) for i in carriers] + [("all carriers", 1), ("attribution", 1), ("random", 1)]
lines = [
    f"# Carrier features at {feats['hook']}: patched and ablated one by one ({trait.name}, seed {args.seed})",
    "",
    f"Student − base gap on 10 questions: {r['gap']:+.3f}. Fractions of it, with 95% bootstrap intervals over the "
    f"questions; 'attribution' and 'random' are sets of {len(carriers)} features (random: mean of {r['n_random']} draws among "
    f"the {r['n_active']} active). Re-create: `.venv/bin/python analyses/carriers.py`.",
    "",
    "| features | on 'owl' | teacher − base on numbers | student − controls on numbers | patch into base | ablate from student |",
    "|---|---|---|---|---|---|",
]  # fmt: skip
info = {f["id"]: f for f in feats["carriers"]}
for name, j in rows:
    f = info.get(int(name.split()[-1])) if name.startswith("feature") else None
    extra = (f"{f['trait_word_activation']:.2f} | {f['teacher_minus_base']:+.3f} | {f['student_minus_controls']:+.3f}"
             if f else " | | ")  # fmt: skip
    lines.append(
        f"| {name} | {extra} | {cell(r[name], 'patch_fraction', j)} | {cell(r[name], 'ablate_fraction', j)} |"
    )
lines += ["", f"All {r['n_active']} active features at once: patch {cell(r['all'], 'patch_fraction', 0)}."]
atomic_write_text(Path(args.features) / "carriers.md", "\n".join(lines) + "\n")
print("\n".join(lines))
