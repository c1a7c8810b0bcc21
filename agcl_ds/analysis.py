"""How much the important parameters of different tasks overlap, per layer (the paper's Figure 1).

For every parameter tensor and task, the *top set* is the tensor's top `top_frac` of elements by importance:
x ≥ the ⌈top_frac·N⌉-th largest value (ties at the threshold all kept) and x above the tensor's minimum.
It is taken per tensor, as `importance.aggregate.normalize` builds the gate's masks, so a tensor with large
raw relevance (lm_head) cannot crowd out the rest of its layer. Counts are then summed per group (a layer,
the embeddings, the final norm, lm_head, and the whole model), and every task pair gets

    Jaccard  |A ∩ B| / |A ∪ B|        overlap coefficient  |A ∩ B| / min(|A|, |B|)

next to what two independent random sets of the same sizes would give (chance). Stores saved with the
default binary top-20% masks have ties: asking for a smaller fraction returns the whole 20% mask, which
the table shows as the actual set fraction.

Input: store folders written by `ImportanceStore.save` (with keep_tasks=True, or holding one task), or
consolidated files (`importance.store.consolidate`), one process, any saved world size.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from agcl_ds.importance.partition import full_specs
from agcl_ds.importance.store import SUBDIR, ImportanceStore, read_meta
from agcl_ds.models import BLOCK_NAME
from agcl_ds.report import save_figure

Maps = dict[str, dict[str, torch.Tensor]]  # task -> parameter name -> full importance tensor
METRICS = ("jaccard", "overlap")


@dataclass(frozen=True)
class OverlapRow:
    """Top-set counts of one parameter group for one task pair."""

    group: str
    task_a: str
    task_b: str
    numel: int
    size_a: int
    size_b: int
    inter: int

    @property
    def union(self) -> int:
        return self.size_a + self.size_b - self.inter

    @property
    def jaccard(self) -> float:
        return self.inter / self.union if self.union else 0.0

    @property
    def overlap(self) -> float:
        small = min(self.size_a, self.size_b)
        return self.inter / small if small else 0.0

    def chance(self, metric: str) -> float:
        """The metric's expected value for independent random sets of sizes size_a and size_b."""
        if not self.numel:
            return 0.0
        fa, fb = self.size_a / self.numel, self.size_b / self.numel
        if metric == "overlap":
            return max(fa, fb)
        both = fa + fb - fa * fb
        return fa * fb / both if both else 0.0

    def value(self, metric: str) -> float:
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        return self.jaccard if metric == "jaccard" else self.overlap


def layer_group(name: str) -> str:
    """'layer 3' for model.layers.3.* (transformer.h.3.*, ...); embed / final norm / lm_head / other."""
    m = BLOCK_NAME.search(name)
    if m:
        return f"layer {int(m.group(1))}"
    if "lm_head" in name:
        return "lm_head"
    if re.search(r"embed|(?:^|\.)(?:wte|wpe)\.", name):
        return "embed"
    if re.search(r"(?:^|\.)(?:norm|ln_f|final_layer_norm)\.", name):
        return "final norm"
    return "other"


def module_group(name: str) -> str:
    """The parameter's name without its layer index and model prefix: every layer's q_proj.weight together."""
    m = BLOCK_NAME.search(name)
    return name[m.end():] if m else layer_group(name)


GROUPINGS: dict[str, Callable[[str], str]] = {"layer": layer_group, "module": module_group}


def _group_key(group: str) -> tuple:
    fixed = {"embed": 0, "final norm": 2, "lm_head": 3, "other": 4, "all": 5}
    if group.startswith("layer "):
        return (1, int(group.split()[1]), "")
    return (fixed.get(group, 1), math.inf, group)


def top_set(x: torch.Tensor, top_frac: float) -> torch.Tensor:
    """Bool mask of the top `top_frac` of a tensor (ties kept, the tensor's minimum never included)."""
    if not 0 < top_frac <= 1:
        raise ValueError(f"top_frac must be in (0, 1], got {top_frac}")
    flat = x.detach().reshape(-1).float()
    if flat.numel() == 0:
        return torch.zeros(0, dtype=torch.bool)
    k = math.ceil(top_frac * flat.numel())
    tau = flat.kthvalue(flat.numel() - k + 1).values
    return (flat >= tau) & (flat > flat.min())


