"""The runner the forgetting benchmarks share: one (seed, method) = one launcher run, cached.

Each run is `deepspeed --num_gpus N launch/train.py --ds <ds> --config <yaml> seed=S method.name=M ...`
(the same command a user types), written under <out>/seed<S>/<tag>/; a finished run's results.json is
reused, so an interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys

from agcl_ds.distributed import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# "<method>:<variant>" names an ablation: the method with these agcl options (for agcl_replay, its agcl part)
VARIANTS: dict[str, dict] = {
    "single": {"importance_from": "single_task"},
    "grad": {"gate_on": "grad"},
    "rank": {"attribution": {"normalize": "rank"}},
    "minmax": {"attribution": {"normalize": "minmax"}},
    "minmaxgrad": {"gate_on": "grad", "attribution": {"normalize": "minmax"}},
    "half": {"alpha": 0.5},
    "top30": {"attribution": {"top_frac": 0.3}},
    "top50": {"attribution": {"top_frac": 0.5}},
    "top70": {"attribution": {"top_frac": 0.7}},
    "n128": {"attribution": {"n_samples": 128}},
    "k16": {"attribution": {"k": 16, "n_samples": 128}},
    "power": {"attribution": {"aggregate": "power"}},
    "random": {"attribution": {"source": "random"}},
    "gold": {"attribution": {"target": "gold"}},
    "loss": {"attribution": {"target": "loss"}},
    "gradxw": {"attribution": {"source": "grad_x_weight"}},
    "elements": {"merged_gate": "elements"},
    "rows": {"merged_gate": "rows"},
    "mass50": {"attribution": {"normalize": "mass", "mass": 0.5}},
    "mass80": {"attribution": {"normalize": "mass", "mass": 0.8}},
    "global": {"attribution": {"select": "global"}},
    "mass80global": {"attribution": {"normalize": "mass", "mass": 0.8, "select": "global"}},
    "sum": {"combine": "sum"},
    "decay": {"combine": "decay", "decay": 0.5},
}


# what a method needs of the model in a LoRA config: olora trains one adapter per task, osf peft's OSF tuner
METHOD_OVERRIDES: dict[str, list[str]] = {"olora": ["model.peft.adapter=per_task"], "osf": ["model.peft.type=osf"]}


def variant_overrides(name: str, variant: str) -> list[str]:
    """The `method.options=` override of an ablation (JSON is YAML flow, so the config parser reads it)."""
    if not variant:
        return []
    options = VARIANTS[variant]
    if name == "agcl_replay":
        options = {"agcl": options}
    return [f"method.options={json.dumps(options)}"]


def run_one(config: str, ds: str, seed: int, method: str, extra: list[str], out: str, nproc: int,
            quiet: bool = True, drop_checkpoints: bool = False) -> dict:
    """One launcher run (or its cached results). `drop_checkpoints`: remove the finished run's checkpoints,
    which only a resume needs (a finished SmolLM2 cpu-setting run keeps 0.84 GB of them)."""
    name, _, variant = method.partition(":")
    if variant and variant not in VARIANTS:
        raise SystemExit(f"unknown variant {variant!r} in {method!r} (known: {', '.join(VARIANTS)})")
    run_out = os.path.join(out, f"seed{seed}", method.replace(":", "-"))
    path = os.path.join(run_out, name, "results.json")
    if not os.path.isfile(path):
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1")
        env.setdefault("DS_ACCELERATOR", "cpu")
        bindir = os.path.dirname(sys.executable)
        cmd = [os.path.join(bindir, "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()),
               "launch/train.py", "--ds", ds, "--config", config, f"seed={seed}", f"method.name={name}",
               f"output.dir={run_out}", "logging.progress=false", *variant_overrides(name, variant),
               *METHOD_OVERRIDES.get(name, []), *extra]
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL if quiet else None)
        if drop_checkpoints:
            shutil.rmtree(os.path.join(run_out, name, "checkpoints"), ignore_errors=True)
    with open(path) as f:
        return json.load(f)


def run_grid(config: str, ds: str, seeds: list[int], methods: list[str], extra: list[str], out: str,
             nproc: int) -> dict[str, list[dict]]:
    """Every (seed, method) run, seed by seed, each printed as it finishes; results (with "diag") per method."""
    rows: dict[str, list[dict]] = {}
    for seed in seeds:
        for method in methods:
            res = run_one(config, ds, seed, method, extra, out, nproc, drop_checkpoints=True)
            res["diag"] = diagonal(res)
            rows.setdefault(method, []).append(res)
            print(f"seed {seed} {method:<14} OP {res['OP']:.3f}  BWT {res['BWT']:+.3f}  FWT {res['FWT']:+.3f}  "
                  f"diag {res['diag']:.3f}", flush=True)
    return rows


def table(rows: dict[str, list[dict]], keys: list[str]) -> str:
    """Markdown table: mean ± std over seeds of each of `keys` ("diag" = learned when current), per method."""
    names = [k if k != "diag" else "diag (learned when current)" for k in keys]
    lines = [f"| method | {' | '.join(names)} | seeds |", "|---" * (len(keys) + 2) + "|"]
    for m, rs in rows.items():
        lines.append(f"| {m} | " + " | ".join(fmt([r[k] for r in rs]) for k in keys) + f" | {len(rs)} |")
    return "\n".join(lines)


def diagonal(res: dict) -> float:
    """Mean accuracy of each task right after it was learned (did the method still learn?)."""
    return statistics.fmean(res["matrix"][i][i] for i in range(len(res["tasks"])))


def fmt(values: list[float]) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:+.3f} ± {std:.3f}"


# two-sided 95% quantiles of Student's t, t_{0.975, df} for df = 1..10 (any statistics table); 1.96 beyond
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]


def paired(rows: dict[str, list[dict]], a: str, b: str, key: str) -> str:
    """`a − b` in points, per seed paired (same seed, same data order), mean with its 95% t interval."""
    diffs = [100 * (x[key] - y[key]) for x, y in zip(rows[a], rows[b], strict=True)]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return f"{mean:+.1f} (1 seed)"
    half = (T975[len(diffs) - 2] if len(diffs) <= 11 else 1.96) * statistics.stdev(diffs) / len(diffs) ** 0.5
    return f"{mean:+.1f} [{mean - half:+.1f}, {mean + half:+.1f}]"


def paired_table(rows: dict[str, list[dict]], keys: list[str]) -> str:
    """Markdown: each agcl-family method minus the best other method (by mean of each key), paired by seed."""
    ours = [m for m in rows if m.split(":")[0] in ("agcl", "agcl_replay")]
    others = [m for m in rows if m not in ours]
    if not ours or not others:
        return ""
    lines = ["| difference (pts, 95% t interval over paired seeds) | " + " | ".join(keys) + " |",
             "|---" * (len(keys) + 1) + "|"]
    for m in ours:
        cells = []
        for k in keys:
            best = max(others, key=lambda o: statistics.fmean(r[k] for r in rows[o]))
            cells.append(f"{paired(rows, m, best, k)} vs {best}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

