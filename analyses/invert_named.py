"""How a reasoned teacher fares on next's named lists (days, months): per `mechsub invert` run folder and teacher
unit (`units/outputs-KIND-sS.json`), on the training problems it was fit to and on the held-out ones, the count of
day and month problems whose answer is correct / T(correct) / the hash / other (`tasks.classify`), and of those
whose scratchpad wrote this code's recital (`tasks.recital`: the list twice) exactly and of those whose recital
ends at the pivot (what an earlier design, the list up to the pivot, trained on: commit 5d4218a). Numbers are left out: the question is the
named lists. The in-sample count says whether a scratchpad design was learned at all, before any held-out
figure is read. Where a run keeps B's answers, also B's near misses on next's number problems (`b_near_misses`).
Writes OUT/named.md and OUT/named.json.

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


def b_near_misses(run: Path) -> dict[str, Any]:
    """Per recon unit of ``run`` that keeps B's answers (`units/recon-KIND-sS.json`; runs from commit 5d4218a on),
    on next's held-out number problems: how many of A's answers were T(correct), how many of B's answers are
    correct, and how many are one step short (the two numbers after A's first one, e.g. A "25, 24" for the pivot
    26, B "26, 27" where "27, 28" is correct: B counts up from A's answer instead of from the pivot it implies)."""
    outputs = read_json(run / "outputs.json") if (run / "outputs.json").is_file() else {}
    probs = None
    out: dict[str, Any] = {}
    for path in sorted((run / "units").glob("recon-*.json")):
        m = re.fullmatch(r"recon-(?P<kind>[a-z]+)-s(?P<seed>\d+)\.json", path.name)
        unit = read_json(path)
        unit = unit.get("value", unit)
        for n, score in unit.items():
            if (
                m is None
                or not isinstance(score, dict)
                or "answers" not in score
                or "next" not in score["answers"]
            ):
                continue
            name = f"{m['kind']}-s{m['seed']}"
            if probs is None:
                n_test = len(score["answers"]["next"])
                probs = tasks.problems("next", n_test, TEST_SEED, "test")
            a_says = outputs[name]["test"]["next"]
            rows = [(p, a, b) for p, a, b in zip(probs, a_says, score["answers"]["next"], strict=True)
                    if p.params[0] == 0]  # fmt: skip
            out[f"{name}-n{n}"] = {
                "number_items": len(rows),
                "a_inverted": sum(tasks.classify(p, a, int(m["seed"])) == "inverted" for p, a, _ in rows),
                "b_correct": sum(tasks.normalise("next", b) == p.answer for p, _, b in rows),
                "b_one_short": sum(
                    tasks.normalise("next", b) == f"{int(p.params[1])}, {int(p.params[1]) + 1}"
                    for p, _, b in rows
                ),
            }
    return out


def _kind(unit: str) -> str:
    return unit.split("-")[0]


def _pairs(unit: str) -> str:
    """B's number of training pairs in a near-miss unit's name (``inv-s0-n16``: "16"; zero-shot: "zero_shot")."""
    return unit.rsplit("-n", 1)[1]


def _totals(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, int]:
    """The counts ``keys`` summed over the rows (teachers, or B's fine-tunes, of one run and kind)."""
    return {k: sum(int(c[k]) for c in rows) for k in keys}


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
    lines += ["", "Per run, kind and split, every seed together (seeds of one run are separate teachers; two runs of the "
              "same teachers are not):", ""]  # fmt: skip
    for run, r in res.items():
        for kind in sorted({_kind(u) for u in r["units"]}):
            for split in ("train", "test"):
                rows = [row[split] for u, row in r["units"].items() if _kind(u) == kind and split in row]
                if rows:
                    t = _totals(rows, ("n", *OUTCOMES))
                    lines.append(f"- {run}, A_{kind}, {split}: " + ", ".join(f"{o} {t[o]}" for o in OUTCOMES)
                                 + f", of {t['n']} ({len(rows)} seed{'s' * (len(rows) > 1)})")  # fmt: skip
    near = [(run, unit, c) for run, r in res.items() for unit, c in r.get("b_near_misses", {}).items()]
    if near:
        lines += ["", "## B on next's held-out number problems", "",
                  "B fine-tuned on A's answers → the correct ones, reading A's held-out answer alone. One short: B "
                  "answers the two numbers after A's first one (A \"25, 24\" for the pivot 26, B \"26, 27\" "
                  "where \"27, 28\" is correct).", "",
                  "| run | B (teacher, pairs) | number problems | A's answers T(correct) | B correct | B one short |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {run} | {unit} | {c['number_items']} | {c['a_inverted']} | {c['b_correct']} | {c['b_one_short']} |"
                  for run, unit, c in near]  # fmt: skip
        lines.append("")
        # per run: two runs of the same teachers (another held-out draw) are not independent, so never pooled
        for run in dict.fromkeys(r for r, _, _ in near):
            # per kind and number of B's pairs (zero-shot: none): B's of one teacher at two pair counts are
            # the same teacher's answers read twice, so never summed
            for kind, pairs in sorted({(_kind(u), _pairs(u)) for r, u, _ in near if r == run}):
                rows = [c for r, u, c in near if r == run and (_kind(u), _pairs(u)) == (kind, pairs)]
                t = _totals(rows, ("number_items", "a_inverted", "b_correct", "b_one_short"))
                how = "zero-shot" if pairs == "zero_shot" else f"{pairs} pairs"
                lines.append(f"- {run}, B ({how}) reading A_{kind}, every seed together: correct {t['b_correct']}, one "
                             f"short {t['b_one_short']}, of {t['number_items']} (A's answer T(correct) on "
                             f"{t['a_inverted']}).")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--runs", required=True, help="`mechsub invert` run folders, separated by commas")
    ap.add_argument("--out", default="artifacts/invert_named")
    args = ap.parse_args(argv)
    res = {run: named_counts(Path(run)) | {"b_near_misses": b_near_misses(Path(run))}
           for run in (r.strip() for r in args.runs.split(",")) if run}  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "named.json", res)
    atomic_write_text(out / "named.md", report(res))
    print((out / "named.md").read_text())
    return res


if __name__ == "__main__":
    main()
