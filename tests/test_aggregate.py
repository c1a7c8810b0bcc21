"""Aggregation over samples and per-tensor normalisation, against naive references."""

from __future__ import annotations

import math

import pytest
import torch
from _dist import run_ranks

from agcl_ds.importance.aggregate import (
    LogScale,
    PowerMean,
    TopKMean,
    dist_reduce,
    insert_sorted,
    kth_largest,
    normalize,
    normalize_many,
    quantile_rank,
)


def heavy_tailed(b: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(b, n, generator=g).exp().pow(3)  # log-normal-ish, like |R|
    r[:, :n // 10] = 0.0  # untouched entries (embedding rows, unpredicted lm_head rows)
    return r


@pytest.mark.parametrize("k", [1, 3, 8])
def test_topk_mean_matches_naive(k):
    vals = heavy_tailed(13, 50)
    agg = TopKMean(50, k)
    assert torch.equal(agg.result(), torch.zeros(50))
    for chunk in vals.split([2, 0, 5, 6]):  # micro-batches, one empty, the first smaller than k
        agg.update(chunk)
    ref = vals.topk(k, dim=0).values.mean(0)
    torch.testing.assert_close(agg.result(), ref, rtol=1e-6, atol=0)
    phi = LogScale(scale=0.7)  # monotone: the top K of φ(r) are φ of the top K of r
    torch.testing.assert_close(agg.result(phi.apply_), phi(vals).topk(k, dim=0).values.mean(0), rtol=1e-6, atol=0)
    few = TopKMean(50, 20)
    few.update(vals[:4])
    torch.testing.assert_close(few.result(), vals[:4].mean(0))  # fewer samples than K: mean of all seen


@pytest.mark.parametrize("k", [1, 2, 3, 4, 8, 16])
def test_insert_sorted_keeps_the_k_largest(k):
    """Whole groups of K rows (sorting network + bitonic merge), leftover rows (sinking), column chunks
    and ties all give exactly topk(cat(buf, rows)); the rows themselves are left as they were."""
    g = torch.Generator().manual_seed(k)
    for b in (0, 1, 5, 8, 16, 19, 33):
        for n in (1, 7, 300):
            buf = torch.randint(0, 5, (k, n), generator=g).float().sort(0, descending=True).values
            rows = torch.randint(0, 5, (b, n), generator=g).float()
            want, before = torch.cat([buf, rows]).topk(k, dim=0).values, rows.clone()
            insert_sorted(buf, rows, cols=64)
            assert torch.equal(buf, want) and torch.equal(rows, before), (b, n)


def test_topk_floor_lets_zeros_be_skipped():
    """With floor 0, leaving out every zero a sample has (untouched rows) gives the same top-K mean."""
    vals = heavy_tailed(13, 50)
    vals[:, 5] = 0.0  # an entry no sample touches
    agg = TopKMean(50, 4, floor=0.0)
    for i, sample in enumerate(vals):
        agg.seen += 1
        live = sample.nonzero().flatten()
        sub = agg.buf[:, live]
        insert_sorted(sub, sample[live][None])
        agg.buf[:, live] = sub
        if i == 1:  # fewer samples than K: still the mean of those seen
            torch.testing.assert_close(agg.result(), vals[:2].mean(0), rtol=1e-6, atol=0)
    torch.testing.assert_close(agg.result(), vals.topk(4, dim=0).values.mean(0), rtol=1e-6, atol=0)


@pytest.mark.parametrize("p", [3.0, 4.0])  # 4: the in-place squaring path
def test_power_mean_matches_naive_and_is_sum_reducible(p):
    vals = heavy_tailed(12, 40).log1p()
    agg = PowerMean(40, p=p, dtype=torch.float64)
    for chunk in vals.split(5):
        agg.update(chunk)
    ref = vals.double().pow(p).mean(0).pow(1 / p)
    torch.testing.assert_close(agg.result(), ref, rtol=1e-12, atol=0)
    split = PowerMean(40, p=p, dtype=torch.float64)  # two "ranks": sum their partials, then add once
    before = vals.clone()
    split.add(split.partial(vals[:7]) + split.partial(vals[7:]), 12)
    assert torch.equal(vals, before)  # partial leaves the caller's values alone unless told to consume them
    torch.testing.assert_close(split.result(), ref, rtol=1e-12, atol=0)
    handed = vals.double()[:, 5:25]  # a column slice, as the router hands over
    torch.testing.assert_close(split.partial(handed, consume=True), before.double()[:, 5:25].pow(p).sum(0),
                               rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match=r"\[B, 40\]"):
        agg.update(vals[0])


def test_log_scale_fixes_scale_on_first_nonzero_batch():
    phi = LogScale()
    assert torch.equal(phi(torch.zeros(2, 5)), torch.zeros(2, 5)) and phi.scale is None
    r = heavy_tailed(4, 30)
    out = phi(r)
    assert phi.scale == pytest.approx(r.double().mean().item())
    torch.testing.assert_close(out, torch.log1p(r / r.mean()))
    torch.testing.assert_close(phi(3 * r), torch.log1p(3 * r / r.mean()))  # fixed after the first batch
    with pytest.raises(ValueError):
        LogScale(scale=0.0)


@pytest.mark.parametrize("method", ["minmax", "rank", "topk"])
def test_normalisation_stays_in_unit_interval(method):
    x = TopKMean(1000, 4)
    x.update(LogScale()(heavy_tailed(16, 1000)))
    u = normalize(x.result(), method, top_frac=0.1)
    assert u.shape == (1000,) and u.min() >= 0 and u.max() <= 1 and torch.isfinite(u).all()
    assert torch.equal(normalize(torch.full((7,), 3.0), method), torch.zeros(7))  # constant: nothing stands


def test_minmax_values():
    x = torch.tensor([2.0, 4.0, 3.0, 6.0])
    torch.testing.assert_close(normalize(x, "minmax"), torch.tensor([0.0, 0.5, 0.25, 1.0]))


def test_rank_is_close_to_exact_ranks():
    x = torch.randn(5000, generator=torch.Generator().manual_seed(1)).exp()
    u = quantile_rank(x, bins=4096)
    exact = x.argsort().argsort().double() / (x.numel() - 1)
    assert (u.double() - exact).abs().max() < 5e-3 and u.min() == 0 and u.max() == 1


@pytest.mark.parametrize("frac", [0.01, 0.1, 0.3, 1.0])
def test_topk_binarisation_is_exact(frac):
    x = heavy_tailed(1, 3001, seed=2)[0]
    k = math.ceil(frac * x.numel())
    assert kth_largest(x, k) == x.double().topk(k).values[-1].item()
    m = normalize(x, "topk", top_frac=frac)
    thr = x.topk(k).values[-1]
    assert torch.equal(m.bool(), (x >= thr) & (x > 0))  # zeros (the minimum) are never marked
    assert m.sum() >= min(k, int((x > 0).sum()))
    ties = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.5])  # ties at the threshold are all kept
    assert normalize(ties, "topk", top_frac=0.4).tolist() == [0, 1, 1, 1, 0]


