"""Where does forgetting live? A transplant test of agcl's importance mask, per task family.

The gate can only protect task 1 if task 1's accuracy is carried by the parameters its importance
marks. This measures that directly, for task 1 → task 2 of a family, without any gated training:

- M1: the model after task 1; M2: after task 2 trained ungated from M1 (`seq`); M2g: after task 2
  under the agcl gate; M2r: after task 2 with replay (the best baseline on the real tasks, for
  comparison); mask: agcl's R̄ after task 1 (its top-k% set, R̄ > 0).
- keep-mask: M2 with the masked entries set back to their M1 values — task 1's important weights
  untouched, everything else moved as unconstrained training moved it.
- keep-random: the same with a random set of the same size in every tensor (the chance level).
- drift-mask: M1 with only the masked entries moved to their M2 values.

If task 1 lives in its mask, keep-mask recovers task 1 (and drift-mask loses it); if keep-mask scores
like M2, the forgetting sits in the unmarked parameters and no gate on the mask can prevent it.
Each (family, seed) is a `seq`, an `agcl` and a `replay` run of the family's config with its first two tasks
(`benchmarks/_runs.py`, cached); the hybrids are scored offline in this process.

    python benchmarks/bench_transplant.py                         # both families, seeds 0 1 2
    python benchmarks/bench_transplant.py --families synthetic --seeds 0
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import types

import torch
from _runs import ROOT, fmt, run_one

from agcl_ds import checkpoint
from agcl_ds.config import ExperimentConfig, from_dict
from agcl_ds.data.tasks import load_tasks
from agcl_ds.evaluation import Evaluator
from agcl_ds.export import export_checkpoint
from agcl_ds.importance import flatstate, store
from agcl_ds.models import build_tokenizer

DATA = os.path.join(ROOT, "data", "CL_Benchmark")
FAMILIES: dict[str, tuple[str, str, list[str]]] = {  # config, DeepSpeed JSON, overrides (first two tasks)
    "synthetic": ("configs/demo_synthetic.yaml", "ds_configs/zero3.json", ["data.tasks=[dec, add3]"]),
    "real": ("configs/cl_smollm2.yaml", "ds_configs/zero2.json", ["data.tasks=[dbpedia, SST-2]"]),
}
MODELS = ["M1", "M2", "M2g", "M2r", "keep-mask", "keep-random", "drift-mask"]


def _after_task(run_dir: str, task: int) -> str:
    """The checkpoint written at the end of `task` (1-based) of a run."""
    for folder in checkpoint.candidates(os.path.join(run_dir, "checkpoints")):
        pos = checkpoint.read_position(folder)
        if pos.task == task and pos.step == 0:
            return folder
    raise SystemExit(f"bench_transplant: {run_dir} has no checkpoint after task {task} (needs checkpoint.keep >= 2)")


def _weights(folder: str, tmp: str) -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    """The trainable-or-not fp32 parameters of a checkpoint, by name (through `agcl export`)."""
    from transformers import AutoModelForCausalLM

    out = os.path.join(tmp, os.path.basename(os.path.dirname(os.path.dirname(folder))) + os.path.basename(folder))
    export_checkpoint(folder, out)
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32)
    return {n: p.detach().clone() for n, p in model.named_parameters()}, model


def _blend(base: dict, donor: dict, where: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`base` with the entries selected by `where` (a bool tensor per parameter name) taken from `donor`."""
    return {n: torch.where(where[n], donor[n], t) if n in where else t for n, t in base.items()}


