"""Per-entry aggregation of per-sample |R| over samples, and per-tensor normalisation to [0, 1].

Everything works on flat 1-D local shards (`values[B, n_local]`, `x[n_local]`), so that it composes with
the ZeRO layout (`agcl_ds.importance.partition`). Where a per-tensor statistic needs every shard, the caller
passes a `reduce(t, op)` that all-reduces `t` over the ranks holding that tensor's shards (`dist_reduce()`),
or leaves the default `local_reduce` for a tensor held whole.

Log scale: φ(r) = log1p(r / s), with s one constant per tensor: the mean |R| of the tensor (global over
shards and ranks through `reduce`). For the top-K mean, which merges raw |R| and applies φ to the K
survivors at the end, s is the mean over every explained sample of the pass, so the importance does not
depend on how the samples were split into ranks and micro-batches. The power mean needs φ per sample, so
there s is fixed from the first micro-batch with any relevance (`LogScale`). Why a log scale: per-sample relevance
is heavy-tailed and spans orders of magnitude (samples with large logits dominate a raw top-K mean); log1p
compresses that tail, keeps exact zeros at 0 (log would give −∞ for untouched embedding rows), and dividing
by the tensor's own mean makes φ independent of the tensor's overall scale (φ ≈ r/s below the mean, ≈ log r
above it), so one transform serves lm_head and a norm vector alike. Top-K selection is unaffected (φ is
monotone); the mean over the top K is taken in log space, i.e. it is closer to a geometric mean of the K.

Aggregates: `TopKMean` (the paper's mean of the top-K per entry; a running [K, n] buffer updated per
micro-batch) and `PowerMean` ((Σ φ^p / n)^(1/p), whose state is a sum, so data-parallel ranks need one
reduce-scatter of Σ_b φ^p per micro-batch instead of an all-to-all of every sample's values).

Normalisation (`normalize`, `normalize_many`): per-tensor min–max (of the log-scaled aggregate),
rank/quantile (histogram CDF, see `quantile_rank` for its error bound), and top-k% binarisation with an
exact global threshold.
The spikes found x/max useless (heavy tails leave mean R ≈ 0.004) and binary top-k% masks effective.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.distributed as dist

Reduce = Callable[[torch.Tensor, str], torch.Tensor]
Method = Literal["minmax", "rank", "topk", "mass"]


def local_reduce(t: torch.Tensor, op: str) -> torch.Tensor:
    """The tensor is held whole by this process: nothing to combine."""
    return t


def dist_reduce(group: dist.ProcessGroup | None = None) -> Reduce:
    """All-reduce over `group` (default: world), for tensors whose shards are spread over its ranks."""
    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}

    def reduce(t: torch.Tensor, op: str) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t, op=ops[op], group=group)
        return t

    return reduce


def _check_2d(values: torch.Tensor, numel: int) -> None:
    if values.ndim != 2 or values.shape[1] != numel:
        raise ValueError(f"expected per-sample values [B, {numel}], got {tuple(values.shape)}")


class LogScale:
    """φ(r) = log1p(r / s); s is fixed from the first call whose (global) mean |R| is positive."""

    def __init__(self, scale: float | None = None, reduce: Reduce = local_reduce):
        if scale is not None and not scale > 0:
            raise ValueError(f"log scale must be > 0, got {scale}")
        self.scale, self.reduce = scale, reduce

    def _fix_scale(self, r: torch.Tensor, numel: int | None) -> None:
        if self.scale is None:  # every rank calls this on the same micro-batch: the decision is global
            count = r.numel() if numel is None else numel
            # the sum in r's own dtype: torch's blocked float32 sum is within 1e-7 of float64 here and ~30x
            # faster on CPU than accumulating in float64 (that sum was 1 s of a 50M model's pass)
            stats = self.reduce(torch.tensor([r.sum().item(), count], dtype=torch.float64, device=r.device), "sum")
            if stats[0] > 0:
                self.scale = (stats[0] / stats[1]).item()

    def __call__(self, r: torch.Tensor) -> torch.Tensor:
        self._fix_scale(r, None)
        if self.scale is None:
            return torch.zeros_like(r)
        return torch.log1p(r / self.scale)

    def inplace(self, r: torch.Tensor, numel: int | None = None) -> torch.Tensor:
        """`self(r)` computed in r's own storage (for a fresh tensor the caller hands over). `numel`: how many
        values r stands for, when it holds only the nonzero rows of a larger block (the mean counts the zeros)."""
        self._fix_scale(r, numel)
        return self.apply_(r)

    def apply_(self, r: torch.Tensor) -> torch.Tensor:
        """φ(r) in r's storage with the scale as it stands (zeros while unfixed); no statistics, no collective."""
        if self.scale is None:
            return r.zero_()
        return r.div_(self.scale).log1p_()


