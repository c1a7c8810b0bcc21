"""Importance store: per-task importance shards and their running element-wise max R̄, per rank.

Memory: R̄ costs 2 bytes per parameter in total (bf16, each rank holds only its own shards, in the flat
layout of `agcl_ds.importance.partition`, so a `Gate` can use the buffer without a copy); every per-task map
kept with `keep_tasks=True` adds another 2 bytes per parameter.

On disk (`<dir>/importance/`, the format of `agcl_ds.importance.flatstate`): `rank{r}.safetensors` per rank
(flat bf16 tensors `rbar` and `task.{i}`) and `meta.json` (the layout, shapes, fingerprint and checksums, plus
task names, `keep_tasks` and caller metadata such as LRP rules / aggregation / K under `meta`). Loading under
a different layout (another world size or ZeRO stage) re-partitions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from agcl_ds.fileio import write_atomic
from agcl_ds.importance import flatstate
from agcl_ds.importance.partition import ShardSpec, flat_layout, flat_numel

FORMAT = "agcl_ds.importance/1"
SUBDIR = "importance"
STATE = flatstate.Format(FORMAT, "importance store")


class ImportanceStore:
    """This rank's importance: R̄ and, optionally, every task's map, as shards per `specs`."""

    def __init__(self, specs: dict[str, ShardSpec], keep_tasks: bool = False, meta: dict | None = None,
                 zero_stage: int | None = None, device: torch.device | str = "cpu"):
        self.specs = dict(specs)
        self.keep_tasks = keep_tasks
        self.meta = dict(meta or {})
        self.zero_stage = zero_stage
        self.tasks: list[str] = []
        self._numel = flat_numel(self.specs)
        self._rbar = torch.zeros(self._numel, dtype=torch.bfloat16, device=device)
        self._task_flats: list[torch.Tensor] = []

    @classmethod
    def for_engine(cls, engine, keep_tasks: bool = False, meta: dict | None = None) -> ImportanceStore:
        """A store laid out like `engine`'s optimizer partition, on its device (so a Gate can share R̄)."""
        layout = flat_layout(engine)
        return cls(layout.specs, keep_tasks, meta, layout.stage, layout.device)

    def _views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: flat.narrow(0, s.flat_offset, s.numel) for n, s in self.specs.items()}

    @property
    def rbar(self) -> dict[str, torch.Tensor]:
        """R̄ as local shards (bf16 views into one flat buffer); all zeros before the first task."""
        return self._views(self._rbar)

    @property
    def rbar_flat(self) -> torch.Tensor:
        """R̄ as this rank's one flat bf16 buffer, in the optimizer partition's flat layout."""
        return self._rbar

    def task(self, name: str) -> dict[str, torch.Tensor]:
        """A kept task's importance shards."""
        if name not in self.tasks or not self.keep_tasks:
            kept = self.tasks if self.keep_tasks else []
            raise KeyError(f"no kept importance for task {name!r}; kept: {kept}")
        return self._views(self._task_flats[self.tasks.index(name)])

    @torch.no_grad()
    def add_task(self, name: str, local_importance: dict[str, torch.Tensor], combine: str = "max",
                 decay: float = 1.0) -> None:
        """Record task `name`'s importance (local shards in [0, 1]) and fold it into R̄: element-wise max (the
        paper), `sum` (clamped to 1: an element several tasks need is held harder under a soft map) or `decay`
        (R̄ ← max(decay·R̄, R_τ): older tasks' protection fades, leaving room for plasticity)."""
        if combine not in ("max", "sum", "decay"):
            raise ValueError(f"combine must be 'max', 'sum' or 'decay', got {combine!r}")
        if name in self.tasks:
            raise ValueError(f"task {name!r} is already in the store")
        extra = sorted(set(local_importance) - set(self.specs))
        missing = sorted(set(self.specs) - set(local_importance))
        if extra or missing:
            what = f"unknown name {extra[0]!r}" if extra else f"missing {missing[0]!r}"
            raise ValueError(f"add_task({name!r}): expected one local shard per spec, {what}")
        flat = torch.zeros_like(self._rbar) if self.keep_tasks else None
        for n, t in local_importance.items():
            spec = self.specs[n]
            if t.numel() != spec.numel:
                raise ValueError(f"add_task({name!r}): {n} has {t.numel()} elements, its shard has "
                                 f"{spec.numel}")
            if t.numel() and not (bool(t.min() >= 0) and bool(t.max() <= 1)):
                raise ValueError(f"add_task({name!r}): {n} must hold normalised importance in [0, 1]")
        for n, t in local_importance.items():
            spec = self.specs[n]
            src = t.detach().reshape(-1).to(device=self._rbar.device, dtype=torch.bfloat16)
            view = self._rbar.narrow(0, spec.flat_offset, spec.numel)
            if combine == "sum":
                view.add_(src).clamp_(max=1)
            else:
                if combine == "decay":
                    view.mul_(decay)
                torch.maximum(view, src, out=view)
            if flat is not None:
                flat.narrow(0, spec.flat_offset, spec.numel).copy_(src)
        self.tasks.append(name)
        if flat is not None:
            self._task_flats.append(flat)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> None:
        """Collective: `<directory>/importance/`, in this rank's flat layout (`flatstate.save`)."""
        tensors = {"rbar": self._rbar, **{f"task.{i}": f for i, f in enumerate(self._task_flats)}}
        info = {"tasks": self.tasks, "keep_tasks": self.keep_tasks, "meta": self.meta}
        flatstate.save(Path(directory) / SUBDIR, STATE, self.specs, self.zero_stage, tensors, info)

    @classmethod
    def load(cls, directory: str | os.PathLike, specs: dict[str, ShardSpec],
             device: torch.device | str = "cpu", zero_stage: int | None = None) -> ImportanceStore:
        """This rank's store for `specs`, re-partitioned when the saved layout differs."""
        numel = flat_numel(specs)
        tensors, info = flatstate.load(Path(directory) / SUBDIR, STATE, specs, numel, torch.bfloat16, device)
        store = cls(specs, info["keep_tasks"], info["meta"], zero_stage, device)
        store._rbar = tensors["rbar"]
        store._task_flats = [tensors[k] for k in _kept(info)]
        store.tasks = list(info["tasks"])
        return store


def read_meta(directory: str | os.PathLike) -> dict:
    """The store's meta.json: tasks, keep_tasks, caller meta, shapes, world size, ZeRO stage, layout, checksums."""
    return flatstate.read_meta(Path(directory) / SUBDIR, STATE)


def _kept(meta: dict) -> list[str]:
    return [f"task.{i}" for i in range(len(meta["tasks"]))] if meta["keep_tasks"] else []


def consolidate(directory: str | os.PathLike,
                out: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """Offline (one process): full R̄ per parameter from a sharded save, also written as one safetensors file.

    The file (default `<dir>/importance/consolidated.safetensors`) holds R̄ under each parameter name and,
    when tasks were kept, task i's map under `task.{i}/<name>`; task names are in its metadata.
    """
    meta = read_meta(directory)
    full = flatstate.consolidate(Path(directory) / SUBDIR, STATE, torch.bfloat16)
    tensors = dict(full["rbar"])
    for i in range(len(_kept(meta))):
        tensors.update({f"task.{i}/{n}": t for n, t in full[f"task.{i}"].items()})
    path = Path(out) if out is not None else Path(directory) / SUBDIR / "consolidated.safetensors"
    write_atomic(path, st_save(tensors, metadata={"format": FORMAT, "tasks": json.dumps(meta["tasks"])}))
    return full["rbar"]
