"""Flat state on disk: per-rank tensors in the rank's flat layout, saved beside the DeepSpeed checkpoint.

Why one module: the importance store (R̄, per-task maps) and the quadratic-anchor methods (Ω, θ*) both
keep per-element state as flat tensors aligned with this rank's optimizer partition
(`agcl_ds.importance.partition`), so the gate and the penalty use it without a copy, and a save needs no
gather. Both need the same things on disk: one file per rank, a record of how the elements were split,
integrity checks, and loading under another world size or ZeRO stage. This is that one format and reader.

In `folder`: `rank{r}.safetensors` per rank (flat tensors, in the dtype they were saved in) and rank 0's
`meta.json`: format tag, model fingerprint, world size, ZeRO stage, tensor names, full shapes, every rank's
shard specs `{name: [start, numel, flat_offset]}`, the sha256 of every rank file, and the caller's own keys
at the top level. Every file is written atomically, `meta.json` last, so a save that died half-way is
caught by a missing `meta.json` or by the checksums. Loading under the saved layout reads this rank's file;
under another, this rank's flat buffers are filled from the overlapping slices of every saved rank file
(ranks whose specs repeat a lower rank's, as under ZeRO-0, are skipped); full tensors are never built.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from agcl_ds import distributed as D
from agcl_ds.fileio import sha256_file, write_atomic, write_json
from agcl_ds.importance.partition import ShardSpec

RESERVED = ("format", "fingerprint", "world_size", "zero_stage", "tensors", "shapes", "rank_specs", "files")


@dataclass(frozen=True)
class Format:
    """What a flat-state folder holds: the tag its meta.json carries and the words errors use for it."""

    tag: str
    what: str


def fingerprint(specs: dict[str, ShardSpec]) -> str:
    """Hash of the trained parameters' names and full shapes (independent of the sharding)."""
    text = "\n".join(f"{n}:{list(s.full_shape)}" for n, s in sorted(specs.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def _rank_specs(specs: dict[str, ShardSpec]) -> dict[str, list[int]]:
    return {n: [s.start, s.numel, s.flat_offset] for n, s in specs.items()}


def save(folder: str | os.PathLike, fmt: Format, specs: dict[str, ShardSpec], zero_stage: int | None,
         tensors: dict[str, torch.Tensor], info: dict) -> None:
    """Collective: every rank writes its flat `tensors`, then rank 0 writes meta.json with `info`'s keys."""
    clash = sorted(set(info) & set(RESERVED))
    if clash:
        raise ValueError(f"flat state info key {clash[0]!r} is reserved for the format")
    folder, r = Path(folder), D.rank()
    fname = f"rank{r}.safetensors"
    data = st_save({k: v.detach().cpu() for k, v in tensors.items()}, metadata={"format": fmt.tag, "rank": str(r)})
    write_atomic(folder / fname, data)
    everyone = D.all_gather_object({"file": fname, "sha256": hashlib.sha256(data).hexdigest(),
                                    "specs": _rank_specs(specs)})
    if r == 0:
        meta = {**info, "format": fmt.tag, "fingerprint": fingerprint(specs), "world_size": len(everyone),
                "zero_stage": zero_stage, "tensors": sorted(tensors),
                "shapes": {n: list(s.full_shape) for n, s in specs.items()},
                "rank_specs": [e["specs"] for e in everyone], "files": {e["file"]: e["sha256"] for e in everyone}}
        write_json(folder / "meta.json", meta, indent=1, sort_keys=True)
    D.barrier()


def read_meta(folder: str | os.PathLike, fmt: Format) -> dict:
    """The saved meta.json (format checked): layout, shapes, checksums and the caller's keys."""
    path = Path(folder) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"no {fmt.what} at {path.parent} (no meta.json)")
    meta = json.loads(path.read_text())
    if meta.get("format") != fmt.tag:
        raise ValueError(f"{path}: expected format {fmt.tag!r}, got {meta.get('format')!r}")
    return meta


def load(folder: str | os.PathLike, fmt: Format, specs: dict[str, ShardSpec], numel: int, dtype: torch.dtype,
         device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """This rank's flat tensors for `specs` (`numel` elements of `dtype` each, zero where no shard lies)
    and the caller's keys of meta.json; re-partitioned when the saved layout differs."""
    folder = Path(folder)
    meta = read_meta(folder, fmt)
    if meta["fingerprint"] != fingerprint(specs):
        raise ValueError(f"{fmt.what} in {folder} was saved for a different model (parameter "
                         "names/shapes fingerprint differs)")
    saved, r = meta["rank_specs"], D.rank()
    same = meta["world_size"] == D.world_size() and saved[r] == _rank_specs(specs)
    sources = _verified(folder, meta, [r] if same else _distinct(saved))
    flats = {k: torch.zeros(numel, dtype=dtype) for k in _keys(sources[0][1])}
    for src, path in sources:
        with safe_open(str(path), framework="pt") as f:
            for key, flat in flats.items():
                _copy(f, key, saved[src], {n: (s.start, flat.narrow(0, s.flat_offset, s.numel))
                                           for n, s in specs.items()})
    return {k: v.to(device) for k, v in flats.items()}, {k: v for k, v in meta.items() if k not in RESERVED}


def consolidate(folder: str | os.PathLike, fmt: Format, dtype: torch.dtype) -> dict[str, dict[str, torch.Tensor]]:
    """{tensor name: {parameter name: full tensor}} from every rank's file, for offline analysis (one process)."""
    folder = Path(folder)
    meta = read_meta(folder, fmt)
    shapes = {n: tuple(s) for n, s in meta["shapes"].items()}
    sources = _verified(folder, meta, _distinct(meta["rank_specs"]))
    full = {k: {n: torch.zeros(shape, dtype=dtype) for n, shape in shapes.items()} for k in _keys(sources[0][1])}
    for src, path in sources:
        with safe_open(str(path), framework="pt") as f:
            for key, params in full.items():
                _copy(f, key, meta["rank_specs"][src], {n: (0, t.view(-1)) for n, t in params.items()})
    return full


def _distinct(rank_specs: list[dict]) -> list[int]:
    """Saved ranks whose shards no lower rank already holds (under ZeRO-0 every rank holds everything)."""
    return [r for r, s in enumerate(rank_specs) if s not in rank_specs[:r]]


def _verified(folder: Path, meta: dict, ranks: list[int]) -> list[tuple[int, Path]]:
    """(rank, path) of each rank file, once its sha256 matches meta.json."""
    out = []
    for r in ranks:
        path = folder / f"rank{r}.safetensors"
        if sha256_file(path) != meta["files"].get(path.name):
            raise ValueError(f"checksum mismatch for {path}: the file is corrupt or from another save")
        out.append((r, path))
    return out


def _keys(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def _copy(f, key: str, saved: dict[str, list[int]], dest: dict[str, tuple[int, torch.Tensor]]) -> None:
    """Copy the part of saved flat tensor `key` (shards `saved`) that falls into each destination, given
    as {parameter name: (its first flat element within the parameter, 1-D tensor of the following ones)}."""
    part = f.get_slice(key)
    for name, (first, view) in dest.items():
        start, numel, offset = saved[name]
        a, b = max(first, start), min(first + view.numel(), start + numel)
        if a < b:
            view[a - first:b - first] = part[offset + a - start:offset + b - start]