@functools.cache  # called for every block merged; the network depends on K alone
def _sorting_network(n: int) -> tuple[tuple[int, int], ...]:
    """Batcher's odd-even merge sort for n a power of two, as comparators (i, j), i < j, in order (19 for 8)."""
    pairs, p = [], 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return tuple(pairs)


def _merge_group(part: torch.Tensor, group: torch.Tensor, pool: list[torch.Tensor], bank: torch.Tensor,
                 network: tuple[tuple[int, int], ...]) -> None:
    """Keep the K largest of `part` [K, w] (sorted descending per column) and `group` [K, w] in `part`.

    The group is sorted by `network` out of place (max and min into free `pool` rows, references swapped, the
    group itself untouched); then max(part_i, group_{K-1-i}) holds the top K as a bitonic sequence, which
    log2 K half-cleaner stages sort, alternating between `part` and `bank`. 70 element-wise passes for K = 8,
    against 128 for sinking the 8 rows one by one."""
    k = part.shape[0]
    cur, free = list(group), list(pool)
    scratch = {id(t) for t in pool}
    for i, j in network:
        hi, lo = free.pop(), free.pop()
        torch.maximum(cur[i], cur[j], out=hi)
        torch.minimum(cur[i], cur[j], out=lo)
        free.extend(t for t in (cur[i], cur[j]) if id(t) in scratch)
        cur[i], cur[j] = hi, lo
    stages = k.bit_length() - 1
    src = bank if stages % 2 else part  # so that the last stage writes `part`
    for i in range(k):
        torch.maximum(part[i], cur[k - 1 - i], out=src[i])
    d = k // 2
    while d >= 1:
        dst = part if src is bank else bank
        for i in range(k):
            if i & d == 0:
                torch.maximum(src[i], src[i + d], out=dst[i])
                torch.minimum(src[i], src[i + d], out=dst[i + d])
        src, d = dst, d // 2


@torch.no_grad()
def insert_sorted(buf: torch.Tensor, rows: torch.Tensor, cols: int = 1 << 16) -> None:
    """Merge `rows` [B, n] into `buf` [K, n] (each column sorted descending) in place, keeping the K
    largest per column. Same result as topk(cat(buf, rows)), without the concatenation, the index tensor or
    a sort: for K a power of two, whole groups of K rows are sorted by a sorting network and merged
    bitonically (`_merge_group`); any other row sinks through the buffer, the larger value staying at every
    level. It works on `cols` columns at a time, so that the passes over them run in cache rather than from
    memory (2x faster than whole rows of 4M columns)."""
    rows = rows.to(buf.dtype)
    k, width = buf.shape[0], min(cols, buf.shape[1])
    network = _sorting_network(k) if k > 1 and k & (k - 1) == 0 else None
    whole = rows.shape[0] // k if network is not None else 0
    # rows of scratch: carry and lower for sinking, then (with whole groups) K + 2 pool rows and a K-row bank
    scratch = torch.empty(2 * k + 4 if whole else 2, width, dtype=buf.dtype, device=buf.device)
    for a in range(0, buf.shape[1], cols):
        part = buf[:, a:a + cols]
        rest = scratch[:, :part.shape[1]]
        for g in range(whole):
            _merge_group(part, rows[g * k:(g + 1) * k, a:a + cols], list(rest[2:k + 4]), rest[k + 4:], network)
        carry, lower = rest[0], rest[1]
        for x in rows[whole * k:, a:a + cols]:
            carry.copy_(x)
            for level in part:
                torch.minimum(level, carry, out=lower)
                torch.maximum(level, carry, out=level)
                carry, lower = lower, carry


