"""Importance store: per-task importance shards and their running element-wise max R̄, per rank.

Memory: R̄ costs 2 bytes per parameter in total (bf16, each rank holds only its own shards, in the flat
layout of `agcl_ds.importance.partition`, so a `Gate` can use the buffer without a copy); every per-task map
kept with `keep_tasks=True` adds another 2 bytes per parameter.

On disk (`<dir>/importance/`): `rank{r}.safetensors` per rank (tensors `rbar` and `task.{i}`, flat) and
`meta.json` (task names, model fingerprint, world size, ZeRO stage, caller metadata such as LRP rules /
aggregation / K, every rank's shard specs, sha256 of every rank file). Each file is written to a temporary
name and moved into place with `os.replace`; `meta.json` goes last, so a save that dies half-way is caught
by the checksums on load. Loading under a different layout (another world size or ZeRO stage)
re-partitions: consolidate to full tensors, then cut this rank's shards with `shard_of`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from agcl_ds.distributed import barrier, rank, world_size
from agcl_ds.importance.partition import ShardSpec, flat_layout, flat_numel, shard_of

FORMAT = "agcl_ds.importance/1"
SUBDIR = "importance"


def fingerprint(specs: dict[str, ShardSpec]) -> str:
    """Hash of the trained parameters' names and full shapes (independent of the sharding)."""
    text = "\n".join(f"{n}:{list(s.full_shape)}" for n, s in sorted(specs.items()))
    return hashlib.sha256(text.encode()).hexdigest()


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

    def task(self, name: str) -> dict[str, torch.Tensor]:
        """A kept task's importance shards."""
        if name not in self.tasks or not self.keep_tasks:
            kept = self.tasks if self.keep_tasks else []
            raise KeyError(f"no kept importance for task {name!r}; kept: {kept}")
        return self._views(self._task_flats[self.tasks.index(name)])

    @torch.no_grad()
    def add_task(self, name: str, local_importance: dict[str, torch.Tensor]) -> None:
        """Record task `name`'s importance (local shards in [0, 1]) and fold it into R̄ by element-wise max."""
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
            torch.maximum(view, src, out=view)
            if flat is not None:
                flat.narrow(0, spec.flat_offset, spec.numel).copy_(src)
        self.tasks.append(name)
        if flat is not None:
            self._task_flats.append(flat)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> None:
        """Collective: every rank writes its file, rank 0 writes meta.json last."""
        out = Path(directory) / SUBDIR
        out.mkdir(parents=True, exist_ok=True)
        r, world = rank(), world_size()
        tensors = {"rbar": self._rbar.cpu()}
        tensors.update({f"task.{i}": f.cpu() for i, f in enumerate(self._task_flats)})
        data = st_save(tensors, metadata={"format": FORMAT, "rank": str(r)})
        fname = f"rank{r}.safetensors"
        _write_atomic(out / fname, data)
        mine = {"file": fname, "sha256": hashlib.sha256(data).hexdigest(),
                "specs": {n: [s.start, s.numel, s.flat_offset] for n, s in self.specs.items()}}
        everyone = _all_gather_object(mine, world)
        if r == 0:
            meta = {
                "format": FORMAT, "tasks": self.tasks, "keep_tasks": self.keep_tasks,
                "fingerprint": fingerprint(self.specs), "world_size": world, "zero_stage": self.zero_stage,
                "meta": self.meta, "shapes": {n: list(s.full_shape) for n, s in self.specs.items()},
                "files": {e["file"]: e["sha256"] for e in everyone},
                "rank_specs": [e["specs"] for e in everyone],
            }
            _write_atomic(out / "meta.json", json.dumps(meta, indent=1, sort_keys=True).encode())
        barrier()

    @classmethod
    def load(cls, directory: str | os.PathLike, specs: dict[str, ShardSpec],
             device: torch.device | str = "cpu", zero_stage: int | None = None) -> ImportanceStore:
        """This rank's store for `specs`, re-partitioned when the saved layout differs."""
        meta = read_meta(directory)
        if meta["fingerprint"] != fingerprint(specs):
            raise ValueError(f"importance in {directory} was saved for a different model (parameter "
                             "names/shapes fingerprint differs)")
        store = cls(specs, meta["keep_tasks"], meta["meta"], zero_stage, device)
        r = rank()
        mine = {n: [s.start, s.numel, s.flat_offset] for n, s in specs.items()}
        if meta["world_size"] == world_size() and meta["rank_specs"][r] == mine:
            tensors = _read_rank(directory, meta, r)
            flats = [tensors["rbar"]] + [tensors[f"task.{i}"] for i in range(len(_kept(meta)))]
        else:
            full = _consolidate_tensors(directory, meta)
            flats = [_shard_flat(full[key], specs, store._numel) for key in ["rbar", *_kept(meta)]]
        store._rbar = flats[0].to(device)
        store._task_flats = [f.to(device) for f in flats[1:]]
        store.tasks = list(meta["tasks"])
        return store


