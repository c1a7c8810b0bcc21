"""The attribution pass: per-element importance of every trainable parameter for one task, computed
on the (possibly ZeRO-3-partitioned) engine and left on each rank for exactly its own shard.

    samples ─► lrp_rules(model) ─► PerSampleRelevance (hooks, one module's weight gathered at a time)
            ─► φ = log1p(|R_b| / s) per sample ─► route each row block to the rank owning it
            ─► top-K mean (or power mean) per element ─► normalise per tensor to [0, 1]

Routing: the hooks see a block of rows of the full weight per kept sample while ZeRO-3 has it
gathered. Every rank cuts the block into the ranges the ranks own (`partition.ShardSpec`) and one
`all_to_all` per block sends each range to its owner: top-K receives the per-sample values of every
rank's samples ([B, owned] from each rank); the power mean sends only the per-block partial sums
Σ_b φ^p, i.e. the traffic of a reduce-scatter. Nothing ever sums |R| over samples before the
absolute value is taken.
"""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

from agcl_ds import distributed as D
from agcl_ds.data.collate import Tokenizer, collate
from agcl_ds.data.tasks import Example
from agcl_ds.importance.aggregate import (
    LogScale,
    PowerMean,
    TopKMean,
    dist_reduce,
    insert_sorted,
    local_reduce,
    normalize,
)
from agcl_ds.importance.partition import ShardSpec, local_shards
from agcl_ds.lrp.relevance import PerSampleRelevance
from agcl_ds.lrp.rules import lrp_rules


@dataclass
class AttributionOptions:
    """How importance is estimated (defaults: the paper's recipe, top-20% binarised)."""

    source: Literal["lrp", "grad_x_weight", "random"] = "lrp"  # the last two are ablations / controls
    variant: Literal["attnlrp", "cplrp"] = "attnlrp"
    target: Literal["predicted", "gold", "loss"] = "predicted"  # which next-token logit (or log-prob) is explained
    positions: Literal["all", "first"] = "all"  # sum over answer positions, or the first one only
    only_correct: bool = True  # the paper keeps only samples the model answers correctly
    aggregate: Literal["topk", "power"] = "topk"  # top-K mean (paper) or sum-reducible power mean
    k: int = 8
    power: float = 4.0
    normalize: Literal["topk", "rank", "minmax"] = "topk"
    top_frac: float = 0.2  # for normalize: topk (binary mask of the top fraction per tensor)
    n_samples: int = 64  # training examples explained per task (over all ranks)
    micro_batch_size: int = 8  # per rank


def _owner_ranges(specs: dict[str, ShardSpec]) -> dict[str, list[tuple[int, int]]]:
    """For every parameter, each rank's [start, end) of the flattened full tensor."""
    mine = {n: (s.start, s.start + s.numel) for n, s in specs.items()}
    if not dist.is_initialized() or D.world_size() == 1:
        return {n: [r] for n, r in mine.items()}
    every: list[dict[str, tuple[int, int]]] = [{} for _ in range(D.world_size())]
    dist.all_gather_object(every, mine)
    return {n: [every[r][n] for r in range(D.world_size())] for n in mine}


