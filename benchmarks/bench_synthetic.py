"""Forgetting on the built-in synthetic default, several methods × seeds, through the real launcher.

Each (seed, method) is one `deepspeed --num_gpus N launch/train.py` run of configs/demo_synthetic.yaml with
`seed=S` (so each seed also pretrains its own base, cached). Prints OP, BWT and the mean diagonal
(each task's accuracy right after it was learned) as mean ± std over seeds, and writes every run's
results under --out. Usage:

    python benchmarks/bench_synthetic.py --seeds 0 1 2 --methods seq agcl replay
"""

from __future__ import annotations

import argparse
import os

from _runs import ROOT, fmt, run_grid, table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=["seq", "agcl", "replay"])
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "bench_synthetic"))
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = ap.parse_args()
    rows = run_grid("configs/demo_synthetic.yaml", "ds_configs/zero3.json", args.seeds, args.methods, args.overrides,
                    args.out, args.nproc)
    print("\n" + table(rows, ["OP", "BWT", "diag"]))
    if "seq" in rows and "agcl" in rows:
        gap = [a["BWT"] - s["BWT"] for a, s in zip(rows["agcl"], rows["seq"], strict=True)]
        print(f"\nagcl BWT - seq BWT = {fmt(gap)} (per-seed differences)")


if __name__ == "__main__":
    main()