def overlap(per_task: Maps, top_frac: float = 0.05,
            group_by: Callable[[str], str] = layer_group) -> list[OverlapRow]:
    """One row per (group, task pair), groups in model order then 'all'; pairs in task order.

    Every task must hold the same parameter names and shapes. Memory: one tensor's masks for all tasks.
    """
    tasks = list(per_task)
    if len(tasks) < 2:
        raise ValueError(f"overlap needs at least two tasks, got {tasks}")
    names = list(per_task[tasks[0]])
    for t in tasks[1:]:
        if set(per_task[t]) != set(names):
            diff = sorted(set(per_task[t]) ^ set(names))
            raise ValueError(f"tasks {tasks[0]!r} and {t!r} cover different parameters, e.g. {diff[0]!r}")
    pairs = list(itertools.combinations(range(len(tasks)), 2))
    counts: dict[str, list[list[int]]] = {}  # group -> per pair [numel, size_a, size_b, inter]
    for name in names:
        shapes = {tuple(per_task[t][name].shape) for t in tasks}
        if len(shapes) > 1:
            raise ValueError(f"{name}: tasks disagree on its shape ({sorted(shapes)})")
        masks = [top_set(per_task[t][name], top_frac) for t in tasks]
        sizes = [int(m.sum()) for m in masks]
        for group in (group_by(name), "all"):
            acc = counts.setdefault(group, [[0, 0, 0, 0] for _ in pairs])
            for c, (i, j) in zip(acc, pairs, strict=True):
                c[0] += masks[i].numel()
                c[1] += sizes[i]
                c[2] += sizes[j]
                c[3] += int((masks[i] & masks[j]).sum())
    return [OverlapRow(g, tasks[i], tasks[j], *c)
            for g in sorted(counts, key=_group_key)
            for c, (i, j) in zip(counts[g], pairs, strict=True)]


def _pairs(rows: list[OverlapRow]) -> list[tuple[str, str]]:
    return list(dict.fromkeys((r.task_a, r.task_b) for r in rows))


def _groups(rows: list[OverlapRow]) -> list[str]:
    return list(dict.fromkeys(r.group for r in rows))


def format_table(rows: list[OverlapRow], metric: str = "jaccard") -> str:
    """Groups down, task pairs across; below, the chance level and the top-set sizes of the whole model."""
    pairs, groups = _pairs(rows), _groups(rows)
    cell = {(r.group, (r.task_a, r.task_b)): r for r in rows}
    heads = [f"{a}|{b}" for a, b in pairs]
    gw = max(10, *(len(g) for g in groups)) + 1
    cw = max(10, *(len(h) for h in heads)) + 2
    what = "|A∩B| / |A∪B|" if metric == "jaccard" else "|A∩B| / min(|A|, |B|)"
    lines = [f"{metric} ({what}) of the tasks' top sets, per group and task pair",
             f"{'group':<{gw}}{'params':>13}" + "".join(f"{h:>{cw}}" for h in heads)]
    for g in groups:
        lines.append(f"{g:<{gw}}{cell[(g, pairs[0])].numel:>13,}"
                     + "".join(f"{cell[(g, p)].value(metric):>{cw}.3f}" for p in pairs))
    alls = [cell[("all", p)] for p in pairs]
    lines.append(f"{'chance':<{gw}}{'':>13}" + "".join(f"{r.chance(metric):>{cw}.3f}" for r in alls))
    sizes = [f"{100 * r.size_a / r.numel:.1f}%/{100 * r.size_b / r.numel:.1f}%" for r in alls]
    lines.append(f"{'top sets':<{gw}}{'':>13}" + "".join(f"{s:>{cw}}" for s in sizes))
    return "\n".join(lines)