class TopKMean:
    """Mean of the K largest values seen per entry (fewer while fewer than K samples have been seen).

    `floor`: a lower bound of every value. The buffer starts full of it, so a sample whose value is the floor
    changes nothing and may be left out (with floor 0, the exact zeros of untouched embedding rows).
    """

    def __init__(self, numel: int, k: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, floor: float = -math.inf):
        if k < 1:
            raise ValueError(f"top-K needs k >= 1, got {k}")
        self.numel, self.k, self.seen = numel, k, 0
        self.buf = torch.full((k, numel), floor, dtype=dtype, device=device)

    def update(self, values: torch.Tensor) -> None:
        _check_2d(values, self.numel)
        if values.shape[0] == 0:
            return
        insert_sorted(self.buf, values)
        self.seen += values.shape[0]

    def result(self, transform_: Callable[[torch.Tensor], torch.Tensor] | None = None,
               consume: bool = False) -> torch.Tensor:
        """The mean of the top K; `transform_`, a monotone map computed in place (`LogScale.apply_`), is applied
        to them first. `consume`: compute it in the buffer's own storage (no extra memory; the aggregate is
        spent).

        Top-K commutes with a monotone map, so the buffer may hold raw values: the map then costs K × n once
        here instead of once per sample and entry (a level at a time)."""
        n = min(self.k, self.seen)
        if n == 0:
            return self.buf.new_zeros(self.numel)
        if transform_ is None and not consume:
            return self.buf[:n].mean(0)
        transform_ = transform_ or (lambda t: t)
        first, *rest = self.buf[:n]
        out = transform_(first if consume else first.clone())
        row = None if consume else torch.empty_like(first)
        for level in rest:
            out += transform_(level if row is None else row.copy_(level))
        return out.div_(n)