class _Router:
    """Receives row blocks from the hooks and feeds each rank's aggregator with its own slice."""

    def __init__(self, specs: dict[str, ShardSpec], opts: AttributionOptions, device) -> None:
        self.specs, self.opts, self.device = specs, opts, device
        self.ranges = _owner_ranges(specs)
        self.world = D.world_size()
        self.reduce = dist_reduce() if dist.is_initialized() and self.world > 1 else local_reduce
        self.scale = {n: LogScale(reduce=self.reduce) for n in specs}
        if opts.aggregate == "topk":
            self.agg = {n: TopKMean(s.numel, opts.k, device=device) for n, s in specs.items()}
        else:
            self.agg = {n: PowerMean(s.numel, opts.power, device=device) for n, s in specs.items()}
        self.kept = 0  # samples on this rank whose maps were emitted
        self._buffers = [torch.empty(0, device=device), torch.empty(0, device=device)]

    def __call__(self, name: str, param, abs_r: torch.Tensor, row_start: int) -> None:
        if name not in self.specs:  # frozen parameter (e.g. the base of a LoRA model): not gated
            return
        n_kept = abs_r.shape[0]
        row = math.prod(abs_r.shape[2:])
        lo, hi = row_start * row, (row_start + abs_r.shape[1]) * row
        values = self.scale[name].inplace(abs_r.reshape(n_kept, hi - lo).float())  # n_kept may be 0
        pieces = []
        for start, end in self.ranges[name]:
            a, b = max(start, lo), min(end, hi)
            pieces.append(values[:, a - lo:b - lo] if a < b else values[:, :0])
        spec = self.specs[name]
        a, b = max(spec.start, lo), min(spec.start + spec.numel, hi)
        own = (a - spec.start, max(0, b - a))
        if self.opts.aggregate == "topk":
            # pad to the most samples any rank kept, not to the micro-batch: with `only_correct`, or
            # with fewer samples than ranks × micro-batch (64 samples on 64 ranks), most rows would be zeros
            counts = self._counts(n_kept)
            most = max(counts)
            if most == 0:  # the same on every rank: nobody kept a sample, nothing to exchange
                return
            for blk, c in zip(self._exchange(pieces, own[1], most), counts, strict=True):
                self._update(name, own, blk[:c])
        else:
            agg = self.agg[name]
            received = self._exchange([agg.partial(p, consume=True)[None] for p in pieces], own[1], 1)
            if own[1]:
                agg.sum[own[0]:own[0] + own[1]] += torch.stack([r[0] for r in received]).sum(0)

    def _counts(self, n_kept: int) -> list[int]:
        if self.world == 1:
            return [n_kept]
        t = torch.zeros(self.world, dtype=torch.long, device=self.device)
        t[D.rank()] = n_kept
        dist.all_reduce(t)
        return t.tolist()

    def _exchange(self, pieces: list[torch.Tensor], own_len: int, rows: int) -> list[torch.Tensor]:
        """all_to_all: piece r ([<= rows, n_r], zero-padded to `rows`) goes to rank r; returns what every rank
        sent here ([rows, own_len] each, valid until the next call).

        Both sides go through buffers kept for the whole pass: on CPU a fresh block-sized tensor per call
        pays its page faults every time."""
        if self.world == 1:
            return pieces
        send = self._buffer(0, rows * sum(p.shape[1] for p in pieces))
        off = 0
        for p in pieces:
            slot = send[off:off + rows * p.shape[1]].view(rows, p.shape[1])
            slot[:p.shape[0]].copy_(p)
            slot[p.shape[0]:].zero_()
            off += slot.numel()
        recv = self._buffer(1, self.world * rows * own_len)
        dist.all_to_all_single(recv, send, [rows * own_len] * self.world, [rows * p.shape[1] for p in pieces])
        return list(recv.view(self.world, rows, own_len).unbind(0))

    def _buffer(self, which: int, numel: int) -> torch.Tensor:
        """The first `numel` elements of exchange buffer `which` (0 send, 1 receive), grown when too small."""
        buf = self._buffers[which]
        if buf.numel() < numel:
            buf = self._buffers[which] = torch.empty(numel, dtype=torch.float32, device=self.device)
        return buf[:numel]

    def _update(self, name: str, own: tuple[int, int], rows: torch.Tensor) -> None:
        offset, length = own
        if length == 0 or rows.shape[0] == 0:
            return
        insert_sorted(self.agg[name].buf[:, offset:offset + length], rows)

    def result(self) -> dict[str, torch.Tensor]:
        total = int(D.all_sum([float(self.kept)])[0])
        out = {}
        for name in sorted(self.specs):  # same order on every rank: normalise is collective
            agg = self.agg[name]
            agg.seen = total
            raw = agg.result()
            if self.opts.aggregate == "topk":
                raw = torch.where(torch.isfinite(raw), raw, torch.zeros_like(raw))
            out[name] = normalize(raw, self.opts.normalize, self.opts.top_frac, reduce=self.reduce)
        return out


def _random_importance(specs: dict[str, ShardSpec], opts: AttributionOptions, seed: int) -> dict[str, torch.Tensor]:
    """The control: uniform random scores through the same normalisation (same sparsity as `lrp`)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + D.rank())
    reduce = dist_reduce() if dist.is_initialized() and D.world_size() > 1 else local_reduce
    return {name: normalize(torch.rand(specs[name].numel, generator=gen).to(D.device()), opts.normalize,
                            opts.top_frac, reduce=reduce) for name in sorted(specs)}


def pick_samples(examples: list[Example], n: int, seed: int) -> list[Example]:
    """A seeded subset of the task's training examples (never its test set)."""
    idx = list(range(len(examples)))
    random.Random(f"attribution:{seed}").shuffle(idx)
    return [examples[i] for i in idx[:n]]


def attribute(engine, tok: Tokenizer, examples: list[Example], opts: AttributionOptions, max_len: int,
              seed: int = 0) -> tuple[dict[str, torch.Tensor], int]:
    """Importance in [0, 1] for this rank's shard of every trainable parameter (collective).

    Returns the local shards keyed like `partition.local_shards(engine)` and the number of samples
    (over all ranks) whose relevance entered the aggregate.
    """
    specs = local_shards(engine)
    if opts.source == "random":
        return _random_importance(specs, opts, seed), 0
    samples = pick_samples(examples, opts.n_samples, seed)
    mine = samples[D.rank()::D.world_size()]
    n_batches = math.ceil(len(samples) / (D.world_size() * opts.micro_batch_size))
    router = _Router(specs, opts, D.device())
    module = engine.module
    was_training = module.training
    rules = lrp_rules(module, variant=opts.variant) if opts.source == "lrp" else contextlib.nullcontext()
    with rules, PerSampleRelevance(module, router, wanted=specs) as hooks:
        for b in range(n_batches):
            chunk = mine[b * opts.micro_batch_size:(b + 1) * opts.micro_batch_size] or mine[:1] or samples[:1]
            batch = {k: v.to(D.device()) for k, v in collate(tok, chunk, max_len).items()}
            real = len(mine[b * opts.micro_batch_size:(b + 1) * opts.micro_batch_size])
            if real == 0:  # this rank ran out: take part in the collectives, explain nothing
                batch["labels"] = torch.full_like(batch["labels"], -100)
            keep = hooks.run(batch, target=opts.target, positions=opts.positions,
                             only_correct=opts.only_correct or real == 0)
            router.kept += int(keep.sum())
    module.train(was_training)
    total = int(D.all_sum([float(router.kept)])[0])
    return router.result(), total