def _random_like(mask: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """A random selection with the same number of entries as `mask` in every tensor."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, m in mask.items():
        r = torch.zeros(m.numel(), dtype=torch.bool)
        r[torch.randperm(m.numel(), generator=g)[: int(m.sum())]] = True
        out[n] = r.view_as(m)
    return out


def _share(delta: dict[str, torch.Tensor], mask: dict[str, torch.Tensor]) -> float:
    """Fraction of the squared drift ||Δ||² that falls inside the mask."""
    inside = sum(float(delta[n][m].double().pow(2).sum()) for n, m in mask.items())
    total = sum(float(d.double().pow(2).sum()) for d in delta.values())
    return inside / total if total else 0.0


def one_seed(family: str, seed: int, out: str, nproc: int, max_test: int) -> dict[str, float]:
    config, ds, extra = FAMILIES[family]
    extra = [*extra, "checkpoint.keep=3"]
    if family == "real":
        extra.append(f"data.path={DATA}")
    runs = {}
    for method in ("seq", "agcl", "replay"):
        run_one(config, ds, seed, method, extra, out, nproc)
        runs[method] = os.path.join(out, f"seed{seed}", method, method)
    c1 = _after_task(runs["agcl"], 1)
    pos = checkpoint.read_position(c1)
    cfg = from_dict(ExperimentConfig, pos.config, "config")
    cfg.data.max_test = max_test
    tasks = load_tasks(cfg)[:2]
    rbar = flatstate.consolidate(os.path.join(c1, store.SUBDIR), store.STATE, torch.bfloat16)["rbar"]
    mask = {n: t > 0 for n, t in rbar.items()}
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        m1, model = _weights(_after_task(runs["seq"], 1), tmp)
        m1_agcl, _ = _weights(c1, tmp)
        m2, _ = _weights(_after_task(runs["seq"], 2), tmp)
        m2g, _ = _weights(_after_task(runs["agcl"], 2), tmp)
        m2r, _ = _weights(_after_task(runs["replay"], 2), tmp)
    same_m1 = max(float((m1[n] - m1_agcl[n]).abs().max()) for n in m1)
    variants = {"M1": m1, "M2": m2, "M2g": m2g, "M2r": m2r, "keep-mask": _blend(m2, m1, mask),
                "keep-random": _blend(m2, m1, _random_like(mask, seed)), "drift-mask": _blend(m1, m2, mask)}
    ev = Evaluator(types.SimpleNamespace(module=model), build_tokenizer(cfg.model), cfg.data.max_seq_len,
                   cfg.evaluation.batch_size, cfg.evaluation.mode)
    params = dict(model.named_parameters())
    row: dict[str, float] = {}
    for name, weights in variants.items():
        with torch.no_grad():
            for n, t in weights.items():
                params[n].copy_(t)
        row[f"{name} task1"], row[f"{name} task2"] = ev.evaluate_all(tasks)
    n_mask = sum(int(m.sum()) for m in mask.values())
    row["mask density"] = n_mask / sum(m.numel() for m in mask.values())
    row["seq drift in mask"] = _share({n: m2[n] - m1[n] for n in mask}, mask)
    row["|drift| agcl/seq"] = (sum(float((m2g[n] - m1[n]).double().pow(2).sum()) for n in mask)
                               / sum(float((m2[n] - m1[n]).double().pow(2).sum()) for n in mask)) ** 0.5
    row["M1 seq vs agcl max|diff|"] = same_m1
    print(f"{family} seed {seed} ({tasks[0].name} -> {tasks[1].name}): "
          + "  ".join(f"{k} {v:.3g}" for k, v in row.items()), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "transplant"))
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--max-test", type=int, default=200, help="test examples per task for the offline scoring")
    args = ap.parse_args()
    for family in args.families:
        rows = [one_seed(family, s, os.path.join(args.out, family), args.nproc, args.max_test) for s in args.seeds]
        print(f"\n{family}, {len(rows)} seeds, mean ± std; task1 = accuracy on the first task, task2 on the second\n")
        print("| model | task1 | task2 |\n|---|---|---|")
        for name in MODELS:
            print(f"| {name} | {fmt([r[f'{name} task1'] for r in rows])} | {fmt([r[f'{name} task2'] for r in rows])} |")
        for key in ("mask density", "seq drift in mask", "|drift| agcl/seq", "M1 seq vs agcl max|diff|"):
            print(f"{key}: {fmt([r[key] for r in rows])}  (per seed: "
                  f"{', '.join(f'{r[key]:.3g}' for r in rows)})")
        recovered = [(r["keep-mask task1"] - r["M2 task1"]) / max(r["M1 task1"] - r["M2 task1"], 1e-9) for r in rows]
        print(f"{family}: keep-mask recovers {fmt(recovered)} of the task-1 accuracy seq lost "
              f"(per seed {', '.join(f'{x:.2f}' for x in recovered)}); mean M2 task1 "
              f"{statistics.mean(r['M2 task1'] for r in rows):.3f}")


if __name__ == "__main__":
    main()
