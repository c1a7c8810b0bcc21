"""`olora`: O-LoRA (Wang et al., EMNLP 2023 Findings), orthogonal per-task LoRA subspaces.

Every task has its own adapter (`model.peft.adapter: per_task`; all of them summed in the forward).
While task t trains, only adapter t moves: the other adapters' updates are gated to exactly zero
(the update gate of agcl_ds.gate with s = 0, bit-identical, weight decay included), because the
optimizer's parameter set is fixed when the engine is built. The loss adds

    lam_orth · Σ_layers Σ_{τ<t} Σ |A_τ A_tᵀ|     (A_t's rows orthogonal to earlier tasks' subspaces)
  + lam_l2 / 2 · Σ_layers (‖A_t‖² + ‖B_t‖²)

The terms are taken in forward pre-hooks of task t's lora_A / lora_B modules, where ZeRO-3 has just
gathered their weights, so gradients reach the partitions the ordinary way. The earlier A_τ are
frozen and small (r × in per layer); each rank keeps a copy, rebuilt from the engine in
`before_task`, so nothing extra is checkpointed. Memory: r · Σ in_features · t floats per rank
(SmolLM2-135M, r = 8, 7 projections × 30 blocks: 1.4M floats per finished task).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from agcl_ds.config import ConfigError
from agcl_ds.gate import Gate, attach_gate
from agcl_ds.importance.partition import local_shards
from agcl_ds.methods.base import Method, RunContext

if TYPE_CHECKING:
    from agcl_ds.config import ExperimentConfig
    from agcl_ds.data.types import Task


@dataclass
class OloraOptions:
    lam_orth: float = 0.5  # λ1 of the paper
    lam_l2: float = 0.0  # λ2 of the paper (0 in most of its runs)


def _slot(name: str) -> int | None:
    """The task index of a per-task adapter parameter (`...lora_A.task3.weight` -> 3), else None."""
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p in ("lora_A", "lora_B") and parts[i + 1].startswith("task"):
            return int(parts[i + 1][4:])
    return None


class Olora(Method):
    name = "olora"
    Options = OloraOptions

    def __init__(self, options: OloraOptions) -> None:
        super().__init__(options)
        if options.lam_orth < 0 or options.lam_l2 < 0:
            raise ValueError("method.options.lam_orth / lam_l2: expected numbers >= 0")
        self.gate: Gate | None = None
        self.terms: list[torch.Tensor] = []
        self.handles: list = []

    def check(self, cfg: ExperimentConfig) -> None:
        if cfg.model.peft is None:
            raise ConfigError("method olora: trains LoRA adapters; set model.peft (with adapter: per_task)")

    def setup(self, ctx: RunContext) -> None:
        self.specs = local_shards(ctx.engine)
        if any(_slot(n) is None for n in self.specs):
            raise ConfigError("method olora: every trained parameter must be a per-task LoRA adapter")
        self.gate = attach_gate(ctx.engine, None, gate_on="auto")
        self.lora = [m for m in ctx.engine.module.modules() if hasattr(m, "lora_A") and len(m.lora_A)]
        ctx.log.event("gate", mode=self.gate.mode, update_impl=self.gate.update_impl, alpha=1.0)

    def before_task(self, ctx: RunContext, index: int, task: Task) -> None:
        device = self.gate.layout.device
        self.gate.set_importance({n: torch.full((s.numel,), float(_slot(n) != index), device=device)
                                  for n, s in self.specs.items()})
        for h in self.handles:
            h.remove()
        self.handles, self.terms = [], []
        key = f"task{index}"
        for layer in self.lora:
            earlier = self._earlier(layer, index)
            a, b = layer.lora_A[key], layer.lora_B[key]
            self.handles.append(a.register_forward_pre_hook(self._hook(earlier, l2=True)))
            if self.options.lam_l2:
                self.handles.append(b.register_forward_pre_hook(self._hook(None, l2=True)))

    @staticmethod
    def _earlier(layer: torch.nn.Module, index: int) -> torch.Tensor | None:
        """[Σ_τ<t r_τ, in]: earlier tasks' A stacked (collective under ZeRO-3: each is gathered once)."""
        import deepspeed

        rows = []
        for i in range(index):
            w = layer.lora_A[f"task{i}"].weight
            with deepspeed.zero.GatheredParameters([w], enabled=hasattr(w, "ds_id")):
                rows.append(w.detach().float().clone())
        return torch.cat(rows) if rows else None

    def _hook(self, earlier: torch.Tensor | None, l2: bool):
        lam_orth, lam_l2 = self.options.lam_orth, self.options.lam_l2

        def hook(mod: torch.nn.Module, args: tuple) -> None:
            if not (mod.training and torch.is_grad_enabled()):
                return
            w = mod.weight
            if earlier is not None and lam_orth:
                self.terms.append(lam_orth * (earlier.to(w.dtype) @ w.t()).abs().sum())
            if l2 and lam_l2:  # Σ w·sg(w): its gradient is w, as of ½‖w‖², without saving w for backward
                self.terms.append(lam_l2 * (w * w.detach().clone()).sum())

        return hook

    def loss_term(self, ctx: RunContext, batch: dict[str, torch.Tensor], outputs) -> torch.Tensor | None:
        terms, self.terms = self.terms, []
        return torch.stack([t.float() for t in terms]).sum() if terms else None

    def after_task(self, ctx: RunContext, index: int, task: Task) -> None:
        for h in self.handles:
            h.remove()
        self.handles, self.terms = [], []
