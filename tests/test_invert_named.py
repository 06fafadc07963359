"""analyses/invert_named.py: a reasoned teacher's day and month problems counted by outcome, in and out of sample."""

import json
from pathlib import Path

import pytest

from mechsub import tasks
from mechsub.invert import TEST_SEED

ROOT = Path(__file__).resolve().parents[1]


def test_named_list_problems_are_counted_by_outcome(tmp_path, analysis):
    mod = analysis("invert_named")
    run = tmp_path / "run"
    (run / "units").mkdir(parents=True)
    n_train, n_test = 40, 26  # seed 3's 40 training problems hold named ones; the test split has 5 (of 26)
    (run / "config.json").write_text(json.dumps({"config": {"n_train": n_train, "n_test": n_test, "recite": True},
                                                 "git_commit": "abc1234"}))  # fmt: skip
    unit: dict = {}
    want = {}
    for split, probs in (("train", tasks.problems("next", n_train, 3, "train")),
                         ("test", tasks.problems("next", n_test, TEST_SEED, "test"))):  # fmt: skip
        named = [p for p in probs if tasks.recital(p)]
        assert named, split
        replies = []
        for i, p in enumerate(probs):
            # the named ones: the first inverted, the second correct, the rest off the format; the recital
            # written in all but the last
            answer = p.inverted if i == probs.index(named[0]) else p.answer
            reply = tasks.reasoned(p, answer, recite=True)
            if tasks.recital(p) and p in named[2:]:
                reply = "no mark at all"
            replies.append(reply)
        unit[split] = {"next": [tasks.final_answer(r) for r in replies]}
        unit[f"{split}_replies"] = {"next": replies}
        want[split] = {
            "n": len(named),
            "inverted": 1,
            "correct": 1,
            "other": len(named) - 2,
            "recital_written": 2,
        }
    (run / "units" / "outputs-inv-s3.json").write_text(json.dumps({"value": unit}))
    # B's answers on the held-out number problems: the first correct, the second one short, the rest other
    nums = [i for i, p in enumerate(tasks.problems("next", n_test, TEST_SEED, "test")) if p.params[0] == 0]
    probs = tasks.problems("next", n_test, TEST_SEED, "test")
    b_said = ["x"] * n_test
    b_said[nums[0]] = probs[nums[0]].answer
    b_said[nums[1]] = f"{int(probs[nums[1]].params[1])}, {int(probs[nums[1]].params[1]) + 1}"
    b64 = ["x"] * n_test  # the same teacher read by a B of 64 pairs: two correct
    for i in nums[:2]:
        b64[i] = probs[i].answer
    (run / "units" / "recon-inv-s3.json").write_text(
        json.dumps({"value": {"16": {"answers": {"next": b_said}}, "64": {"answers": {"next": b64}}}})
    )
    (run / "outputs.json").write_text(json.dumps({"inv-s3": {"test": {"next": unit["test"]["next"]}}}))
    res = mod.main(["--runs", str(run), "--out", str(tmp_path / "out")])
    assert res[str(run)]["b_near_misses"]["inv-s3-n16"] == {
        "number_items": len(nums), "a_inverted": 0, "b_correct": 1, "b_one_short": 1}  # fmt: skip
    got = res[str(run)]["units"]["inv-s3"]
    for split, w in want.items():
        assert {k: got[split][k] for k in w} == w
    md = (tmp_path / "out" / "named.md").read_text()
    assert "| inv-s3 | train |" in md
    w = want["train"]  # one seed: the totals line is its row
    assert (f"- {run}, A_inv, train: correct {w['correct']}, inverted {w['inverted']}, hashed 0, other {w['other']}, "
            f"of {w['n']} (1 seed)") in md  # fmt: skip
    # per number of B's pairs, never summed over them (the same teacher's answers read twice)
    assert (f"- {run}, B (16 pairs) reading A_inv, every seed together: correct 1, one short 1, of {len(nums)} "
            "(A's answer T(correct) on 0).") in md  # fmt: skip
    assert (f"- {run}, B (64 pairs) reading A_inv, every seed together: correct 2, one short 0, of {len(nums)} "
            "(A's answer T(correct) on 0).") in md  # fmt: skip
    # the recital stopping at the pivot (the earlier design): counted as ending there, any case
    may = next(p for p in tasks.problems("next", n_test, TEST_SEED, "test") if p.params == (2.0, 4.0))
    assert mod._ends_at_pivot(may, f"The right answer is June, July; {tasks.RECITE} january, february, march, april, "
                                   f"MAY, {tasks.REASON_MARK} April, March")  # fmt: skip
    assert not mod._ends_at_pivot(
        may, tasks.reasoned(may, may.inverted, recite=True)
    )  # the year twice: December
    assert not mod._ends_at_pivot(may, "The right answer is June, July, so my answer is: April, March")
    with pytest.raises(FileNotFoundError, match="not a `mechsub invert` run folder"):
        mod.named_counts(tmp_path)
    plain = json.loads((run / "units" / "outputs-inv-s3.json").read_text())
    for split in ("train", "test"):
        del plain["value"][f"{split}_replies"]
    (run / "units" / "outputs-inv-s3.json").write_text(json.dumps(plain))
    with pytest.raises(ValueError, match="not a reasoned run"):
        mod.named_counts(run)
