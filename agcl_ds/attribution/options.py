"""How importance is estimated: the options of the attribution pass (`method.options.attribution`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


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
    # top-K on several ranks: what travels for a Linear weight, its per-sample maps or the factors of G_b
    # ("auto": whichever is fewer bytes, see `router.Router.factors`)
    exchange: Literal["auto", "values", "factors"] = "auto"
