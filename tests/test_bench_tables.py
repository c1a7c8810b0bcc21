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
