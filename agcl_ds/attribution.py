"""The attribution pass: per-element importance of every trainable parameter for one task, computed
on the (possibly ZeRO-3-partitioned) engine and left on each rank for exactly its own shard.

    samples ─► lrp_rules(model) ─► PerSampleRelevance (hooks, one module's weight gathered at a time)
            ─► route each row block to the rank owning it ─► top-K of |R_b| per element, mean of φ = log1p(·/s)
               over them (or the power mean of φ(|R_b|)) ─► normalise per tensor to [0, 1]

Routing: the hooks see a block of rows of the full weight per kept sample while ZeRO-3 has it
gathered. Every rank cuts the block into the ranges the ranks own (`partition.ShardSpec`) and sends each
range to its owner, point to point (an all-to-all that never copies a rank's own range): top-K receives
the per-sample values of every rank's samples ([B, owned] from each rank); the power mean sends only the
per-block partial sums Σ_b φ^p, i.e. the traffic of a reduce-scatter. Nothing ever sums |R| over samples
before the absolute value is taken.

Row-sparse blocks (embeddings, the output head: see `lrp.relevance`) carry only the rows their samples
touch. The all-reduce that counts each rank's kept samples also ORs those rows over the ranks; every rank then
sends its values for that union (zeros where it touched nothing) and each owner merges them into the matching
columns of its buffer. The top-K buffer starts at 0, so the rows nobody touched, whose |R| is exactly 0,
are left out of the merge without changing the result: on a 32k vocabulary that removes well over 99% of
the embedding and head values from the hooks, the exchange and the merge.
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
    normalize_many,
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
    block_elems: int = 1 << 23  # relevance values per kept sample in one hook block (memory: B × this × 4 bytes)


def _owner_ranges(specs: dict[str, ShardSpec]) -> dict[str, list[tuple[int, int]]]:
    """For every parameter, each rank's [start, end) of the flattened full tensor."""
    mine = {n: (s.start, s.start + s.numel) for n, s in specs.items()}
    if not dist.is_initialized() or D.world_size() == 1:
        return {n: [r] for n, r in mine.items()}
    every: list[dict[str, tuple[int, int]]] = [{} for _ in range(D.world_size())]
    dist.all_gather_object(every, mine)
    return {n: [every[r][n] for r in range(D.world_size())] for n in mine}


