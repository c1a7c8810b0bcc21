"""Relevance routed to the rank that owns each shard, and aggregated there (the attribution pass's exchange).

Routing: the hooks see a block of rows of the full weight per kept sample while ZeRO-3 has it
gathered. Every rank cuts the block into the ranges the ranks own (`partition.ShardSpec`) and sends each
range to its owner, point to point (an all-to-all that never copies a rank's own range): top-K receives
the per-sample values of every rank's samples ([B, owned] from each rank); the power mean sends only the
per-block partial sums Σ_b φ^p, i.e. the traffic of a reduce-scatter. Nothing ever sums |R| over samples
before the absolute value is taken.

A Linear weight's per-sample map is a product, G_b = Σ_t g_btᵀ x_bt ([R, C] from T tokens). For top-K the
router may take the factors instead of the map: each owner gets x and the g columns of its own rows from
every rank and forms the maps of its range itself. That moves T·(N·C + R) values per sample instead of
R·C (both times (N − 1)/N on N ranks), so it is chosen per weight when smaller (`exchange: auto`): short
sequences, few ranks, wide weights (a 1024 × 512 MLP weight at 128 tokens on 2 ranks: half the bytes; 70B's
MLP at 512 tokens on 64 ranks: 1.2 times, so its maps travel). The products G_b then run on the owner: the
same FLOPs, split the same way.

Blocks and factors are staged and exchanged together once `block_elems` values per sample have gathered
(`Router.flush`): one message per pair of ranks and one wait per bundle instead of one per parameter.
Every wait is a point where the rank ahead idles: on the 2-core test host the per-parameter waits (and a
per-block count all-reduce) cost 2.7 s of a 24 s pass (benchmarks/RESULTS.md).

Row-sparse blocks (embeddings, the output head: see `lrp.relevance`) carry only the rows their samples
touch. An all-reduce ORs those rows over the ranks (the kept-sample counts are gathered once per micro-batch,
before its backward, by `Router.begin`); every rank then sends its values for that union (zeros where it
touched nothing) and each owner merges them into the matching columns of its buffer. The top-K buffer starts
at 0, so the rows nobody touched, whose |R| is exactly 0, are left out of the merge without changing the
result: on a 32k vocabulary that removes well over 99% of the embedding and head values from the hooks,
the exchange and the merge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from agcl_ds import distributed as D
from agcl_ds.attribution.options import AttributionOptions
from agcl_ds.importance.aggregate import (
    LogScale,
    PowerMean,
    Reduce,
    TopKMean,
    dist_reduce,
    insert_sorted,
    local_reduce,
)
from agcl_ds.importance.partition import ShardSpec


def world_reduce() -> Reduce:
    """The reduce for tensors sharded over the whole world (nothing to combine in a single process)."""
    return dist_reduce() if dist.is_initialized() and D.world_size() > 1 else local_reduce


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


@dataclass
class _Values:
    """A routed block whose per-sample values travel: each rank's piece of it, and where this rank's goes."""

    name: str
    cols: slice | torch.Tensor  # this rank's shard offsets of the block's columns it owns
    pieces: list[torch.Tensor]  # per rank r: [<= rows, n_r], the values of r's range (top-K) or their sum
    own_len: int


@dataclass
class _Factors:
    """A weight whose per-sample maps G_b = Σ_t u_btᵀ v_bt ([R, C]) travel as their factors: rank r gets
    u[..., rows[r]] and v of every other rank's kept samples and computes |W ⊙ G_b| of its own range itself."""

    name: str
    u: torch.Tensor  # [n, T, R] this rank's kept samples
    v: torch.Tensor  # [n, T, C]
    rows: list[slice]  # per rank: the rows its flat range covers
    w: torch.Tensor  # this rank's range of the flattened weight, fp32
    offset: int  # where that range starts, counted from the first element of rows[rank]

    @property
    def own_len(self) -> int:
        return self.w.numel()


