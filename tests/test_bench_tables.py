"""The benchmark tables' paired comparison: same seed, same data order, so differences are taken per seed."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from _runs import paired, paired_table  # noqa: E402

ROWS = {"seq": [{"OP": 0.50, "BWT": -0.20}, {"OP": 0.60, "BWT": -0.10}, {"OP": 0.55, "BWT": -0.15}],
        "ewc": [{"OP": 0.60, "BWT": -0.02}, {"OP": 0.62, "BWT": -0.01}, {"OP": 0.58, "BWT": -0.03}],
        "agcl": [{"OP": 0.63, "BWT": -0.01}, {"OP": 0.60, "BWT": 0.00}, {"OP": 0.64, "BWT": -0.02}]}


def test_paired_interval_uses_students_t():
    # agcl - ewc in OP: +3, -2, +6 pts; mean 2.33, sd 4.04, t(0.975, 2) = 4.303: half-width 10.04
    assert paired(ROWS, "agcl", "ewc", "OP") == "+2.3 [-7.7, +12.4]"
    assert paired({"a": ROWS["agcl"][:1], "b": ROWS["ewc"][:1]}, "a", "b", "OP") == "+3.0 (1 seed)"


def test_paired_table_compares_with_the_best_other_method_per_metric():
    lines = paired_table(ROWS, ["OP", "BWT"]).splitlines()
    assert lines[2] == "| agcl | +2.3 [-7.7, +12.4] vs ewc | +1.0 [+1.0, +1.0] vs ewc |"
    assert paired_table({"seq": ROWS["seq"]}, ["OP"]) == ""


def test_run_records_are_reused_only_for_the_same_run(tmp_path, monkeypatch):
    """A finished run is filed as a record; the same run later (its run folder gone) reads the record,
    which keeps the commit it was measured at; a changed setting runs again."""
    import json

    import _runs

    launched, real_run = [], _runs.subprocess.run

    def launcher(cmd, **kwargs):
        if cmd[0] == "git":  # the record's commit
            return real_run(cmd, **kwargs)
        out = next(a.split("=", 1)[1] for a in cmd if a.startswith("output.dir="))
        os.makedirs(os.path.join(out, "seq"))
        with open(os.path.join(out, "seq", "results.json"), "w") as f:
            json.dump({"OP": 0.5 + len(launched), "BWT": 0.0}, f)
        launched.append(cmd)

    monkeypatch.setattr(_runs.subprocess, "run", launcher)
    records = str(tmp_path / "records")
    args = ("configs/demo_synthetic.yaml", "ds_configs/zero2.json", 0, "seq")
    first = _runs.run_one(*args, [], str(tmp_path / "a"), 2, record=records)
    again = _runs.run_one(*args, [], str(tmp_path / "b"), 2, record=records)
    assert first == again == {"OP": 0.5, "BWT": 0.0} and len(launched) == 1
    (kept,) = (tmp_path / "records" / "seed0").iterdir()
    assert json.loads(kept.read_text())["commit"]
    kept.write_text(json.dumps({**json.loads(kept.read_text()), "commit": "measured-earlier"}))
    _runs.run_one(*args, [], str(tmp_path / "a"), 2, record=records)  # its run folder still there: read, not run
    assert json.loads(kept.read_text())["commit"] == "measured-earlier" and len(launched) == 1
    changed = _runs.run_one(*args, ["training.lr=0.5"], str(tmp_path / "c"), 2, record=records)
    assert changed["OP"] == 1.5 and len(launched) == 2
    fresh = _runs.run_one(*args, [], str(tmp_path / "d"), 2, record=records, reuse=False)
    assert fresh["OP"] == 2.5 and len(launched) == 3
