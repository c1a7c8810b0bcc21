"""Forgetting on the built-in synthetic default, several methods × seeds, through the real launcher.

Each (seed, method) is one `deepspeed --num_gpus N launch/train.py` run of configs/demo.yaml with
`seed=S` (so each seed also pretrains its own base, cached). Prints OP, BWT and the mean diagonal
(each task's accuracy right after it was learned) as mean ± std over seeds, and writes every run's
results under --out. Usage:

    python benchmarks/bench_synthetic.py --seeds 0 1 2 --methods seq agcl replay
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from agcl_ds.distributed import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_one(seed: int, method: str, extra: list[str], out: str, nproc: int) -> dict:
    name, _, options = method.partition(":")  # e.g. "agcl:single" picks a named variant below
    variants = {
        "single": ["method.options={importance_from: single_task}"],
        "grad": ["method.options={gate_on: grad}"],
        "rank": ["method.options={attribution: {normalize: rank}}"],
        "half": ["method.options={alpha: 0.5}"],
        "top50": ["method.options={attribution: {top_frac: 0.5}}"],
        "random": ["method.options={attribution: {source: random}}"],
        "gradxw": ["method.options={attribution: {source: grad_x_weight}}"],
    }
    tag = method.replace(":", "-")
    run_out = os.path.join(out, f"seed{seed}", tag)
    path = os.path.join(run_out, name, "results.json")
    if not os.path.isfile(path):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        env.setdefault("DS_ACCELERATOR", "cpu")
        bindir = os.path.dirname(sys.executable)
        port = free_port()  # other jobs on the machine may hold DeepSpeed's default 29500
        cmd = [os.path.join(bindir, "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(port),
               "launch/train.py", "--ds",
               "ds_configs/zero3.json", "--config", "configs/demo.yaml", f"seed={seed}", f"method.name={name}",
               f"output.dir={run_out}", "logging.progress=false", *variants.get(options, []), *extra]
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    with open(path) as f:
        return json.load(f)


def fmt(values: list[float]) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:+.3f} ± {std:.3f}"


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
            res = run_one(seed, method, args.overrides, args.out, args.nproc)
            diag = statistics.fmean(res["matrix"][i][i] for i in range(len(res["tasks"])))
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
