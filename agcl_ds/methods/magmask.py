"""`magmask`: the cheap-importance control of agcl, a magnitude × gradient top-k mask in the style of
Recurrent-KIF: importance |w ⊙ ∇_w ℓ|, ℓ the gold answer's cross-entropy, on every sample (not only
those answered correctly), then the same top-20% binary mask per tensor, max over tasks and update gate
as agcl. Only the importance signal differs from agcl (LRP relevance of the predicted logit), so the two
on the same runs answer whether LRP relevance is better than cheap importance.

It is agcl with other defaults for `attribution` (source grad_x_weight, target loss, only_correct
false), kept when `method.options.attribution` sets other keys; every agcl option applies.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field

from agcl_ds.attribution import AttributionOptions
from agcl_ds.methods.agcl import Agcl, AgclOptions

_HINTS = typing.get_type_hints(AttributionOptions)
Source, Target = _HINTS["source"], _HINTS["target"]


@dataclass
class MagnitudeGradient(AttributionOptions):
    source: Source = "grad_x_weight"
    target: Target = "loss"
    only_correct: bool = False


@dataclass
class MagmaskOptions(AgclOptions):
    attribution: MagnitudeGradient = field(default_factory=MagnitudeGradient)


class Magmask(Agcl):
    name = "magmask"
    Options = MagmaskOptions