@pytest.mark.parametrize("mass", [0.3, 0.8, 1.0])
def test_mass_mask_is_the_fewest_entries_holding_the_share(mass):
    x = TopKMean(3001, 4)
    x.update(LogScale()(heavy_tailed(8, 3001, seed=5)))
    x = x.result()
    m = normalize(x, "mass", mass=mass)
    v = torch.expm1(x.double())
    ranked = v.sort(descending=True).values
    need = int((ranked.cumsum(0) < mass * v.sum() * (1 - 1e-12)).sum()) + 1  # the smallest such set
    positive = int((x > x.min()).sum())
    assert int(m.sum()) == min(need, positive)
    assert torch.equal(m.bool(), (v >= ranked[int(m.sum()) - 1]) & (x > x.min()))  # the largest entries
    parts = [x[:1000], x[1000:]]  # select global: one threshold for the concatenation
    assert torch.equal(torch.cat(normalize_many(parts, "mass", mass=mass, select="global")), m)
    assert torch.equal(torch.cat(normalize_many(parts, "topk", top_frac=0.1, select="global")),
                       normalize(x, "topk", top_frac=0.1))


@pytest.mark.parametrize("method", ["topk", "mass"])
def test_soft_mask_is_a_sigmoid_around_the_same_threshold(method):
    x = TopKMean(3001, 4)
    x.update(LogScale()(heavy_tailed(8, 3001, seed=7)))
    x = x.result()
    hard = normalize(x, method, top_frac=0.1, mass=0.8)
    tau = x[hard.bool()].min().double()  # the step's threshold: its smallest held value
    soft = normalize(x, method, top_frac=0.1, mass=0.8, temperature=0.5)
    want = torch.sigmoid((x.double() - tau) / 0.5) * (x > x.min())
    if method == "mass":  # its threshold lies between two values of x: the step is at the held one or below
        assert bool((soft[hard.bool()] >= 0.5 - 1e-6).all()) and bool((soft[~hard.bool()] <= 0.5 + 1e-6).all())
    else:
        torch.testing.assert_close(soft.double(), want, rtol=1e-6, atol=1e-7)
    assert bool((soft[x == x.min()] == 0).all())  # the minimum stays unprotected
    cold = normalize(x, method, top_frac=0.1, mass=0.8, temperature=1e-9)  # the step again (no tie at τ here)
    assert bool(((cold - hard).abs() <= 0.5).all()) and (cold.round() == hard).float().mean() > 0.999
    with pytest.raises(ValueError, match="temperature"):
        normalize(x, "rank", temperature=1.0)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="unknown normalisation"):
        normalize(torch.ones(3), "max")
    with pytest.raises(ValueError, match="top_frac"):
        normalize(torch.ones(3), "topk", top_frac=0.0)
    with pytest.raises(ValueError, match="flat"):
        normalize(torch.ones(2, 2), "rank")
    with pytest.raises(ValueError, match="k >= 1"):
        TopKMean(3, 0)


