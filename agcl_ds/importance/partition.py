"""Where each parameter element lives on this rank: the only module that knows DeepSpeed's ZeRO layout.

Everything else (importance store, gate, attribution) works on *local shards*: this rank's slice of the
flattened full parameter, described by a `ShardSpec`. A shard also has a place in the rank's *flat
layout*, the concatenation of the fp32 master tensors the inner torch optimizer steps (padding included):

- ZeRO-3: the sub-group flats `optimizer.fp32_partitioned_groups_flat[i]`, params in `fp16_groups` order,
  `p.partition_numel()` elements each (the layout of `grad_partitions_flat_buffer` as well). A shard is
  aligned with `p.ds_tensor`; the last rank's padding is excluded from `numel`.
- ZeRO-1/2: the group partitions `optimizer.single_partition_of_fp32_groups[i]`; a param contributes its
  fragment (`p._hp_mapping`), which may be empty on a rank (numel 0).
- ZeRO-0: the whole param, one segment per master tensor (the param itself in fp32, the fp32 copy kept by
  DeepSpeed's unfused fp16/bf16 wrapper otherwise).

Keeping the importance in this flat layout lets the gate scale a whole partition with a few fused ops and
lets the store save one tensor per rank. The data-parallel group is assumed to be the whole world (no
tensor/pipeline parallelism).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

_GATHER_BUCKET = 1 << 24  # elements per all-reduce in gather_full


@dataclass(frozen=True)
class ShardSpec:
    """This rank holds flat elements [start, start+numel) of the flattened full parameter `name`.

    `flat_offset` is where those elements sit in this rank's flat layout (see module docstring).
    """

    name: str
    full_shape: tuple[int, ...]
    start: int
    numel: int
    flat_offset: int = 0

    @property
    def full_numel(self) -> int:
        return math.prod(self.full_shape)


@dataclass(frozen=True)
class FlatLayout:
    """A rank's flat layout: shard specs, total flat size, and each master tensor's flat offset."""

    stage: int
    specs: dict[str, ShardSpec]
    numel: int
    masters: tuple[torch.Tensor, ...]
    master_offsets: tuple[int, ...]

    @property
    def device(self) -> torch.device:
        return self.masters[0].device if self.masters else torch.device("cpu")


def zero_stage(engine) -> int:
    return int(engine.zero_optimization_stage())


def _names(engine) -> dict[int, str]:
    return {id(p): n for n, p in engine.module.named_parameters()}


def _unsupported(engine) -> str:
    return (f"unsupported DeepSpeed optimizer {type(engine.optimizer).__name__} (ZeRO stage "
            f"{zero_stage(engine)}); expected the ZeRO-1/2/3 optimizer, a plain torch optimizer or the "
            "unfused fp16/bf16 wrapper (ZeRO-1 + bf16 + fp32 grad_accum_dtype selects BF16_Optimizer: use "
            "ZeRO-2 or drop grad_accum_dtype)")


def flat_layout(engine) -> FlatLayout:
    """Describe this rank's flat layout for a DeepSpeed engine (ZeRO 0/1/2/3)."""
    opt = engine.optimizer
    if opt is None:
        raise ValueError("engine has no optimizer; expected deepspeed.initialize(...) with an optimizer")
    names = _names(engine)
    stage = zero_stage(engine)
    specs: dict[str, ShardSpec] = {}

    def name_of(p) -> str:
        if id(p) not in names:
            raise ValueError("optimizer holds a parameter that is not in engine.module.named_parameters()")
        return names[id(p)]

    if stage == 3:
        rank = dist.get_rank(group=opt.dp_process_group)
        masters, offsets, off = [], [], 0
        for group, master in zip(opt.fp16_groups, opt.fp32_partitioned_groups_flat, strict=True):
            masters.append(master)
            offsets.append(off)
            for p in group:
                part = p.partition_numel()
                start = rank * part
                numel = max(0, min(part, p.ds_numel - start))
                specs[name_of(p)] = ShardSpec(name_of(p), tuple(p.ds_shape), start, numel, off)
                off += part
            if off - offsets[-1] != master.numel():
                raise RuntimeError("ZeRO-3 sub-group size does not match its params' partition_numel sum; "
                                   "DeepSpeed's layout changed, agcl_ds.importance.partition needs an update")
        return FlatLayout(stage, specs, off, tuple(masters), tuple(offsets))

    if stage in (1, 2):
        if not hasattr(opt, "single_partition_of_fp32_groups"):
            raise ValueError(_unsupported(engine))
        masters = list(opt.single_partition_of_fp32_groups)
        offsets, off = [], 0
        for master in masters:
            offsets.append(off)
            off += master.numel()
        for i, group in enumerate(opt.bit16_groups):
            for p in group:
                hp = getattr(p, "_hp_mapping", None)
                if hp is None:
                    specs[name_of(p)] = ShardSpec(name_of(p), tuple(p.shape), 0, 0, offsets[i])
                else:
                    specs[name_of(p)] = ShardSpec(name_of(p), tuple(p.shape), hp.lp_fragment_address.start,
                                                  hp.lp_fragment_address.numel,
                                                  offsets[i] + hp.hp_fragment_address.start)
        return FlatLayout(stage, specs, off, tuple(masters), tuple(offsets))

    pairs = _zero0_pairs(engine)
    masters, offsets, off = [], [], 0
    for p, master in pairs:
        specs[name_of(p)] = ShardSpec(name_of(p), tuple(p.shape), 0, p.numel(), off)
        masters.append(master)
        offsets.append(off)
        off += p.numel()
    return FlatLayout(stage, specs, off, tuple(masters), tuple(offsets))


