"""The attribution pass: per-element importance of every trainable parameter for one task, computed
on the (possibly ZeRO-3-partitioned) engine and left on each rank for exactly its own shard.

    samples ─► lrp_rules(model) ─► PerSampleRelevance (hooks, one module's weight gathered at a time)
            ─► route each row block to the rank owning it ─► top-K of |R_b| per element, mean of φ = log1p(·/s)
               over them (or the power mean of φ(|R_b|)) ─► normalise per tensor to [0, 1]

How relevance reaches the rank owning each shard is agcl_ds.attribution.router's; the options are
agcl_ds.attribution.options's.
"""

from __future__ import annotations

import contextlib
import math
import random

import torch

from agcl_ds import distributed as D
from agcl_ds.attribution.options import AttributionOptions
from agcl_ds.attribution.router import Router, world_reduce
from agcl_ds.data.collate import Tokenizer, collate
from agcl_ds.data.types import Example
from agcl_ds.importance.partition import ShardSpec, local_shards
from agcl_ds.lrp.relevance import PerSampleRelevance
from agcl_ds.lrp.rules import lrp_rules

__all__ = ["AttributionOptions", "attribute", "pick_samples"]


def _random_importance(specs: dict[str, ShardSpec], opts: AttributionOptions, seed: int) -> dict[str, torch.Tensor]:
    """The control: uniform random scores through the same normalisation (same sparsity as `lrp`)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + D.rank())
    reduce = world_reduce()
    names = sorted(specs)
    scores = [torch.rand(specs[n].numel, generator=gen).to(D.device()) for n in names]
    return dict(zip(names, opts.normalise(scores, reduce), strict=True))


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
    router = Router(specs, opts, D.device())
    module = engine.module
    was_training = module.training
    rules = lrp_rules(module, variant=opts.variant) if opts.source == "lrp" else contextlib.nullcontext()
    with rules, PerSampleRelevance(module, router, opts.block_elems, wanted=specs, factors=router.factors) as hooks:
        for b in range(n_batches):
            chunk = mine[b * opts.micro_batch_size:(b + 1) * opts.micro_batch_size] or mine[:1] or samples[:1]
            batch = {k: v.to(D.device()) for k, v in collate(tok, chunk, max_len).items()}
            real = len(mine[b * opts.micro_batch_size:(b + 1) * opts.micro_batch_size])
            if real == 0:  # this rank ran out: take part in the collectives, explain nothing
                batch["labels"] = torch.full_like(batch["labels"], -100)
            keep = hooks.run(batch, target=opts.target, positions=opts.positions,
                             only_correct=opts.only_correct or real == 0, on_keep=router.begin)
            router.flush()
            router.kept += int(keep.sum())
    module.train(was_training)
    total = int(D.all_sum([float(router.kept)])[0])
    return router.result(), total
