"""`ewc`: Elastic Weight Consolidation (Kirkpatrick et al. 2017) in its online form (Schwarz et al. 2018).

Ω_τ is the diagonal empirical Fisher of task τ's training loss: E_x[(∂ℓ(x)/∂θ)²] with ℓ the mean
next-token NLL of the gold answer (not labels sampled from the model). Under data parallelism only the
reduced gradient is at hand, the mean ḡ = (1/B)·Σ_i ∇ℓ_i over the B samples of a global micro-batch,
so Ω_τ uses the mini-batch estimator B·ḡ²: its expectation is F + (B−1)·μ² with μ the mean gradient,
i.e. it is unbiased where the task's loss is at a stationary point (μ ≈ 0, where the Fisher matters)
and overestimates elements with a persistent gradient. B = micro_batch_size × world size.

Choosing λ (penalty (λ/2)·Σ Ω(θ−θ*)², see agcl_ds.methods._anchor): raw Fisher values of an LM are
tiny and depend on the model (mean 7.5e-8 per element for the demo's 0.7M-parameter Llama), so a λ
for the raw Fisher does not carry over from one model or paper to another. By default each task's
Ω_τ is divided by its mean over all elements (`normalize: mean`), so λ is the stiffness of an element
of average importance: an element drifted by Δ from θ* gets the gradient λ·Ω·Δ and stops moving
where that matches its data gradient. Important elements (Ω ≫ 1) are then held and unimportant ones
(Ω ≪ 1) stay nearly free.
Measured on the demo (configs/demo_synthetic.yaml, tasks dec → add3, AdamW lr 3e-4, 150 steps per task, ZeRO-3
on 2 ranks, one seed): λ = 0.1 / 1 / 10 / 100 kept dec at 0.645 / 1.000 / 0.995 / 1.000 exact match
while add3 reached 0.980 / 0.975 / 0.910 / 0.630 (seq: dec 0.475, add3 0.985). Hence the default
λ = 1; raise it tenfold if forgetting remains, lower it if new tasks stop being learned.
`normalize: max` (Ω_τ ≤ 1) bounds the stiffness instead: plain SGD stays stable while
lr·λ·(finished tasks) < 2. `normalize: none` keeps the raw Fisher (λ then in the papers' units).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from agcl_ds.methods._anchor import AnchorMethod


class Ewc(AnchorMethod):
    name = "ewc"

    def token_objective(self, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(rows, targets, reduction="none")

    def statistic(self, grad: torch.Tensor, batch: int) -> torch.Tensor:
        return grad.square_().mul_(batch)
