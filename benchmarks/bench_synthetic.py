"""Forgetting on the built-in synthetic default, several methods × seeds, through the real launcher.

Each (seed, method) is one `deepspeed --num_gpus N launch/train.py` run of configs/demo.yaml with
`seed=S` (so each seed also pretrains its own base, cached). Prints OP, BWT and the mean diagonal
(each task's accuracy right after it was learned) as mean ± std over seeds, and writes every run's
results under --out. Usage:

    python benchmarks/bench_synthetic.py --seeds 0 1 2 --methods seq agcl replay
"""

from __future__ import annotations

import argparse
import os

from _runs import ROOT, diagonal, fmt, run_one


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=["seq", "agcl", "replay"])
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "bench_synthetic"))
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = ap.parse_args()
    rows = {}
    for seed in args.seeds:
        for method in args.methods:
            res = run_one("configs/demo.yaml", "ds_configs/zero3.json", seed, method, args.overrides, args.out,
                          args.nproc)
            diag = diagonal(res)
            rows.setdefault(method, []).append((res["OP"], res["BWT"], diag))
            print(f"seed {seed} {method:<14} OP {res['OP']:.3f}  BWT {res['BWT']:+.3f}  diag {diag:.3f}", flush=True)
    print("\n| method | OP | BWT | diag (learned when current) | seeds |\n|---|---|---|---|---|")
    for method, vals in rows.items():
        print(f"| {method} | {fmt([v[0] for v in vals])} | {fmt([v[1] for v in vals])} | "
              f"{fmt([v[2] for v in vals])} | {len(vals)} |")
    if "seq" in rows and "agcl" in rows:
        gap = [a[1] - s[1] for a, s in zip(rows["agcl"], rows["seq"], strict=True)]
        print(f"\nagcl BWT - seq BWT = {fmt(gap)} (per-seed differences)")


if __name__ == "__main__":
    main()
