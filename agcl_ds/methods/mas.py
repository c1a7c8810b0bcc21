"""`mas`: Memory Aware Synapses (Aljundi et al. 2018) with the online anchor of agcl_ds.methods._anchor.

Ω_τ = mean over samples of |∂ℓ(x)/∂θ| with ℓ(x) = ‖f(x)‖², f the output logits at the answer
positions (squared L2 norm over the vocabulary, averaged over the answer positions). Labels are not
used: MAS measures how sensitive the learned function is, not the loss.

Only the reduced gradient is at hand under data parallelism: the mean over the B samples of a global
micro-batch, and |mean| ≤ mean|·| where the samples' gradients disagree in sign. The default micro-batch
is therefore one sample per rank, which is exact on one rank and mixes world-size samples per estimate
otherwise (B = world size); Ω_τ is then a lower bound that is tighter the more the samples agree.

The penalty and `normalize` are as for `ewc` (see agcl_ds.methods.ewc on choosing λ). Normalised to
mean 1, MAS's Ω is less concentrated than the squared gradients of the Fisher, so the same λ holds
more elements: on the demo (dec → add3, as measured for ewc) λ = 0.01 / 0.1 / 1 kept dec at
0.445 / 0.975 / 1.000 while add3 reached 0.985 / 0.975 / 0.625, hence the default λ = 0.1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from agcl_ds.methods._anchor import AnchorMethod, AnchorOptions


@dataclass
class MasOptions(AnchorOptions):
    lam: float = 0.1
    micro_batch_size: int = 1  # per rank: |mean gradient| mixes the samples of a micro-batch


class Mas(AnchorMethod):
    name = "mas"
    Options = MasOptions

    def token_objective(self, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return rows.square().sum(-1)

    def statistic(self, grad: torch.Tensor, batch: int) -> torch.Tensor:
        return grad.abs_()
