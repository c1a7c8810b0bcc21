"""`hft`: Half Fine-Tuning (Hui et al., ACL 2024), the cheap structural baseline.

For every task (the first included) a seeded random half of the trained parameter tensors is frozen
and the other half trains. The halves are drawn per group so that every part of the model keeps some
plasticity: within each Transformer block the attention tensors and the MLP tensors are halved
separately, and so are the remaining tensors of each block and those outside the blocks (embeddings,
final norm, head). A group of n tensors freezes floor(n/2) (a single tensor stays trainable).

The freeze is the gate's `update` placement with a binary R̄ (agcl_ds.gate): a frozen element stays
bit-identical under AdamW and decoupled weight decay, per ZeRO shard. The halves are a function of the
seed, the task index and the parameter names only: nothing to checkpoint.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from agcl_ds.gate import Gate, attach_gate
from agcl_ds.methods.base import Method, RunContext
from agcl_ds.methods.freeze import binary_rbar
from agcl_ds.models import BLOCK_NAME

if TYPE_CHECKING:
    from agcl_ds.data.types import Task


def _group(name: str) -> tuple[int, str]:
    """(block index or -1, part) of a parameter name: the unit within which half is frozen."""
    m = BLOCK_NAME.search(name)
    block = int(m.group(1)) if m else -1
    if any(k in name for k in (".self_attn.", ".attn.", ".attention.")):
        return block, "attention"
    if ".mlp." in name:
        return block, "mlp"
    return block, "other"


def frozen_half(names: list[str], seed: int, task: int) -> list[str]:
    """The tensors HFT freezes for task `task`: floor(n/2) of each group, drawn with a seeded RNG."""
    groups: dict[tuple[int, str], list[str]] = {}
    for n in sorted(names):
        groups.setdefault(_group(n), []).append(n)
    rng = random.Random(f"hft:{seed}:{task}")
    return sorted(n for key in sorted(groups) for n in rng.sample(groups[key], len(groups[key]) // 2))


class Hft(Method):
    name = "hft"

    def __init__(self, options) -> None:
        super().__init__(options)
        self.gate: Gate | None = None

    def setup(self, ctx: RunContext) -> None:
        self.gate = attach_gate(ctx.engine, None, gate_on="update")

    def before_task(self, ctx: RunContext, index: int, task: Task) -> None:
        layout = self.gate.layout
        frozen = frozen_half(list(layout.specs), ctx.cfg.seed, index)
        self.gate.set_importance(binary_rbar(layout.specs, set(frozen), layout.numel, layout.device))
        ctx.log.event("hft", task=task.name, frozen=len(frozen), trained=len(layout.specs) - len(frozen))