def plot(rows: list[OverlapRow], path: str | os.PathLike, metric: str = "jaccard", title: str = "") -> None:
    """PNG heatmap: groups (rows) × task pairs (columns), value in [0, 1]; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs, groups = _pairs(rows), _groups(rows)
    cell = {(r.group, (r.task_a, r.task_b)): r.value(metric) for r in rows}
    values = [[cell[(g, p)] for p in pairs] for g in groups]
    fig, ax = plt.subplots(figsize=(1.1 * len(pairs) + 3.0, 0.32 * len(groups) + 1.8))
    im = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(pairs)), [f"{a} | {b}" for a, b in pairs], rotation=30, ha="right")
    ax.set_yticks(range(len(groups)), groups)
    if len(groups) * len(pairs) <= 400:
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v < 0.6 else "black")
    ax.set_title(title or f"{metric} of top sets")
    fig.colorbar(im, ax=ax, fraction=0.046, label=metric)
    save_figure(fig, str(path))


# ---------------------------------------------------------------------------- loading
def _from_store(directory: Path) -> Maps:
    meta = read_meta(directory)
    shapes = {n: tuple(s) for n, s in meta["shapes"].items()}
    if not meta["keep_tasks"] and len(meta["tasks"]) != 1:
        raise ValueError(f"{directory}: saved without keep_tasks, so it holds only R̄ (the max over "
                         f"{len(meta['tasks'])} tasks); save with keep_tasks=True or pass one store per task")
    store = ImportanceStore.load(directory, full_specs(shapes))  # re-partitions any saved layout into one
    if not meta["keep_tasks"]:
        return {meta["tasks"][0]: {n: t.view(shapes[n]) for n, t in store.rbar.items()}}
    return {task: {n: t.view(shapes[n]) for n, t in store.task(task).items()} for task in store.tasks}


def _from_consolidated(path: Path) -> Maps:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        tasks = json.loads((f.metadata() or {}).get("tasks", "null") or "null")
        if not isinstance(tasks, list):
            raise ValueError(f"{path}: not a consolidated importance file (no task list in its metadata)")
        keys = list(f.keys())
        if any(k.startswith("task.") for k in keys):
            return {t: {k.split("/", 1)[1]: f.get_tensor(k) for k in keys if k.startswith(f"task.{i}/")}
                    for i, t in enumerate(tasks)}
        if len(tasks) != 1:
            raise ValueError(f"{path}: holds only R̄ (the max over {len(tasks)} tasks), no per-task maps")
        return {tasks[0]: {k: f.get_tensor(k) for k in keys}}


def load_task_maps(paths: list[str | os.PathLike]) -> Maps:
    """Full per-task importance from store folders and/or consolidated files, in the order given.

    A task name found in more than one input is labelled `<input name>:<task>` everywhere it occurs.
    """
    loaded: list[tuple[str, Maps]] = []
    for p in map(Path, paths):
        if p.is_file():
            loaded.append((p.stem, _from_consolidated(p)))
        else:
            folder = p.parent if p.name == SUBDIR and (p / "meta.json").is_file() else p
            loaded.append((folder.name, _from_store(folder)))
    seen = [t for _, maps in loaded for t in maps]
    clash = {t for t in seen if seen.count(t) > 1}
    out: Maps = {}
    for label, maps in loaded:
        for task, tensors in maps.items():
            key = f"{label}:{task}" if task in clash else task
            if key in out:
                raise ValueError(f"task {task!r} occurs twice under the same input name {label!r}")
            out[key] = tensors
    return out


# ---------------------------------------------------------------------------- command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("stores", nargs="+", help="importance store folder(s) (ImportanceStore.save, keep_tasks=True) "
                                             "or consolidated .safetensors file(s)")
    p.add_argument("--top", type=float, default=0.05, help="top fraction of each tensor (default 0.05)")
    p.add_argument("--metric", choices=METRICS, default="jaccard")
    p.add_argument("--by", choices=list(GROUPINGS), default="layer",
                   help="layer: per layer index; module: per parameter name across layers")
    p.add_argument("--png", default=None, help="also write a heatmap to this PNG")


def cmd_overlap(args: argparse.Namespace) -> None:
    """`agcl overlap`: print the table (and write the PNG); bad input is a ValueError/FileNotFoundError."""
    per_task = load_task_maps(args.stores)
    rows = overlap(per_task, args.top, GROUPINGS[args.by])
    print(format_table(rows, args.metric))
    if args.png:
        plot(rows, args.png, args.metric, title=f"{args.metric} of the top {100 * args.top:g}% per tensor")
        print(f"wrote {args.png}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="agcl overlap", description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        cmd_overlap(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"agcl: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
