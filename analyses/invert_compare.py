"""Two runs of `mechsub invert` with one change between them (e.g. `--set reasoned=true`), read side by side: per
kind, family and outcome (correct, inverted, hashed, other), each run's held-out share and the difference B − A
paired by teacher seed (the unit; `invert.paired_contrast`: t-interval, paired t p, exact sign-flip p and its
floor). The runs must share their seeds and held-out problems. Writes OUT/compare.md and OUT/compare.json.

    .venv/bin/python analyses/invert_compare.py --a artifacts/invert_train72 --b artifacts/invert_reasoned
        [--kinds inv,true] [--out artifacts/invert_reasoned_compare]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mechsub.files import atomic_write_text, read_json, write_json
from mechsub.invert import OUTCOMES, fmt_estimate, paired_contrast


def compare(a: dict[str, Any], b: dict[str, Any], kinds: list[str]) -> dict[str, Any]:
    """Per kind, row (each family, then the known families pooled) and outcome: A's and B's shares over seeds and
    B − A paired by seed."""
    for key in ("seeds", "n_test_per_family", "families"):
        if a["design"][key] != b["design"][key]:
            raise ValueError(
                f"the runs differ in {key} ({a['design'][key]} vs {b['design'][key]}): not paired"
            )
    out: dict[str, Any] = {}
    for k in kinds:
        if k not in a["verification"] or k not in b["verification"]:
            raise ValueError(
                f"kind {k!r} is not in both runs (A: {list(a['verification'])}, B: {list(b['verification'])})"
            )
        va, vb = a["verification"][k], b["verification"][k]
        rows = {f: (va["families"][f], vb["families"][f]) for f in a["design"]["families"]}
        if va["known_families"] and vb["known_families"]:
            rows["known families"] = (va["known_families"], vb["known_families"])
        out[k] = {
            row: {
                o: {
                    "a": ra[o],
                    "b": rb[o],
                    "b_minus_a": paired_contrast(rb[o]["per_seed"], ra[o]["per_seed"]),
                }
                for o in OUTCOMES
            }
            for row, (ra, rb) in rows.items()
        }
    return out


def _diff(e: dict[str, Any]) -> str:
    lo, hi = e["ci95"]
    ps = f"; t p {e['t_p']:.3f}, sign-flip p {e['sign_flip_p']:.2f}" if "t_p" in e else ""
    return f"{e['mean']:+.0%} [{lo:+.0%}, {hi:+.0%}]{ps}"


def report(c: dict[str, Any], args: argparse.Namespace, seeds: list[int]) -> str:
    lines = [
        f"# `{args.b}` against `{args.a}`",
        "",
        f"Held-out shares per teacher kind (pooled over seeds {seeds}, the clustered Wilson 95% interval of each run); "
        "B − A is paired by teacher seed (the unit, n = "
        f"{len(seeds)}): mean, 95% t-interval, paired t p and the exact sign-flip p (its floor: "
        f"{min(1.0, 2 / 2 ** len(seeds)):.2f}). Re-create: `.venv/bin/python analyses/invert_compare.py --a {args.a} "
        f"--b {args.b} --kinds {args.kinds} --out {args.out}`.",
        "",
        "| kind | family | outcome | A | B | B − A, paired by seed |",
        "|---|---|---|---|---|---|",
    ]
    for k, rows in c.items():
        for row, outs in rows.items():
            for o in ("correct", "inverted", "other"):
                e = outs[o]
                lines.append(
                    f"| {k} | {row} | {o} | {fmt_estimate(e['a'], True)} | {fmt_estimate(e['b'], True)} | {_diff(e['b_minus_a'])} |"
                )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--a", required=True, help="an invert out folder (its metrics.json): the reference")
    ap.add_argument("--b", required=True, help="another, with one change")
    ap.add_argument("--kinds", default="inv,true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    a, b = (read_json(Path(x) / "metrics.json") for x in (args.a, args.b))
    c = compare(a, b, [k.strip() for k in args.kinds.split(",") if k.strip()])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "compare.json", {"a": args.a, "b": args.b, "compare": c})
    atomic_write_text(out / "compare.md", report(c, args, a["design"]["seeds"]))
    print((out / "compare.md").read_text())
    return c


if __name__ == "__main__":
    main()
