"""The runner the forgetting benchmarks share: one (seed, method) = one launcher run, cached.

Each run is `deepspeed --num_gpus N launch/train.py --ds <ds> --config <yaml> seed=S method.name=M ...`
(the same command a user types), written under <out>/seed<S>/<tag>/; a finished run's results.json is
reused, so an interrupted benchmark continues where it stopped.

Finished runs are also kept as records, one small JSON per run under benchmarks/records/<setting>/ and
committed: the run folders live in runs/ and are lost with the machine, the records let a later session add
seeds or variants to a table without re-running what is already measured. A record's name carries a hash
of what decides the run's outcome: the resolved config (less the output folder; the data path relative to
the checkout), the DeepSpeed JSON, the rank count and the precision this machine computes natively; so a changed setting
misses the record and runs again. Code changes are not in the hash: each record names the commit it was
measured at, and `--fresh` runs again and replaces the records.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys

from agcl_ds.config import load_config
from agcl_ds.device import native_precision
from agcl_ds.distributed import free_port
from agcl_ds.fileio import write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORDS = os.path.join(ROOT, "benchmarks", "records")

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
    "elements": {"lora_gate": "elements"},
    "rows": {"lora_gate": "rows"},
    "components": {"lora_gate": "components"},
    "mass50": {"attribution": {"normalize": "mass", "mass": 0.5}},
    "mass80": {"attribution": {"normalize": "mass", "mass": 0.8}},
    "global": {"attribution": {"select": "global"}},
    "mass80global": {"attribution": {"normalize": "mass", "mass": 0.8, "select": "global"}},
    "sum": {"combine": "sum"},
    "decay": {"combine": "decay", "decay": 0.5},
    "soft": {"attribution": {"temperature": 1.0}},  # the top-20% mask softened: σ((x − τ)/1) on the log scale
    "all": {"attribution": {"only_correct": False}},  # importance from every sample, not only the correct ones
    "carry": {},  # Adam moments carried across tasks (TRAINING_VARIANTS), the method as it is
    "halfanchor": {"alpha": 0.5, "anchor": 1.0},  # protected elements half free, pulled back to θ* (EWC's λ = 1)
    "rankanchor": {"attribution": {"normalize": "rank"}, "anchor": 1.0},  # a graded gate with the anchor
}


# what a method needs of the model in a LoRA config: olora trains one adapter per task, osf peft's OSF tuner,
# which changes every targeted weight at full rank and so takes the full fine-tuning lr (configs/cl_smollm2.yaml)
# instead of LoRA's 1e-3: at 1e-3 its loss rose from ~3 to 11.5 within 10 steps and task 1 ended at 0% (cpu-lora)
METHOD_OVERRIDES: dict[str, list[str]] = {"olora": ["model.peft.adapter=per_task"],
                                          "osf": ["model.peft.type=osf", "training.lr=3.0e-4"]}


# variants that change the training, not the method (any method may take them, e.g. seq:carry vs agcl:carry)
TRAINING_VARIANTS: dict[str, list[str]] = {"carry": ["training.reset_optimizer=false"]}


def variant_overrides(name: str, variant: str) -> list[str]:
    """The `method.options=` override of an ablation (JSON is YAML flow, so the config parser reads it)."""
    if not variant:
        return []
    options = VARIANTS[variant]
    if name == "agcl_replay":
        options = {"agcl": options}
    return ([f"method.options={json.dumps(options)}"] if options else []) + TRAINING_VARIANTS.get(variant, [])


def run_identity(config: str, ds: str, overrides: list[str], nproc: int) -> dict:
    """What decides a run's outcome, as a record stores it (the output folder dropped, the data path relative)."""
    view = load_config(os.path.join(ROOT, config), overrides).resume_view()
    view["output"].pop("dir", None)
    if view["data"]["path"]:  # the same data in any checkout
        view["data"]["path"] = os.path.relpath(os.path.join(ROOT, view["data"]["path"]), ROOT)
    with open(os.path.join(ROOT, ds)) as f:
        ds_config = json.load(f)
    identity = {"config": view, "ds": ds_config, "nproc": nproc, "native_precision": native_precision()[0]}
    return json.loads(json.dumps(identity))  # as it reads back from a record (tuples become lists)


def _commit() -> str:
    """HEAD, with "+changes" when the work tree differs from it (the record was measured on uncommitted code)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    head = git("rev-parse", "--short=12", "HEAD") or "unknown"
    return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no", "agcl_ds", "launch") else "")


def run_one(config: str, ds: str, seed: int, method: str, extra: list[str], out: str, nproc: int,
            quiet: bool = True, drop_checkpoints: bool = False, record: str | None = None,
            reuse: bool = True) -> dict:
    """One launcher run (or its cached results). `drop_checkpoints`: remove the finished run's checkpoints,
    which only a resume needs (a finished SmolLM2 cpu-setting run keeps 0.84 GB of them). `record`: a records
    folder (benchmarks/records/<setting>) to file the finished run in and, with `reuse`, to take a matching
    record from instead of running."""
    name, _, variant = method.partition(":")
    if variant and variant not in VARIANTS:
        raise SystemExit(f"unknown variant {variant!r} in {method!r} (known: {', '.join(VARIANTS)})")
    run_out = os.path.join(out, f"seed{seed}", method.replace(":", "-"))
    path = os.path.join(run_out, name, "results.json")
    overrides = [f"seed={seed}", f"method.name={name}", f"output.dir={run_out}", "logging.progress=false",
                 *variant_overrides(name, variant), *METHOD_OVERRIDES.get(name, []), *extra]
    record_path, identity = None, None
    if record:
        identity = run_identity(config, ds, overrides, nproc)
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
        record_path = os.path.join(record, f"seed{seed}", f"{method.replace(':', '-')}-{digest}.json")
        if reuse and os.path.isfile(record_path) and not os.path.isfile(path):
            with open(record_path) as f:
                return json.load(f)["results"]
    commit, ran = _commit(), not os.path.isfile(path)  # the code the run starts with
    if ran:
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1")
        env.setdefault("DS_ACCELERATOR", "cpu")
        bindir = os.path.dirname(sys.executable)
        cmd = [os.path.join(bindir, "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()),
               "launch/train.py", "--ds", ds, "--config", config, *overrides]
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL if quiet else None)
        if drop_checkpoints:
            shutil.rmtree(os.path.join(run_out, name, "checkpoints"), ignore_errors=True)
    with open(path) as f:
        results = json.load(f)
    if record_path and (ran or not os.path.isfile(record_path)):  # a record keeps the commit it was measured at
        write_json(record_path, {"commit": commit, "identity": identity, "results": results}, indent=1)
    return results


def run_grid(config: str, ds: str, seeds: list[int], methods: list[str], extra: list[str], out: str,
             nproc: int, record: str | None = None, reuse: bool = True) -> dict[str, list[dict]]:
    """Every (seed, method) run, seed by seed, each printed as it finishes; results (with "diag") per method."""
    rows: dict[str, list[dict]] = {}
    for seed in seeds:
        for method in methods:
            res = run_one(config, ds, seed, method, extra, out, nproc, drop_checkpoints=True, record=record,
                          reuse=reuse)
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