class PowerMean:
    """(Σ_b v_b^p / n)^(1/p) per entry: a sum-reducible stand-in for the top-K mean (p → ∞ gives the max)."""

    def __init__(self, numel: int, p: float = 4.0, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        if not p > 0:
            raise ValueError(f"power mean needs p > 0, got {p}")
        self.numel, self.p, self.seen = numel, p, 0
        self.sum = torch.zeros(numel, dtype=dtype, device=device)

    def partial(self, values: torch.Tensor, consume: bool = False) -> torch.Tensor:
        """Σ_b v_b^p over a micro-batch: what ranks reduce-scatter before `add`.

        consume=True lets it overwrite `values` (a tensor the caller hands over) instead of copying. A power
        of two p (the default 4) is taken by squaring in place: on CPU `pow` with a float exponent costs ~6x
        two multiplications, and a fresh block-sized result costs its page faults again.
        """
        x = values.to(self.sum.dtype, copy=not consume)
        n = int(self.p)
        if n == self.p and n & (n - 1) == 0:
            while n > 1:
                x.mul_(x)
                n //= 2
        else:
            x.pow_(self.p)
        return x.sum(0)

    def add(self, partial_sum: torch.Tensor, count: int) -> None:
        if partial_sum.shape != (self.numel,):
            raise ValueError(f"expected a partial sum [{self.numel}], got {tuple(partial_sum.shape)}")
        self.sum += partial_sum.to(self.sum.dtype)
        self.seen += count

    def update(self, values: torch.Tensor) -> None:
        _check_2d(values, self.numel)
        self.add(self.partial(values), values.shape[0])

    def result(self) -> torch.Tensor:
        if self.seen == 0:
            return torch.zeros_like(self.sum)
        return (self.sum / self.seen).pow(1.0 / self.p)


# ---------------------------------------------------------------------------- normalisation
def _global_ranges(xs: list[torch.Tensor], reduce: Reduce) -> tuple[list[float], list[float], list[int]]:
    """(min, max, count) of each tensor over all its shards (an empty shard contributes nothing), in three
    all-reduces for the whole list."""
    if not xs:
        return [], [], []
    dev = xs[0].device
    inf = torch.tensor(math.inf, dtype=torch.float64, device=dev)
    lo = torch.stack([x.min().double() if x.numel() else inf for x in xs])
    hi = torch.stack([x.max().double() if x.numel() else -inf for x in xs])
    n = torch.tensor([float(x.numel()) for x in xs], dtype=torch.float64, device=dev)
    lo, hi, n = (reduce(t, op) for t, op in ((lo, "min"), (hi, "max"), (n, "sum")))
    return lo.tolist(), hi.tolist(), [int(v) for v in n.tolist()]


def _global_range(x: torch.Tensor, reduce: Reduce) -> tuple[float, float, int]:
    lo, hi, n = _global_ranges([x], reduce)
    return lo[0], hi[0], n[0]


def _bin_index(x: torch.Tensor, lo: float, hi: float, bins: int) -> torch.Tensor:
    """The bin of each element, for `bins` equal bins over [lo, hi], computed in x's dtype."""
    return (x - lo).div_(hi - lo).mul_(bins).floor_().clamp_(0, bins - 1).long()


def minmax(x: torch.Tensor, reduce: Reduce = local_reduce) -> torch.Tensor:
    """(x − min) / (max − min) with the tensor's global min and max; all zeros for a constant tensor."""
    lo, hi, _ = _global_range(x, reduce)
    return _scale_minmax(x, lo, hi)


def _scale_minmax(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    if not hi > lo:
        return torch.zeros_like(x)
    return ((x.double() - lo) / (hi - lo)).clamp_(0, 1).to(x.dtype)


def quantile_rank(x: torch.Tensor, bins: int = 1 << 16, reduce: Reduce = local_reduce) -> torch.Tensor:
    """Fraction of the tensor's elements below each element, from a global histogram of `bins` bins.

    One all-reduce of `bins` counts. Inside a bin the rank is interpolated linearly in value, so the error
    against the exact rank is at most that bin's share of the elements (plus 1/N); elements equal to the
    minimum get exactly 0 and the maximum exactly 1. Sharded and unsharded results are identical.
    """
    lo, hi, n = _global_range(x, reduce)
    if not hi > lo:
        return torch.zeros_like(x)
    xd = x.double()
    idx = _bin_index(xd, lo, hi, bins)
    counts = reduce(torch.bincount(idx, minlength=bins).double(), "sum")
    below = counts.cumsum(0) - counts
    width = (hi - lo) / bins
    frac = ((xd - lo - idx.double() * width) / width).clamp_(0, 1)
    return ((below[idx] + frac * counts[idx]) / n).clamp_(0, 1).to(x.dtype)


def kth_largest(x: torch.Tensor, k: int, reduce: Reduce = local_reduce, bins: int = 1024,
                max_rounds: int = 64) -> float:
    """The exact k-th largest value of the tensor over all shards (`kth_largest_many` of one tensor)."""
    return kth_largest_many([x], [k], reduce, bins, max_rounds)[0]


def mass_thresholds(vs: list[torch.Tensor], mass: float, reduce: Reduce, lo: list[float], hi: list[float],
                    rounds: int = 60) -> list[float]:
    """Per tensor (non-negative values, sharded), the largest τ with Σ_{v ≥ τ} v ≥ mass · Σ v: the smallest set
    of largest values holding that share. Bisection on [lo, hi], one all-reduce for all tensors per round; a
    tensor whose sum is 0 gets τ = inf (nothing holds relevance)."""
    dev = vs[0].device if vs else torch.device("cpu")
    total = reduce(torch.stack([v.sum() for v in vs]) if vs else torch.zeros(0, dtype=torch.float64, device=dev),
                   "sum")
    a = torch.tensor(lo, dtype=torch.float64, device=dev)  # S(a) >= target holds (a = the minimum)
    b = torch.tensor(hi, dtype=torch.float64, device=dev)
    target = total * mass
    top = reduce(torch.stack([v[v >= m].sum() for v, m in zip(vs, b.tolist(), strict=True)]), "sum")
    a = torch.where(top >= target, b, a)  # the maximum alone may hold the share
    for _ in range(rounds):
        mid = (a + b) / 2
        held = reduce(torch.stack([v[v >= m].sum() for v, m in zip(vs, mid.tolist(), strict=True)]), "sum")
        ok = held >= target
        a, b = torch.where(ok, mid, a), torch.where(ok, b, mid)
    return [math.inf if t <= 0 else v for v, t in zip(a.tolist(), total.tolist(), strict=True)]


def kth_largest_many(xs: list[torch.Tensor], ks: list[int], reduce: Reduce = local_reduce, bins: int = 1024,
                     max_rounds: int = 64,
                     ranges: tuple[list[float], list[float], list[int]] | None = None) -> list[float]:
    """The exact ks[i]-th largest value of each tensor over all its shards, by histogram refinement.

    Each round all-reduces `bins` counts per unfinished tensor (one all-reduce for all of them) and their
    ranges, keeps the bin holding the k-th value and shrinks the range to that bin's data; a range holding
    ≥ 2 distinct values always splits, so a tensor is done when its range is one value (typically 3–5 rounds
    for float32). After `max_rounds` it returns the range's low end. Batching the tensors makes the number of
    collectives independent of how many tensors a model has (a 70B Llama has 723). `ranges`: the tensors'
    `_global_ranges`, when the caller has them already.
    """
    lo, hi, n = (list(r) for r in ranges) if ranges is not None else _global_ranges(xs, reduce)
    for k, m in zip(ks, n, strict=True):
        if not 1 <= k <= m:
            raise ValueError(f"k must be in [1, {m}], got {k}")
    cur, need = list(xs), list(ks)  # the values still in each range: bins are monotone, so a bin holds all
    for _ in range(max_rounds):
        live = [i for i in range(len(xs)) if hi[i] > lo[i]]
        if not live:
            break
        # bins in x's own dtype: any monotone binning finds the same exact value, without a float64 copy
        counts = reduce(torch.stack([torch.bincount(_bin_index(cur[i], lo[i], hi[i], bins), minlength=bins).double()
                                     for i in live]), "sum")
        for c, i in zip(counts, live, strict=True):
            at_or_above = c.flip(0).cumsum(0).flip(0)
            j = int((at_or_above >= need[i]).nonzero().max())
            need[i] -= int(at_or_above[j] - c[j])
            # binned again rather than kept: one index tensor alive at a time, not one per tensor
            cur[i] = cur[i][_bin_index(cur[i], lo[i], hi[i], bins) == j]
        sub_lo, sub_hi, _ = _global_ranges([cur[i] for i in live], reduce)
        for i, a, b in zip(live, sub_lo, sub_hi, strict=True):
            lo[i], hi[i] = a, b
    return lo


def normalize(x: torch.Tensor, method: Method, top_frac: float = 0.2, bins: int = 1 << 16,
              reduce: Reduce = local_reduce, mass: float = 0.8, temperature: float = 0.0) -> torch.Tensor:
    """Per-tensor importance in [0, 1] from a flat local shard of an aggregate (`normalize_many` of one)."""
    return normalize_many([x], method, top_frac, bins, reduce, mass, temperature=temperature)[0]


def _mask(x: torch.Tensor, tau: float | torch.Tensor, lo: float, temperature: float) -> torch.Tensor:
    """1 where x ≥ tau (temperature 0) or σ((x − tau)/temperature), 0 at the tensor's minimum lo."""
    keep = x > lo
    if temperature == 0:
        return ((x >= tau) & keep).to(x.dtype)  # tau and lo are values of x: exact in its dtype
    return (torch.sigmoid((x.double() - tau) / temperature) * keep).to(x.dtype)


def normalize_many(xs: list[torch.Tensor], method: Method, top_frac: float = 0.2, bins: int = 1 << 16,
                   reduce: Reduce = local_reduce, mass: float = 0.8,
                   select: Literal["tensor", "global"] = "tensor", temperature: float = 0.0) -> list[torch.Tensor]:
    """Per-tensor importance in [0, 1] for each flat local shard, every tensor normalised on its own.

    minmax: (x − min)/(max − min); rank: `quantile_rank`; topk: 1 for the top `top_frac` of the tensor
    (x ≥ the exact ⌈top_frac·N⌉-th largest value; ties at the threshold are all kept), 0 elsewhere —
    except entries at the tensor's minimum, never marked, so that a constant or mostly-zero tensor (e.g.
    untouched embedding rows, CP-LRP's q/k) does not protect its zeros; mass: 1 for the smallest set of
    largest entries holding `mass` of the tensor's relevance, counted on the linear scale expm1(x) of the
    log-scaled aggregate (so the mask's size follows how concentrated the relevance is instead of being
    fixed), the minimum again never marked. minmax, topk and mass share their collectives over the list.
    select "global": one normalisation over all the tensors together (one threshold for the whole model)
    instead of one per tensor. temperature T > 0 (topk and mass): the soft mask σ((x − τ)/T) around the
    same threshold τ instead of the step, T in the log scale's units (T = 1: an element e times above τ
    is held 0.73, e times below 0.27).
    """
    for x in xs:
        if x.ndim != 1:
            raise ValueError(f"normalize works on a flat 1-D shard, got shape {tuple(x.shape)}")
    if select == "global" and len(xs) > 1:
        flat = normalize_many([torch.cat(xs)], method, top_frac, bins, reduce, mass, temperature=temperature)[0]
        return list(flat.split([x.numel() for x in xs]))
    if select not in ("tensor", "global"):
        raise ValueError(f"select must be 'tensor' or 'global', got {select!r}")
    if not (math.isfinite(temperature) and temperature >= 0) or (temperature and method not in ("topk", "mass")):
        raise ValueError(f"temperature must be a finite number >= 0, and 0 unless normalize is topk or mass; "
                         f"got {temperature} with {method!r}")
    if method == "rank":
        return [quantile_rank(x, bins, reduce) for x in xs]
    if method not in ("minmax", "topk", "mass"):
        raise ValueError(f"unknown normalisation {method!r}; expected 'minmax', 'rank', 'topk' or 'mass'")
    if method == "topk" and not 0 < top_frac <= 1:
        raise ValueError(f"top_frac must be in (0, 1], got {top_frac}")
    if method == "mass" and not 0 < mass <= 1:
        raise ValueError(f"mass must be in (0, 1], got {mass}")

    lo, hi, n = _global_ranges(xs, reduce)
    if method == "mass":
        taus = mass_thresholds([torch.expm1(x.double()) for x in xs], mass, reduce,
                               [math.expm1(v) for v in lo], [math.expm1(v) for v in hi])
        if temperature == 0:  # compared on the linear scale, where the threshold was found
            return [((torch.expm1(x.double()) >= t) & (x > a)).to(x.dtype)
                    for x, t, a in zip(xs, taus, lo, strict=True)]
        return [_mask(x, math.log1p(t), a, temperature) for x, t, a in zip(xs, taus, lo, strict=True)]
    if method == "minmax":
        return [_scale_minmax(x, a, b) for x, a, b in zip(xs, lo, hi, strict=True)]
    ranked = [i for i in range(len(xs)) if n[i] > 0]
    taus = kth_largest_many([xs[i] for i in ranked], [max(1, math.ceil(top_frac * n[i])) for i in ranked], reduce,
                            ranges=tuple([v[i] for i in ranked] for v in (lo, hi, n)))
    out = [torch.zeros_like(x) for x in xs]
    for i, tau in zip(ranked, taus, strict=True):
        out[i] = _mask(xs[i], tau, lo[i], temperature)
    return out
