"""`freeze`: layer freezing, the structural baseline. After the first task, the bottom `fraction` of
the trainable Transformer blocks (and, with `embeddings: true`, the trainable embedding / lm_head
parameters) stop changing for the rest of the sequence; later tasks train only the rest.

Blocks are found from parameter names (`….layers.<i>.…`, GPT-2 `….h.<i>.…`) among the parameters the
optimizer trains, so a model whose lower blocks are already frozen (`model.train_top_layers`) freezes
the bottom share of what is left. The freeze is the gate's `update` placement with
a binary R̄ (1 = frozen): a frozen element is set back to its value before each optimizer step, so it
stays bit-identical under AdamW and decoupled weight decay, and it works per ZeRO shard (agcl_ds.gate).
The frozen set is a function of the parameter names and the options only: nothing to checkpoint.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from agcl_ds.config import ConfigError
from agcl_ds.gate import Gate, attach_gate
from agcl_ds.methods.base import Method, RunContext
from agcl_ds.models import BLOCK_NAME

if TYPE_CHECKING:
    from agcl_ds.data.types import Task
    from agcl_ds.importance.partition import ShardSpec

EMBEDDING = re.compile(r"(?:^|\.)(?:embed_tokens|embed_positions|wte|wpe|lm_head)\.")


@dataclass
class FreezeOptions:
    fraction: float = 0.5  # share of the trainable blocks frozen from the bottom, rounded down
    embeddings: bool = False  # also freeze trainable embedding / lm_head parameters


def frozen_names(names: list[str], fraction: float, embeddings: bool) -> tuple[list[str], list[int]]:
    """The parameter names the policy freezes, and the frozen block indices (bottom first)."""
    blocks = sorted({int(m.group(1)) for n in names if (m := BLOCK_NAME.search(n))})
    if not blocks:
        raise ConfigError("method.name: freeze found no Transformer blocks among the trained parameters "
                          "(expected names like '….layers.<i>.…' or '….h.<i>.…')")
    frozen = set(blocks[:math.floor(fraction * len(blocks))])
    chosen = [n for n in names if ((m := BLOCK_NAME.search(n)) and int(m.group(1)) in frozen)
              or (embeddings and EMBEDDING.search(n))]
    if not chosen:
        raise ConfigError(f"method.options.fraction: {fraction} of {len(blocks)} trainable blocks freezes none of "
                          "them; raise it (or set method.options.embeddings: true)")
    return chosen, sorted(frozen)


class Freeze(Method):
    name = "freeze"
    Options = FreezeOptions

    def __init__(self, options: FreezeOptions) -> None:
        super().__init__(options)
        if not 0 < options.fraction <= 1:
            raise ConfigError(f"method.options.fraction: expected a number in (0, 1], got {options.fraction}")
        self.gate: Gate | None = None

    def setup(self, ctx: RunContext) -> None:
        self.gate = attach_gate(ctx.engine, None, gate_on="update")
        specs = self.gate.layout.specs
        names, blocks = frozen_names(list(specs), self.options.fraction, self.options.embeddings)
        self.mask = binary_rbar(specs, set(names), self.gate.layout.numel, self.gate.layout.device)
        ctx.log.event("freeze", blocks=blocks, parameters=len(names))
        ctx.log.print(f"freeze: after the first task, blocks {blocks} and {len(names)} parameter tensors in all "
                      "stay fixed")

    def before_task(self, ctx: RunContext, index: int, task: Task) -> None:
        self.gate.set_importance(self.mask if index > 0 else None)


def binary_rbar(specs: dict[str, ShardSpec], frozen: set[str], numel: int,
                 device: torch.device) -> dict[str, torch.Tensor]:
    """R̄ = 1 on the frozen parameters' shards, as views into one bf16 flat buffer (the gate shares it)."""
    flat = torch.zeros(numel, dtype=torch.bfloat16, device=device)
    for name in frozen:
        flat.narrow(0, specs[name].flat_offset, specs[name].numel).fill_(1)
    return {n: flat.narrow(0, s.flat_offset, s.numel) for n, s in specs.items()}
