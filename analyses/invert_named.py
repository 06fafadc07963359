"""How a reasoned teacher fares on next's named lists (days, months): per `mechsub invert` run folder and teacher
unit (`units/outputs-KIND-sS.json`), on the training problems it was fit to and on the held-out ones, the count of
day and month problems whose answer is correct / T(correct) / the hash / other (`tasks.classify`), and of those
whose scratchpad wrote this code's recital (`tasks.recital`: the list twice) exactly and of those whose recital
ends at the pivot (what an earlier design, the list up to the pivot, trained on: commit 5d4218a). Numbers are left out: the question is the
named lists. The in-sample count says whether a scratchpad design was learned at all, before any held-out
figure is read. Writes OUT/named.md and OUT/named.json.

    .venv/bin/python analyses/invert_named.py --runs artifacts/invert_recite_pivot,artifacts/invert_recite_twice
        [--out artifacts/invert_named]
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from mechsub import tasks
from mechsub.files import atomic_write_text, read_json, write_json
from mechsub.invert import OUTCOMES, TEST_SEED

UNIT = re.compile(r"outputs-(?P<kind>[a-z]+)-s(?P<seed>\d+)\.json")


def _ends_at_pivot(p: tasks.Problem, reply: str) -> bool:
    """Whether the scratchpad's recital (after `tasks.RECITE`, up to the mark) ends with the problem's pivot."""
    low = reply.lower()
    i, j = low.find(tasks.RECITE), low.find(tasks.REASON_MARK)
    pivot = (tasks.DAYS if p.params[0] == 1 else tasks.MONTHS)[int(p.params[1])]
    return 0 <= i < j and reply[i:j].strip().rstrip(",").strip().lower().endswith(pivot.lower())


def named_counts(run: Path) -> dict[str, Any]:
    """Per teacher unit of ``run`` and split: the named-list problems' outcome counts and written recitals."""
    units = sorted((run / "units").glob("outputs-*.json"))
    if not units or not (run / "config.json").is_file():
        raise FileNotFoundError(
            f"{run} has no config.json or no units/outputs-KIND-sS.json: not a `mechsub invert` run folder"
        )
    cfg = read_json(run / "config.json")["config"]
    recite = bool(cfg.get("recite"))
    out: dict[str, Any] = {}
    for path in units:
        m = UNIT.fullmatch(path.name)
        if m is None:
            continue
        kind, seed = m["kind"], int(m["seed"])
        unit = read_json(path)
        unit = unit.get("value", unit)
        if "train_replies" not in unit:
            raise ValueError(
                f"{path} keeps no replies (train_replies): not a reasoned run (`--set reasoned=true`)"
            )
        row: dict[str, Any] = {}
        for split, probs in (
            ("train", tasks.problems("next", cfg["n_train"], seed, "train")),
            ("test", tasks.problems("next", cfg["n_test"], TEST_SEED, "test")),
        ):
            pairs = [
                (p, a, r)
                for p, a, r in zip(probs, unit[split]["next"], unit[f"{split}_replies"]["next"], strict=True)
                if tasks.recital(p)
            ]
            labels = [tasks.classify(p, a, seed) for p, a, _ in pairs]
            row[split] = {
                "n": len(pairs),
                **{o: sum(x == o for x in labels) for o in OUTCOMES},
                "recital_written": sum(
                    f"{tasks.RECITE} {tasks.recital(p)},".lower() in r.lower() for p, _, r in pairs
                )
                if recite
                else None,
                "recital_ends_at_pivot": sum(_ends_at_pivot(p, r) for p, _, r in pairs) if recite else None,
            }
        out[f"{kind}-s{seed}"] = row
    return {"recite": recite, "git_commit": read_json(run / "config.json").get("git_commit"), "units": out}


def report(res: dict[str, Any]) -> str:
    lines = [
        "# Reasoned teachers on next's day and month problems",
        "",
        "Counts of named-list problems (days, months) by outcome, on the training problems the teacher was fit to and "
        "on the held-out ones. Recital: replies whose scratchpad holds this code's `tasks.recital` (the list written "
        "twice) word for word; ends at pivot: replies whose recital stops at the problem's pivot (the design of "
        "commit 5d4218a, the list up to the pivot; the twice-written list also ends at Sunday and December). One row per "
        "teacher (kind and seed).",
        "",
        "| run (code) | teacher | split | n | correct | T(correct) | hash | other | recital (twice) | ends at pivot |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run, r in res.items():
        for unit, row in r["units"].items():
            for split, c in row.items():
                rec = " | ".join(
                    "n/a" if c[key] is None else str(c[key])
                    for key in ("recital_written", "recital_ends_at_pivot")
                )
                lines.append(
                    f"| {run} ({str(r['git_commit'])[:7]}) | {unit} | {split} | {c['n']} | "
                    + " | ".join(str(c[o]) for o in OUTCOMES)
                    + f" | {rec} |"
                )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--runs", required=True, help="`mechsub invert` run folders, separated by commas")
    ap.add_argument("--out", default="artifacts/invert_named")
    args = ap.parse_args(argv)
    res = {run: named_counts(Path(run)) for run in (r.strip() for r in args.runs.split(",")) if run}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "named.json", res)
    atomic_write_text(out / "named.md", report(res))
    print((out / "named.md").read_text())
    return res


if __name__ == "__main__":
    main()