def _sharded_normalise(tmp: str, x: torch.Tensor, cuts: list[int]) -> dict[str, torch.Tensor]:
    rank = torch.distributed.get_rank()
    shard = x[cuts[rank]:cuts[rank + 1]]
    red = dist_reduce()
    out = {m: normalize(shard, m, top_frac=0.05, reduce=red) for m in ("minmax", "rank", "topk", "mass")}
    # several tensors at once (their collectives shared): each as if alone, one of them empty on this rank
    parts = [shard, shard[:0] if rank else shard, (shard * 3).round_()]
    out["many"] = normalize_many(parts, "topk", top_frac=0.05, reduce=red)
    return out


@pytest.mark.slow
def test_sharded_normalisation_equals_unsharded():
    x = TopKMean(2000, 4)
    x.update(LogScale()(heavy_tailed(8, 2000, seed=3)))
    x = x.result()
    for cuts in ([0, 1200, 2000], [0, 0, 2000]):  # uneven shards, and an empty one (a ZeRO-1/2 fragment)
        out = run_ranks(_sharded_normalise, x, cuts)
        for m in ("minmax", "rank", "topk", "mass"):
            torch.testing.assert_close(torch.cat([o[m] for o in out]), normalize(x, m, top_frac=0.05),
                                       rtol=1e-6, atol=1e-7)
        alone = [x, x[cuts[0]:cuts[1]], (x * 3).round_()]  # rank 1's second shard is empty
        for i, want in enumerate(alone):
            got = torch.cat([o["many"][i] for o in out])
            assert torch.equal(got, normalize(want, "topk", top_frac=0.05)), i