def read_meta(directory: str | os.PathLike) -> dict:
    path = Path(directory) / SUBDIR / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"no importance store at {path} (no meta.json from ImportanceStore.save)")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: expected format {FORMAT!r}, got {meta.get('format')!r}")
    return meta


def _kept(meta: dict) -> list[str]:
    return [f"task.{i}" for i in range(len(meta["tasks"]))] if meta["keep_tasks"] else []


def _read_rank(directory: str | os.PathLike, meta: dict, r: int) -> dict[str, torch.Tensor]:
    fname = f"rank{r}.safetensors"
    path = Path(directory) / SUBDIR / fname
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != meta["files"].get(fname):
        raise ValueError(f"checksum mismatch for {path}: the file is corrupt or from another save")
    return st_load(data)


def _consolidate_tensors(directory: str | os.PathLike, meta: dict) -> dict[str, dict[str, torch.Tensor]]:
    """{'rbar' | 'task.{i}': {param name: full tensor}} from every rank's file."""
    shapes = {n: tuple(s) for n, s in meta["shapes"].items()}
    keys = ["rbar", *_kept(meta)]
    full = {k: {n: torch.zeros(shape, dtype=torch.bfloat16) for n, shape in shapes.items()} for k in keys}
    for r, rank_specs in enumerate(meta["rank_specs"]):
        tensors = _read_rank(directory, meta, r)
        for k in keys:
            for n, (start, numel, off) in rank_specs.items():
                full[k][n].view(-1).narrow(0, start, numel).copy_(tensors[k].narrow(0, off, numel))
    return full


def _shard_flat(full: dict[str, torch.Tensor], specs: dict[str, ShardSpec], numel: int) -> torch.Tensor:
    flat = torch.zeros(numel, dtype=torch.bfloat16)
    for n, spec in specs.items():
        flat.narrow(0, spec.flat_offset, spec.numel).copy_(shard_of(full[n], spec))
    return flat


def consolidate(directory: str | os.PathLike,
                out: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """Offline (one process): full R̄ per parameter from a sharded save, also written as one safetensors file.

    The file (default `<dir>/importance/consolidated.safetensors`) holds R̄ under each parameter name and,
    when tasks were kept, task i's map under `task.{i}/<name>`; task names are in its metadata.
    """
    meta = read_meta(directory)
    full = _consolidate_tensors(directory, meta)
    tensors = dict(full["rbar"])
    for i in range(len(_kept(meta))):
        tensors.update({f"task.{i}/{n}": t for n, t in full[f"task.{i}"].items()})
    path = Path(out) if out is not None else Path(directory) / SUBDIR / "consolidated.safetensors"
    _write_atomic(path, st_save(tensors, metadata={"format": FORMAT, "tasks": json.dumps(meta["tasks"])}))
    return full["rbar"]


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _all_gather_object(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out
