"""`agcl`: attribution-guided gating (AGFT, arXiv 2605.05285).

After task τ is trained, the LRP importance R_τ of every parameter element is estimated on samples
of τ (agcl_ds.attribution) and folded into the running element-wise maximum R̄ (the importance
store, 2 bytes per parameter split over the ranks). While every later task trains, each update is
scaled by s = 1 − α·R̄ (agcl_ds.gate). The first task trains ungated (R̄ = 0).

Importance comes from the continual model right after task τ (default: no extra training), or, as
in the paper, from a single-task model: the base model fine-tuned on τ alone with the same
settings — one extra fine-tune per task, and a second engine alive while it runs.

`anchor` (λ > 0) adds EWC's pull on top of the gate, with R̄ as the stiffness: the gradient of
(λ/2)·Σ R̄⊙(θ−θ*)², θ* the model after the latest task (online, 4 more bytes per parameter split over
the ranks). An element the gate holds completely (R̄ = 1 with alpha = 1, the binary maps) does not move
anyway; the anchor acts where the gate leaves an important element partly free: alpha < 1 or a graded
map (attribution.normalize rank/minmax), and on Adam moments carried across tasks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from agcl_ds.attribution import AttributionOptions, attribute
from agcl_ds.config import ConfigError
from agcl_ds.gate import Gate, attach_gate
from agcl_ds.importance import flatstate
from agcl_ds.importance.partition import flat_layout, gather_full, local_shards
from agcl_ds.importance.store import ImportanceStore
from agcl_ds.lrp.rules import SUPPORTED, check_supported
from agcl_ds.methods._anchor import add_anchor_gradient, copy_masters
from agcl_ds.methods.base import Method, RunContext
from agcl_ds.models import ModelError, model_type

if TYPE_CHECKING:
    from agcl_ds.config import ExperimentConfig
    from agcl_ds.data.types import Task


@dataclass
class AgclOptions:
    gate_on: Literal["auto", "grad", "update"] = "auto"  # auto: update under Adam-type optimizers
    alpha: float = 1.0  # s = 1 - alpha * R̄
    update_impl: Literal["auto", "fused", "snapshot"] = "auto"  # the update gate: fused into torch AdamW's step
    importance_from: Literal["continual", "single_task"] = "continual"
    attribution: AttributionOptions = field(default_factory=AttributionOptions)
    keep_task_maps: bool = False  # also keep each task's map in the store (+2 bytes/param per task), for `agcl overlap`
    # how the map is laid on LoRA adapters (model.peft; README "LoRA adapters"). elements: the element map as
    # for full fine-tuning. components (adapter shared): whole rank components held, row i of lora_A with
    # column i of lora_B, the top ceil(top_frac·r) of each module by mean importance; a held component's term
    # B[:, i]·A[i, :] of the update stays exactly as it was, where 20% of A's and B's elements leave the product
    # B·A free to change. rows (adapter per_task_merge, merged and restarted after each task): the rows of B
    # (the output units of the merged weights) in the top top_frac by the task's mean importance; B starts at
    # 0, so those rows of W stay as merged. Measured on per_task_merge (benchmarks/RESULTS.md, cpu-lora-merge,
    # 1 seed): BWT rows -0.160, elements -0.127, seq -0.153, within the benchmark's resolution of each other
    lora_gate: Literal["elements", "components", "rows"] = "elements"
    combine: Literal["max", "sum", "decay"] = "max"  # how task maps fold into R̄ (importance.store.add_task)
    decay: float = 0.5  # combine: decay, R̄ ← max(decay·R̄, R_τ)
    anchor: float = 0.0  # λ of the anchor (λ/2)·Σ R̄⊙(θ−θ*)² beside the gate (see the module docstring); 0: none


ANCHOR_DIR = "agcl_anchor"
ANCHOR_STATE = flatstate.Format("agcl_ds.agcl_anchor/1", "agcl anchor state")


class Agcl(Method):
    name = "agcl"
    Options = AgclOptions

    def __init__(self, options: AgclOptions) -> None:
        super().__init__(options)
        if not 0 <= options.decay <= 1:
            raise ConfigError(f"method.options.decay: expected a number in [0, 1], got {options.decay}")
        if not (math.isfinite(options.anchor) and options.anchor >= 0):
            raise ConfigError(f"method.options.anchor: expected a finite number >= 0, got {options.anchor}")
        self.store: ImportanceStore | None = None
        self.gate: Gate | None = None
        self.theta_star: torch.Tensor | None = None  # θ* of the anchor, flat fp32 (after the first task)

    def check(self, cfg: ExperimentConfig) -> None:
        """The LRP rules exist per architecture: an uncovered one would fail only after task 1."""
        gate, peft = self.options.lora_gate, cfg.model.peft
        need = {"components": ("shared",), "rows": ("per_task_merge",)}.get(gate)
        if need and (peft is None or peft.type != "lora" or peft.adapter not in need):
            raise ConfigError(f"method.options.lora_gate: {gate} needs model.peft type lora with adapter "
                              f"{need[0]}, got {'no model.peft' if peft is None else f'{peft.type}/{peft.adapter}'}")
        if self.options.anchor and cfg.training.precision == "fp16":
            raise ConfigError("method.options.anchor: needs bf16 or fp32 (under fp16 the gradient partition the "
                              "anchor adds to is loss-scaled)")
        kind = model_type(cfg.model)
        if kind is not None and kind not in SUPPORTED:
            raise ConfigError(f"method.name: agcl's LRP rules do not cover model_type {kind!r} of model.path "
                              f"{cfg.model.path!r} (supported: {', '.join(SUPPORTED)})")

    def setup(self, ctx: RunContext) -> None:
        try:  # a GGUF model's type is known only now
            check_supported(ctx.engine.module)
        except ValueError as e:
            raise ModelError(f"method agcl: {e}") from None
        meta = {"rules": self.options.attribution.variant, "attribution": asdict(self.options.attribution),
                "importance_from": self.options.importance_from}
        self.store = ImportanceStore.for_engine(ctx.engine, keep_tasks=self.options.keep_task_maps, meta=meta)
        self.layout = flat_layout(ctx.engine)
        self.device = self.layout.device
        if self.options.anchor and ctx.engine.zero_cpu_offload():
            raise ConfigError("method.options.anchor: adds to the gradient partition, which offload_optimizer "
                              "moves to the CPU during backward; drop offload_optimizer or the anchor")
        self.gate = attach_gate(ctx.engine, None, gate_on=self.options.gate_on, alpha=self.options.alpha,
                                update_impl=self.options.update_impl)
        ctx.log.event("gate", mode=self.gate.mode, update_impl=self.gate.update_impl, alpha=self.options.alpha)

    def before_step(self, ctx: RunContext) -> None:
        if self.theta_star is not None:
            add_anchor_gradient(ctx.engine, self.layout, self.store.rbar_flat, self.theta_star, self.options.anchor)

    def before_task(self, ctx: RunContext, index: int, task: Task) -> None:
        has_importance = index > 0 and bool(self.store.tasks)
        self.gate.set_importance(self.store.rbar if has_importance else None)

    def after_task(self, ctx: RunContext, index: int, task: Task) -> None:
        if index == len(ctx.tasks) - 1:
            return  # no later task to protect
        self.gate.set_importance(None)
        if self.options.importance_from == "continual":
            importance, n = self._attribute(ctx, ctx.engine, task)
        else:
            importance, n = self._single_task_importance(ctx, index, task)
        if self.options.lora_gate != "elements":
            importance = self._structured(importance)
        self.store.add_task(task.name, importance, self.options.combine, self.options.decay)
        if self.options.anchor:
            if self.theta_star is None:
                self.theta_star = torch.empty(self.layout.numel, dtype=torch.float32, device=self.device)
            with torch.no_grad():
                copy_masters(self.layout, self.theta_star)
        share = sum(float(v.float().sum()) for v in importance.values())
        total = sum(v.numel() for v in importance.values())
        ctx.log.event("importance", task=task.name, samples=n, mean=share / max(1, total))
        ctx.log.print(f"importance of {task.name}: {n} samples explained; mean importance on rank 0 "
                      f"{share / max(1, total):.3f}")
        if n == 0:
            ctx.log.print(f"warning: no sample of {task.name} was answered correctly; its importance is zero")

    def _structured(self, importance: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The `lora_gate` rows or components design (collective): a binary map of whole rows of each lora_B,
        or of whole rank components (row of lora_A, column of lora_B), chosen by mean importance; the
        adapter's other elements 0, tensors outside the adapters keep their element map."""
        specs = self.store.specs
        full = gather_full({n: t.float() for n, t in importance.items()}, specs)
        frac, components = self.options.attribution.top_frac, self.options.lora_gate == "components"
        maps = {n: full[n].view(s.full_shape) for n, s in specs.items()}
        for name in specs:
            if ".lora_B." not in name:
                continue
            a_name, b = name.replace(".lora_B.", ".lora_A."), maps[name]  # b: [out, r]; peft pairs every B with an A
            a, maps[a_name] = maps[a_name], torch.zeros_like(maps[a_name])  # a: [r, in]
            maps[name] = torch.zeros_like(b)
            if components:
                score = b.mean(0) + a.mean(1)
                top = score.topk(max(1, math.ceil(frac * score.numel()))).indices
                maps[name][:, top] = 1.0
                maps[a_name][top] = 1.0
            else:
                score = b.mean(1)
                maps[name][score.topk(max(1, round(frac * score.numel()))).indices] = 1.0
        return {n: maps[n].reshape(-1).narrow(0, s.start, s.numel).to(importance[n]) for n, s in specs.items()}

    def _attribute(self, ctx: RunContext, engine, task: Task):
        return attribute(engine, ctx.tokenizer, task.train, self.options.attribution, ctx.cfg.data.max_seq_len,
                         seed=ctx.cfg.seed)

    def _single_task_importance(self, ctx: RunContext, index: int, task: Task):
        """Fine-tune a fresh copy of the base on this task alone, explain it, and free it."""
        from agcl_ds.engine import build_engine, train_task
        from agcl_ds.models import load_model

        loaded = load_model(ctx.cfg, ctx.ds_config, path_override=ctx.base_dir)
        engine = build_engine(loaded, ctx.ds_config)
        if local_shards(engine) != self.store.specs:
            raise RuntimeError("single-task engine is partitioned differently from the continual engine")
        train_task(engine, ctx.tokenizer, task.train, index, steps=ctx.cfg.training.steps_per_task,
                   lr=ctx.cfg.training.lr, cfg=ctx.cfg, log=ctx.log, desc=f"[agcl] single-task {task.name}")
        try:
            return self._attribute(ctx, engine, task)
        finally:
            engine.destroy()

    def save(self, folder: str) -> None:
        self.store.save(folder)
        if self.options.anchor:
            tensors = {} if self.theta_star is None else {"theta_star": self.theta_star}
            flatstate.save(Path(folder) / ANCHOR_DIR, ANCHOR_STATE, self.layout.specs, self.layout.stage, tensors, {})

    def load(self, folder: str) -> None:
        self.store = ImportanceStore.load(folder, self.store.specs, device=self.device,
                                          zero_stage=self.store.zero_stage)
        if self.options.anchor:
            if not (Path(folder) / ANCHOR_DIR).is_dir():
                raise ValueError(f"{folder}: no {ANCHOR_DIR}/ (the checkpoint was written without "
                                 "method.options.anchor)")
            tensors, _ = flatstate.load(Path(folder) / ANCHOR_DIR, ANCHOR_STATE, self.layout.specs, self.layout.numel,
                                        torch.float32, self.device)
            self.theta_star = tensors.get("theta_star")