def _zero0_pairs(engine) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(model param, master tensor the inner optimizer steps) under ZeRO-0."""
    opt = engine.optimizer
    if isinstance(opt, torch.optim.Optimizer):
        return [(p, p) for g in opt.param_groups for p in g["params"]]
    if hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups") and not hasattr(opt, "fp32_groups_flat"):
        return [(p, m) for lo, hi in zip(opt.fp16_groups, opt.fp32_groups, strict=True)
                for p, m in zip(lo, hi, strict=True)]
    raise ValueError(_unsupported(engine))


def inner_optimizers(engine) -> list[torch.optim.Optimizer]:
    """The torch optimizer(s) whose `step` updates the master tensors (ZeRO-3 offload may add a backup)."""
    opt = engine.optimizer
    if isinstance(opt, torch.optim.Optimizer):
        return [opt]
    out = [opt.optimizer]
    backup = getattr(opt, "backup_optimizer", None)
    if backup is not None and backup is not opt.optimizer:
        out.append(backup)
    return out


def grad_segments(engine, layout: FlatLayout) -> list[tuple[torch.Tensor, int]]:
    """This rank's reduced gradients as (1-D view, flat offset) pairs.

    Valid only at the gradient-accumulation boundary, after backward and before the optimizer step:
    ZeRO-3 gives its whole flat partition buffer (one segment); ZeRO-1/2 the per-param fragments the
    optimizer will flatten; ZeRO-0 the params' `.grad`.
    """
    opt = engine.optimizer
    if layout.stage == 3:
        return [(opt.grad_partitions_flat_buffer, 0)]
    names = _names(engine)
    out = []
    if layout.stage in (1, 2):
        for group in opt.bit16_groups:
            for p in group:
                spec = layout.specs[names[id(p)]]
                if spec.numel == 0:
                    continue
                g = p._hp_mapping.get_lp_grad_fragment(p._index_in_param_group).view(-1)
                if g.numel() != spec.numel:  # a full-size accumulation buffer: take this rank's fragment
                    g = g.narrow(0, spec.start, spec.numel)
                out.append((g, spec.flat_offset))
        return out
    for p, _ in _zero0_pairs(engine):
        if p.grad is not None:
            out.append((p.grad.view(-1), layout.specs[names[id(p)]].flat_offset))
    return out


def local_shards(engine) -> dict[str, ShardSpec]:
    """Every parameter the optimizer trains, keyed by its `engine.module.named_parameters()` name."""
    return flat_layout(engine).specs


def full_specs(shapes: dict[str, tuple[int, ...]]) -> dict[str, ShardSpec]:
    """Unsharded specs (one rank holds everything, params laid out back to back), e.g. for analysis."""
    specs, off = {}, 0
    for name, shape in shapes.items():
        numel = math.prod(shape)
        specs[name] = ShardSpec(name, tuple(shape), 0, numel, off)
        off += numel
    return specs


def flat_numel(specs: dict[str, ShardSpec]) -> int:
    """Size of a flat buffer that holds every shard at its flat offset."""
    return max((s.flat_offset + s.numel for s in specs.values()), default=0)


def shard_of(full: torch.Tensor, spec: ShardSpec) -> torch.Tensor:
    """This rank's shard (1-D) of a full tensor of shape `spec.full_shape`."""
    if tuple(full.shape) != spec.full_shape:
        raise ValueError(f"{spec.name}: expected a full tensor of shape {spec.full_shape}, "
                         f"got {tuple(full.shape)}")
    return full.reshape(-1).narrow(0, spec.start, spec.numel)