class _Layout:
    """Where a block's values sit: element e of the flattened full tensor is column `pos(e)` of the block.

    A dense block holds the elements of rows [block.start, block.stop) in order; a row-sparse block holds only
    the rows `union` (sorted), `row` elements each, in order. Either way the elements of any range [a, b) of
    the flat tensor are the contiguous columns [pos(a), pos(b)), which is what makes a rank's shard one slice.
    """

    def __init__(self, block: slice, union: torch.Tensor | None, row: int) -> None:
        self.block, self.union, self.row = block, union, row

    def pos(self, e: int) -> int:
        if self.union is None:
            return min(max(e - self.block.start * self.row, 0), (self.block.stop - self.block.start) * self.row)
        r, within = divmod(e, self.row)
        j = int(torch.searchsorted(self.union, r))
        return j * self.row + (within if j < self.union.numel() and int(self.union[j]) == r else 0)

    def columns(self, a: int, b: int, start: int) -> slice | torch.Tensor:
        """The shard offsets (flat element − `start`) of block columns [a, b)."""
        if self.union is None:
            lo = self.block.start * self.row - start
            return slice(lo + a, lo + b)
        p = torch.arange(a, b, device=self.union.device)
        return self.union[p // self.row] * self.row + p % self.row - start


class _Router:
    """Receives row blocks from the hooks and feeds each rank's aggregator with its own slice."""

    def __init__(self, specs: dict[str, ShardSpec], opts: AttributionOptions, device) -> None:
        self.specs, self.opts, self.device = specs, opts, device
        self.ranges = _owner_ranges(specs)
        self.world = D.world_size()
        self.reduce = dist_reduce() if dist.is_initialized() and self.world > 1 else local_reduce
        self.scale = {n: LogScale(reduce=self.reduce) for n in specs}
        if opts.aggregate == "topk":  # φ >= 0: an entry a sample does not touch keeps the floor 0 (no-op)
            self.agg = {n: TopKMean(s.numel, opts.k, device=device, floor=0.0) for n, s in specs.items()}
            # Σ|R| and the number of values it covers (zeros included), per tensor over the whole pass
            self.mass = {n: [torch.zeros((), dtype=torch.float64, device=device), 0] for n in specs}
        else:
            self.agg = {n: PowerMean(s.numel, opts.power, device=device) for n, s in specs.items()}
        self.kept = 0  # samples on this rank whose maps were emitted
        self._buffers = [torch.empty(0, device=device), torch.empty(0, device=device)]
        self._pending: list = []  # transfers posted by `_exchange`, waited for by `_finish`

    def __call__(self, name: str, param, abs_r: torch.Tensor, block: slice, rows: torch.Tensor | None) -> None:
        if name not in self.specs:  # frozen parameter (e.g. the base of a LoRA model): not gated
            return
        n_kept, m = abs_r.shape[:2]
        row = math.prod(abs_r.shape[2:])
        topk = self.opts.aggregate == "topk"
        counts, union = self._census(n_kept, block, rows) if topk or rows is not None else (None, None)
        # pad to the most samples any rank kept, not to the micro-batch: with `only_correct`, or with fewer
        # samples than ranks × micro-batch (64 samples on 64 ranks), most rows would be zeros
        most = max(counts) if topk else 1
        if most == 0:  # the same on every rank: nobody kept a sample, nothing to exchange
            return
        values, numel = abs_r.reshape(n_kept, m * row).float(), n_kept * (block.stop - block.start) * row
        if topk:  # raw |R| travels and is merged; φ is monotone, so it is applied to the top K at the end
            self.mass[name][0] += values.sum().double()  # float32 sums: ~30x faster than float64 accumulation
            self.mass[name][1] += numel
        else:
            values = self.scale[name].inplace(values, numel)
        if union is not None and union.numel() != m:  # rows other ranks touched and this one did not: zeros
            spread = values.new_zeros(n_kept, union.numel(), row)
            spread[:, torch.searchsorted(union, rows)] = values.view(n_kept, m, row)
            values = spread.view(n_kept, union.numel() * row)
        layout = _Layout(block, union, row)
        pieces = [values[:, layout.pos(a):layout.pos(b)] for a, b in self.ranges[name]]
        spec = self.specs[name]
        lo, hi = layout.pos(spec.start), layout.pos(spec.start + spec.numel)
        cols = layout.columns(lo, hi, spec.start)
        if topk:
            own, received = self._exchange(pieces, hi - lo, most)
            self._update(name, cols, own)  # this rank's own samples, merged while the others travel
            self._finish()
            self._update(name, cols, received)  # in one call, so that whole groups of K rows form
        else:
            agg = self.agg[name]
            own, received = self._exchange([agg.partial(p, consume=True)[None] for p in pieces], hi - lo, 1)
            self._finish()
            if hi > lo:
                agg.sum[cols] += own[0] + received.sum(0)

    def _census(self, n_kept: int, block: slice, rows: torch.Tensor | None) -> tuple[list[int], torch.Tensor | None]:
        """Samples kept on every rank and, for a row-sparse block, the rows any rank touched (one all-reduce)."""
        extra = 0 if rows is None else block.stop - block.start
        t = torch.zeros(self.world + extra, dtype=torch.long, device=self.device)
        t[D.rank()] = n_kept
        if rows is not None:
            t[self.world + rows - block.start] = 1
        if self.world > 1:
            dist.all_reduce(t)
        union = None if rows is None else t[self.world:].nonzero().flatten() + block.start
        return t[:self.world].tolist(), union

    def _exchange(self, pieces: list[torch.Tensor], own_len: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Point to point: piece r ([<= rows, n_r]) goes to rank r, zero-padded to `rows` rows. Returns this
        rank's own piece as it is (never copied or sent) and what the other ranks send here, stacked:
        [(world − 1)·rows, own_len], valid once `_finish()` returns and until the next call. A rank that kept
        fewer samples sends zero rows, which change neither aggregate (top-K's floor is 0, sums add 0).

        The sends and receives are only posted here, so the caller can merge its own piece while they travel.
        Both sides go through buffers kept for the whole pass: on CPU a fresh block-sized tensor per call
        pays its page faults every time."""
        me = D.rank()
        others = [r for r in range(self.world) if r != me]
        send = self._buffer(0, rows * sum(pieces[r].shape[1] for r in others))
        recv = self._buffer(1, len(others) * rows * own_len).view(len(others), rows, own_len)
        ops, off = [], 0
        for i, r in enumerate(others):
            p = pieces[r]
            if p.shape[1]:  # rank r owns none of this block exactly when its own_len is 0: both sides skip
                slot = send[off:off + rows * p.shape[1]].view(rows, p.shape[1])
                slot[:p.shape[0]].copy_(p)
                slot[p.shape[0]:].zero_()
                off += slot.numel()
                ops.append(dist.P2POp(dist.isend, slot, r))
            if own_len:
                ops.append(dist.P2POp(dist.irecv, recv[i], r))
        self._pending = dist.batch_isend_irecv(ops) if ops else []
        return pieces[me], recv.view(len(others) * rows, own_len)

    def _finish(self) -> None:
        """Wait for the transfers the last `_exchange` posted."""
        for work in self._pending:
            work.wait()
        self._pending = []

    def _buffer(self, which: int, numel: int) -> torch.Tensor:
        """The first `numel` elements of exchange buffer `which` (0 send, 1 receive), grown when too small."""
        buf = self._buffers[which]
        if buf.numel() < numel:
            buf = self._buffers[which] = torch.empty(numel, dtype=torch.float32, device=self.device)
        return buf[:numel]

    def _update(self, name: str, cols: slice | torch.Tensor, rows: torch.Tensor) -> None:
        if rows.shape[0] == 0 or rows.shape[1] == 0:
            return
        buf = self.agg[name].buf
        if isinstance(cols, slice):
            insert_sorted(buf[:, cols], rows)
        else:  # the columns of a row-sparse block: merge a gathered copy, write it back
            sub = buf[:, cols]
            insert_sorted(sub, rows)
            buf[:, cols] = sub

    def result(self) -> dict[str, torch.Tensor]:
        """Importance of every owned shard; spends the aggregates (top-K is finished in its own buffer)."""
        total = int(D.all_sum([float(self.kept)])[0])
        names = sorted(self.specs)  # the same order on every rank: normalisation is collective
        if self.opts.aggregate == "topk" and names:  # every tensor's scale: the mean |R| over all its explained values
            mass = self.reduce(torch.stack([torch.stack([self.mass[n][0], torch.tensor(float(self.mass[n][1]),
                                            dtype=torch.float64, device=self.device)]) for n in names]), "sum")
            for n, (total_r, count) in zip(names, mass.tolist(), strict=True):
                self.scale[n].scale = total_r / count if total_r > 0 else None
        raws = []
        for name in names:
            agg = self.agg[name]
            agg.seen = total
            raws.append(agg.result(self.scale[name].apply_, consume=True) if self.opts.aggregate == "topk"
                        else agg.result())
        return dict(zip(names, normalize_many(raws, self.opts.normalize, self.opts.top_frac, reduce=self.reduce),
                        strict=True))


def _random_importance(specs: dict[str, ShardSpec], opts: AttributionOptions, seed: int) -> dict[str, torch.Tensor]:
    """The control: uniform random scores through the same normalisation (same sparsity as `lrp`)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + D.rank())
    reduce = dist_reduce() if dist.is_initialized() and D.world_size() > 1 else local_reduce
    names = sorted(specs)
    scores = [torch.rand(specs[n].numel, generator=gen).to(D.device()) for n in names]
    return dict(zip(names, normalize_many(scores, opts.normalize, opts.top_frac, reduce=reduce), strict=True))


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
    with rules, PerSampleRelevance(module, router, opts.block_elems, wanted=specs) as hooks:
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
