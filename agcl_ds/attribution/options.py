"""How importance is estimated: the options of the attribution pass (`method.options.attribution`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from agcl_ds.config import ConfigError
from agcl_ds.importance.aggregate import Reduce, normalize_many


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
    normalize: Literal["topk", "mass", "rank", "minmax"] = "topk"
    top_frac: float = 0.2  # for normalize: topk (binary mask of the top fraction per tensor)
    mass: float = 0.8  # for normalize: mass (binary mask of the fewest elements holding this share of relevance)
    select: Literal["tensor", "global"] = "tensor"  # normalise each tensor on its own, or the model as one
    temperature: float = 0.0  # topk/mass: 0 a binary mask, T > 0 the soft mask σ((x − τ)/T) on the log scale
    n_samples: int = 64  # training examples explained per task (over all ranks)
    micro_batch_size: int = 8  # per rank
    block_elems: int = 1 << 23  # relevance values per kept sample in one hook block (memory: B × this × 4 bytes)
    # top-K on several ranks: what travels for a Linear weight, its per-sample maps or the factors of G_b
    # ("auto": whichever is fewer bytes, see `router.Router.factors`)
    exchange: Literal["auto", "values", "factors"] = "auto"

    def __post_init__(self) -> None:
        for key in ("top_frac", "mass"):
            value = getattr(self, key)
            if not 0 < value <= 1:
                raise ConfigError(f"attribution.{key}: expected a number in (0, 1], got {value}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConfigError(f"attribution.temperature: expected a finite number >= 0, got {self.temperature}")
        if self.temperature and self.normalize not in ("topk", "mass"):
            raise ConfigError(f"attribution.temperature: softens the topk or mass mask; normalize is "
                              f"{self.normalize!r}")

    def normalise(self, scores: list[torch.Tensor], reduce: Reduce) -> list[torch.Tensor]:
        """Aggregated scores (flat local shards, log scale) to importance in [0, 1] as these options say."""
        return normalize_many(scores, self.normalize, self.top_frac, reduce=reduce, mass=self.mass,
                              select=self.select, temperature=self.temperature)