def gather_full(local: dict[str, torch.Tensor], specs: dict[str, ShardSpec]) -> dict[str, torch.Tensor]:
    """Collective: assemble full tensors on every rank from each rank's local shards.

    Every rank must pass the same names. Where ranks hold the same elements (ZeRO-0), the lowest rank's
    copy is used, so the sum-reduction is exact. Shards are summed in buckets of `_GATHER_BUCKET` elements.
    """
    missing = [n for n in specs if n not in local]
    if missing:
        raise ValueError(f"gather_full: expected a local shard for every spec, missing {missing[0]!r}")
    for n, spec in specs.items():
        if local[n].numel() != spec.numel:
            raise ValueError(f"gather_full: {n} has {local[n].numel()} elements, spec says {spec.numel}")
    names = sorted(specs)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        return {n: _place(local[n], specs[n]) for n in names}
    rank = dist.get_rank()
    ranges = [None] * world
    dist.all_gather_object(ranges, {n: (specs[n].start, specs[n].numel) for n in names})
    out: dict[str, torch.Tensor] = {}
    bucket: list[str] = []

    def flush() -> None:
        if not bucket:
            return
        flat = torch.cat([_owned(local[n], specs[n], ranges, rank).reshape(-1) for n in bucket])
        comm = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
        dist.all_reduce(comm)
        flat = comm.to(flat.dtype)
        off = 0
        for n in bucket:
            k = specs[n].full_numel
            out[n] = flat.narrow(0, off, k).view(specs[n].full_shape).clone()
            off += k
        bucket.clear()

    size = 0
    for n in names:
        over = size + specs[n].full_numel > _GATHER_BUCKET
        if bucket and (over or local[n].dtype != local[bucket[0]].dtype):
            flush()
            size = 0
        bucket.append(n)
        size += specs[n].full_numel
    flush()
    return {n: out[n] for n in specs}


def _place(shard: torch.Tensor, spec: ShardSpec) -> torch.Tensor:
    full = torch.zeros(spec.full_numel, dtype=shard.dtype, device=shard.device)
    full.narrow(0, spec.start, spec.numel).copy_(shard.reshape(-1))
    return full.view(spec.full_shape)


def _owned(shard: torch.Tensor, spec: ShardSpec, ranges: list, rank: int) -> torch.Tensor:
    """Full-size tensor holding the part of this rank's shard that no lower rank also holds."""
    lo, hi = spec.start, spec.start + spec.numel
    for r in range(rank):
        s, k = ranges[r][spec.name]
        if k and s <= lo < s + k:
            lo = min(hi, s + k)
    full = torch.zeros(spec.full_numel, dtype=shard.dtype, device=shard.device)
    if hi > lo:
        full.narrow(0, lo, hi - lo).copy_(shard.reshape(-1).narrow(0, lo - spec.start, hi - lo))
    return full