class Router:
    """Receives row blocks (or a weight's factors) from the hooks and feeds each rank's aggregator with its
    own slice of every parameter."""

    def __init__(self, specs: dict[str, ShardSpec], opts: AttributionOptions, device) -> None:
        self.specs, self.opts, self.device = specs, opts, device
        self.ranges = _owner_ranges(specs)
        self.world, self.rank = D.world_size(), D.rank()
        self.reduce = world_reduce()
        self.scale = {n: LogScale(reduce=self.reduce) for n in specs}
        if opts.aggregate == "topk":  # φ >= 0: an entry a sample does not touch keeps the floor 0 (no-op)
            self.agg = {n: TopKMean(s.numel, opts.k, device=device, floor=0.0) for n, s in specs.items()}
            # Σ|R| and the number of values it covers (zeros included), per tensor over the whole pass
            self.mass = {n: [torch.zeros((), dtype=torch.float64, device=device), 0] for n in specs}
        else:
            self.agg = {n: PowerMean(s.numel, opts.power, device=device) for n, s in specs.items()}
        self.kept = 0  # samples on this rank whose maps were emitted
        # per rank, for the current micro-batch (`begin`): kept samples, and tokens per sample
        self.counts, self.tokens = [0] * self.world, [0] * self.world
        self._buffers = [torch.empty(0, device=device), torch.empty(0, device=device)]
        self._pending: list = []  # transfers posted by `_exchange`, waited for by `_finish`
        self._staged: list[_Values | _Factors] = []  # routed and not yet exchanged (`flush`)
        self._staged_cols = 0

    def begin(self, keep: torch.Tensor, tokens: int) -> None:
        """A micro-batch's forward is done: learn every rank's kept samples and sequence length (one
        all-gather per micro-batch, before its backward, so that no block needs a collective to size its
        exchange)."""
        n = torch.tensor([int(keep.sum()), tokens], dtype=torch.long, device=self.device)
        if self.world > 1:
            every = [torch.zeros_like(n) for _ in range(self.world)]
            dist.all_gather(every, n)
            n = torch.stack(every)
        self.counts, self.tokens = (n.view(-1, 2)[:, 0].tolist(), n.view(-1, 2)[:, 1].tolist())

    def __call__(self, name: str, param, abs_r: torch.Tensor, block: slice, rows: torch.Tensor | None) -> None:
        if name not in self.specs:  # frozen parameter (e.g. the base of a LoRA model): not gated
            return
        if not any(self.counts):  # the same on every rank: nobody kept a sample, nothing to exchange
            return
        n_kept, m = abs_r.shape[:2]
        row = math.prod(abs_r.shape[2:])
        union = None if rows is None else self._touched(block, rows)
        values, numel = abs_r.reshape(n_kept, m * row).float(), n_kept * (block.stop - block.start) * row
        if self.opts.aggregate == "topk":  # raw |R| travels and is merged; φ (monotone) is applied at the end
            self._weigh(name, values, numel)
        else:
            values = self.scale[name].inplace(values, numel)
        if union is not None and union.numel() != m:  # rows other ranks touched and this one did not: zeros
            spread = values.new_zeros(n_kept, union.numel(), row)
            spread[:, torch.searchsorted(union, rows)] = values.view(n_kept, m, row)
            values = spread.view(n_kept, union.numel() * row)
        layout = _Layout(block, union, row)
        pieces = [values[:, layout.pos(a):layout.pos(b)] for a, b in self.ranges[name]]
        if self.opts.aggregate != "topk":  # the power mean sends each range's partial sum Σ_b φ^p, one row
            pieces = [self.agg[name].partial(p, consume=True)[None] for p in pieces]
        spec = self.specs[name]
        lo, hi = layout.pos(spec.start), layout.pos(spec.start + spec.numel)
        self._stage(_Values(name, layout.columns(lo, hi, spec.start), pieces, hi - lo), values.shape[1])

    def factors(self, name: str, param, u: torch.Tensor, v: torch.Tensor) -> bool:
        """Take a weight whose per-sample maps are G_b = Σ_t u_btᵀ v_bt (u [n, T, R], v [n, T, C]) as its
        factors, when they are fewer values to send than the maps, about when T·(N/R + 1/C) < 1 for N ranks and
        T tokens (counted exactly below, with each rank's kept samples and tokens): a 1024 × 512 MLP weight at
        128 tokens on 2 ranks gives 0.5, 70B's 28672 × 8192 at 512 tokens on 8 ranks 0.2, on 64 ranks 1.2.
        Top-K only (the power mean already sends one row per block). Returns False to have the hooks emit the
        maps instead; the answer is the same on every rank. `exchange: factors` takes every weight offered
        (for tests)."""
        if name not in self.specs or not any(self.counts):
            return True  # nothing to do for it, as in `__call__`
        if (self.opts.aggregate != "topk" or self.opts.exchange == "values" or self.world == 1
                or u.shape[1] != self.tokens[self.rank]):
            return False
        big_r, c = u.shape[-1], v.shape[-1]
        lens = [b - a for a, b in self.ranges[name]]
        rows = [slice(a // c, -(-b // c)) if b > a else slice(0, 0) for a, b in self.ranges[name]]
        send_values = max(self.counts) * (self.world - 1) * sum(lens)  # every rank's values pad to the most kept
        send_factors = sum(self.counts[s] * self.tokens[s] * (r.stop - r.start + c)
                           for s in range(self.world) for q, r in enumerate(rows) if q != s and lens[q])
        if send_factors >= send_values and self.opts.exchange == "auto":
            return False
        (a, b), mine = self.ranges[name][self.rank], rows[self.rank]
        w = param.detach().reshape(-1)[a:b].to(torch.float32, copy=True)  # ZeRO-3 frees the gathered W
        self._stage(_Factors(name, u, v, rows, w, a - mine.start * c), big_r * c)
        return True

    def _weigh(self, name: str, values: torch.Tensor, numel: int) -> None:
        """Add values to the tensor's Σ|R| (its log scale); numel counts the zeros they stand for too."""
        self.mass[name][0] += values.sum().double()  # float32 sums: ~30x faster than float64 accumulation
        self.mass[name][1] += numel

    def _stage(self, item: _Values | _Factors, cols: int) -> None:
        self._staged.append(item)
        self._staged_cols += cols
        if self._staged_cols >= self.opts.block_elems:
            self.flush()

    def flush(self) -> None:
        """Exchange what is staged, one message per pair of ranks, and merge it (collective).

        Staging bounds the synchronisations: one per `block_elems` values per sample instead of one per
        parameter (a Llama layer has 9, two of them norm vectors), each a point where the rank ahead waits
        for the other. It holds at most twice `block_elems` values per kept sample. Call it after every
        micro-batch: the counts of `begin` size the messages."""
        staged, self._staged, self._staged_cols = self._staged, [], 0
        if not staged:
            return
        topk, me = self.opts.aggregate == "topk", self.rank
        # pad to the most samples any rank kept, not to the micro-batch: with `only_correct`, or with fewer
        # samples than ranks × micro-batch (64 samples on 64 ranks), most rows would be zeros
        received = self._exchange(staged, max(self.counts) if topk else 1)
        if topk:
            for s in staged:  # this rank's own samples, merged while the others travel
                if isinstance(s, _Factors):
                    self._merge_factors(s, [(s.u[..., s.rows[me]], s.v)])
                else:
                    self._update(s.name, s.cols, s.pieces[me])
        self._finish()
        for s, parts in zip(staged, received, strict=True):
            if isinstance(s, _Factors):
                self._merge_factors(s, [tuple(p) for p in parts])
                continue
            # every other rank's rows at once, so that whole groups of K form (none in a single process)
            got = parts[0][0] if len(parts) == 1 else torch.cat([p[0] for p in parts]) if parts else s.pieces[me][:0]
            if topk:
                self._update(s.name, s.cols, got)
            elif s.own_len:
                self.agg[s.name].sum[s.cols] += s.pieces[me][0] + got.sum(0)

    def _merge_factors(self, f: _Factors, factors: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Merge |W ⊙ Σ_t uᵀv| of this rank's range for the samples of each (u, v) ([n, T, rows[rank]],
        [n, T, C]), in row blocks of at most `block_elems` values per sample."""
        factors = [(u, v) for u, v in factors if u.shape[0]]
        if not factors or not f.own_len:
            return
        c = factors[0][1].shape[-1]
        step = max(1, self.opts.block_elems // c)
        for r0 in range(f.offset // c, -(-(f.offset + f.own_len) // c), step):
            lo, hi = max(r0 * c, f.offset), min((r0 + step) * c, f.offset + f.own_len)
            maps = [torch.bmm(u[..., r0:r0 + step].transpose(1, 2), v).view(u.shape[0], -1)
                    [:, lo - r0 * c:hi - r0 * c] for u, v in factors]
            block = maps[0] if len(maps) == 1 else torch.cat(maps)
            block.mul_(f.w[lo - f.offset:hi - f.offset]).abs_()
            self._weigh(f.name, block, block.numel())
            self._update(f.name, slice(lo - f.offset, hi - f.offset), block)

    def _touched(self, block: slice, rows: torch.Tensor) -> torch.Tensor:
        """The rows of a row-sparse block that any rank touched (an all-reduce OR over the block's rows)."""
        t = torch.zeros(block.stop - block.start, dtype=torch.long, device=self.device)
        t[rows - block.start] = 1
        if self.world > 1:
            dist.all_reduce(t)
        return t.nonzero().flatten() + block.start

    def _outgoing(self, s: _Values | _Factors, r: int, rows: int) -> list[tuple[torch.Tensor, tuple[int, ...]]]:
        """What rank r gets of `s`: (tensor, shape it travels in; rows past the tensor's are zeros)."""
        if isinstance(s, _Factors):
            mine = s.rows[r]
            return [(s.u[..., mine], (*s.u.shape[:2], mine.stop - mine.start)), (s.v, tuple(s.v.shape))] \
                if mine.stop > mine.start else []
        p = s.pieces[r]
        return [(p, (rows, p.shape[1]))] if p.shape[1] else []

    def _incoming(self, s: _Values | _Factors, q: int, rows: int) -> list[tuple[int, ...]]:
        """The shapes of what rank q sends here of `s` (the mirror of `_outgoing` on rank q)."""
        if not s.own_len:  # a rank owns none of a block exactly when its range there is empty: both sides skip
            return []
        if isinstance(s, _Factors):
            mine = s.rows[self.rank]
            return [(self.counts[q], self.tokens[q], mine.stop - mine.start), (self.counts[q], self.tokens[q],
                                                                               s.v.shape[-1])]
        return [(rows, s.own_len)]

    def _exchange(self, staged: list[_Values | _Factors], rows: int) -> list[list[list[torch.Tensor]]]:
        """Point to point, all of it in one message per pair of ranks: the pieces of value blocks, zero-padded
        to `rows` rows, and the factors of factored weights. Returns, per staged item and other rank, the
        tensors received from it, valid once `_finish()` returns and until the next call. A rank's own
        pieces are never copied or sent. A rank that kept fewer samples sends zero rows, which change neither
        aggregate (top-K's floor is 0, sums add 0).

        The sends and receives are only posted here, so the caller can merge its own pieces while they
        travel. Both sides go through buffers kept for the whole pass: on CPU a fresh block-sized tensor per
        call pays its page faults every time."""
        others = [r for r in range(self.world) if r != self.rank]
        out = [[self._outgoing(s, r, rows) for s in staged] for r in others]
        shapes = [[self._incoming(s, q, rows) for s in staged] for q in others]
        send = self._buffer(0, sum(math.prod(shape) for per in out for item in per for _, shape in item))
        recv = self._buffer(1, sum(math.prod(shape) for per in shapes for item in per for shape in item))
        ops, sent, got = [], 0, 0
        received: list[list[list[torch.Tensor]]] = [[] for _ in staged]
        for i, r in enumerate(others):
            start = sent
            for item in out[i]:
                for t, shape in item:
                    slot = send[sent:sent + math.prod(shape)].view(shape)
                    slot[:t.shape[0]].copy_(t)
                    slot[t.shape[0]:].zero_()
                    sent += slot.numel()
            if sent > start:
                ops.append(dist.P2POp(dist.isend, send[start:sent], r))
            start = got
            for j, item in enumerate(shapes[i]):
                views = []
                for shape in item:
                    views.append(recv[got:got + math.prod(shape)].view(shape))
                    got += views[-1].numel()
                if views:
                    received[j].append(views)
            if got > start:
                ops.append(dist.P2POp(dist.irecv, recv[start:got], r))
        self._pending = dist.batch_isend_irecv(ops) if ops else []
        return received

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
        return dict(zip(names, self.opts.normalise(raws, self.reduce), strict=True))
