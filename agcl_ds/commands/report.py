"""`agcl report`: matrices side by side and the OP/BWT/FWT table of one or more results.json."""

from __future__ import annotations

import argparse

from agcl_ds.commands.common import fail

HELP = "print matrices and OP/BWT/FWT of one or more results.json"


def add_arguments(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("results", nargs="+")
    cmd.add_argument("--png", help="also write a bar chart of OP/BWT/FWT per run to this file")
    cmd.add_argument("--curves", help="also write each old task's score over the sequence, one line per run, "
                                      "to this file (runs over the same tasks)")


def run(args: argparse.Namespace) -> None:
    from agcl_ds.report import load_results, metric_bars, score_curves, side_by_side, summary_table

    try:
        results = load_results(args.results)
    except ValueError as e:
        fail(str(e))
    for path, r in zip(args.results, results, strict=True):
        missing = [k for k in ("tasks", "matrix", "base", "method", "OP", "BWT", "FWT", "config")
                   if not isinstance(r, dict) or k not in r]
        if missing:
            fail(f"{path}: not a results.json (no {missing[0]!r})")
    print(side_by_side(results))
    print()
    print(summary_table(results))
    if args.curves and any(r["tasks"] != results[0]["tasks"] for r in results):
        fail(f"--curves: the runs' task sequences differ ({args.results[0]} has {results[0]['tasks']})")
    if args.png:
        metric_bars(results, args.png)
        print(f"wrote {args.png}")
    if args.curves:
        score_curves(results, args.curves)
        print(f"wrote {args.curves}")
