"""Quadratic-anchor methods (`ewc`, `mas`): after each task, an importance Ω per parameter element and an
anchor θ*; every later update is pulled back towards θ* in proportion to Ω.

Penalty: (λ/2)·Σ Ω⊙(θ−θ*)², whose gradient λ·Ω⊙(θ−θ*) is added to this rank's reduced gradient
partition in `before_step` (after backward, before DeepSpeed takes the norm, clips and steps, so
clipping sees it). θ is read from the optimizer's fp32 masters (`FlatLayout.masters`), never from
`p.data`; gradients are reached through `partition.grad_segments`, never `p.grad`.

Consolidation is the "online" form (Schwarz et al. 2018, online EWC with γ = 1): Ω is the sum of the
per-task importances Ω_τ (each normalised per `normalize`) and θ* is the model after the latest task,
so the state is two fp32 flat tensors in this rank's flat layout, 8 bytes per trainable parameter
split over the ranks (the estimation pass adds a transient 4 bytes for Ω_τ). The exact multi-anchor
sum Σ_τ Ω_τ(θ−θ*_τ)² would need one anchor per task.

Importance pass: `n_samples` training examples of the finished task (a seeded choice, the same on
every rank), taken in global micro-batches of `micro_batch_size` × world size; rank r takes every
world-th example of each. Per micro-batch: forward, `engine.backward` of the per-sample objective
scaled so that the reduced gradient is the mean over the global micro-batch's samples, one statistic
of that gradient accumulated, and the gradients dropped without an optimizer step. Parameters,
optimizer state, gates and the model's train/eval mode are left as they were.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
import torch.distributed as dist

from agcl_ds import distributed as D
from agcl_ds.attribution import pick_samples
from agcl_ds.config import ConfigError
from agcl_ds.data.collate import IGNORE, Tokenizer, collate
from agcl_ds.importance import flatstate
from agcl_ds.importance.partition import FlatLayout, flat_layout, grad_segments
from agcl_ds.methods.base import Method, RunContext

if TYPE_CHECKING:
    from agcl_ds.config import ExperimentConfig
    from agcl_ds.data.types import Example, Task

CHUNK = 1 << 22  # elements per fp32 temporary (penalty, statistic)
SUBDIR = "anchor"
STATE = flatstate.Format("agcl_ds.anchor/2", "anchor state")  # /1 had no checksums


@dataclass
class AnchorOptions:
    lam: float = 1.0  # λ of the penalty (λ/2)·Σ Ω(θ−θ*)²
    normalize: Literal["none", "max", "mean"] = "mean"  # scale of each task's Ω_τ before it is summed
    n_samples: int = 64  # training examples of the finished task (over all ranks)
    micro_batch_size: int = 4  # per rank


def chunks(numel: int) -> Iterator[tuple[int, int]]:
    for a in range(0, numel, CHUNK):
        yield a, min(CHUNK, numel - a)


def master_pieces(layout: FlatLayout, offset: int, numel: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(position in the segment, 1-D view of the fp32 masters) covering flat elements [offset, offset+numel)."""
    for master, start in zip(layout.masters, layout.master_offsets, strict=True):
        a, b = max(offset, start), min(offset + numel, start + master.numel())
        if a < b:
            yield a - offset, master.detach().view(-1).narrow(0, a - start, b - a)


def discard_gradients(engine, layout: FlatLayout) -> None:
    """Drop the reduced gradients of a backward without an optimizer step.

    DeepSpeed has no public call for this; it is what DeepSpeed does itself when it skips a step on
    overflow. `optimizer.zero_grad()` on every stage (ZeRO-3 then copies instead of adding into its
    partition buffer at the next backward, ZeRO-0 drops `.grad`); ZeRO-1/2 also keep the reduced
    partitions for `step()` in `averaged_gradients` (the bf16 + fp32-accumulation buffer is added to
    by the next backward), which are released here.
    """
    opt = engine.optimizer
    opt.zero_grad()
    if layout.stage in (1, 2):
        release = getattr(opt, "_release_preflattened_grad_buffers", None)  # DeepSpeed >= 0.18
        if release is not None:
            release()
        for group in (opt.averaged_gradients, opt.all_grad_tensors):
            for k in group:
                group[k] = None


@torch.no_grad()
def add_anchor_gradient(engine, layout: FlatLayout, omega: torch.Tensor, anchor: torch.Tensor, lam: float) -> None:
    """Add λ·Ω⊙(θ−θ*), the gradient of (λ/2)·Σ Ω(θ−θ*)², to this rank's reduced gradient partition.

    Ω and θ* are flat tensors in `layout` (Ω may be bf16, e.g. agcl's R̄); θ is read from the fp32 masters.
    """
    if lam == 0:
        return
    buf = None
    for grad, offset in grad_segments(engine, layout):
        for pos, theta in master_pieces(layout, offset, grad.numel()):
            for a, k in chunks(theta.numel()):
                if buf is None or buf.numel() < k:
                    buf = torch.empty(k, dtype=torch.float32, device=theta.device)
                at = offset + pos + a
                d = torch.sub(theta.narrow(0, a, k), anchor.narrow(0, at, k), out=buf[:k])
                d.mul_(omega.narrow(0, at, k)).mul_(lam)
                grad.narrow(0, pos + a, k).add_(d)


def copy_masters(layout: FlatLayout, out: torch.Tensor) -> None:
    """θ* ← the current fp32 masters of this rank, in `layout`'s flat order."""
    for master, start in zip(layout.masters, layout.master_offsets, strict=True):
        out.narrow(0, start, master.numel()).copy_(master.detach().view(-1))


def per_sample(logits: torch.Tensor, labels: torch.Tensor, fn) -> torch.Tensor:
    """Mean over each sample's answer positions of `fn(rows [n, V] fp32, targets [n]) -> [n]`; shape [B].

    The logit at t-1 predicts token t (`agcl_ds.data.collate`): answer positions are where labels[t] is set.
    """
    mask = labels[:, 1:] != IGNORE
    values = fn(logits[:, :-1][mask].float(), labels[:, 1:][mask])
    sums = values.new_zeros(labels.shape[0]).index_add_(0, mask.nonzero()[:, 0], values)
    return sums / mask.sum(1).clamp(min=1)


class AnchorMethod(Method):
    """Penalty, consolidation, estimation pass and persistence; a subclass gives the objective and statistic."""

    Options = AnchorOptions

    def __init__(self, options: AnchorOptions) -> None:
        super().__init__(options)
        o = options
        if not (math.isfinite(o.lam) and o.lam >= 0):
            raise ConfigError(f"method.options.lam: expected a finite number >= 0, got {o.lam}")
        for key in ("n_samples", "micro_batch_size"):
            if getattr(o, key) < 1:
                raise ConfigError(f"method.options.{key}: expected an integer >= 1, got {getattr(o, key)}")
        self.omega: torch.Tensor | None = None  # Σ_τ Ω_τ, flat fp32 (None before the first task is done)
        self.anchor: torch.Tensor | None = None  # θ* after the latest task, flat fp32
        self.tasks: list[str] = []

    # ------------------------------------------------------------------ what a subclass defines
    def token_objective(self, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per answer position: rows [n, V] fp32 logits, targets [n] -> [n]."""
        raise NotImplementedError

    def statistic(self, grad: torch.Tensor, batch: int) -> torch.Tensor:
        """Ω contribution of a reduced gradient chunk (fp32 copy, may be changed in place) of a
        global micro-batch of `batch` samples."""
        raise NotImplementedError

    # ------------------------------------------------------------------ lifecycle
    def check(self, cfg: ExperimentConfig) -> None:
        if cfg.training.precision == "fp16":
            raise ConfigError(f"training.precision: method {self.name} needs bf16 or fp32 (under fp16 the "
                              "gradient partition it adds its penalty to is loss-scaled)")

    def setup(self, ctx: RunContext) -> None:
        if ctx.engine.zero_cpu_offload():
            raise ConfigError(f"method.name: {self.name} adds its penalty to the gradient partition, which "
                              "offload_optimizer moves to the CPU during backward; drop offload_optimizer")
        self.layout = flat_layout(ctx.engine)

    def before_step(self, ctx: RunContext) -> None:
        if self.omega is not None:
            add_anchor_gradient(ctx.engine, self.layout, self.omega, self.anchor, self.options.lam)

    def after_task(self, ctx: RunContext, index: int, task: Task) -> None:
        if index == len(ctx.tasks) - 1:
            return  # no later task to protect
        t0 = time.perf_counter()
        omega_t, n = self.importance(ctx.engine, ctx.tokenizer, task.train, ctx.cfg.data.max_seq_len,
                                     seed=ctx.cfg.seed)
        scale = self._normalise(omega_t)
        self.consolidate(task.name, omega_t)
        ctx.log.event("anchor", method=self.name, task=task.name, samples=n, normaliser=scale,
                      seconds=round(time.perf_counter() - t0, 2))
        ctx.log.print(f"{self.name}: importance of {task.name} from {n} samples (normaliser {scale:.3e})")

    # ------------------------------------------------------------------ importance
    def importance(self, engine, tok: Tokenizer, examples: list[Example], max_len: int,
                   seed: int = 0) -> tuple[torch.Tensor, int]:
        """Unnormalised Ω_τ of this rank's flat layout (fp32) and the number of samples (collective).

        Rank r's loss is (world / B)·Σ_its samples ℓ_i, so the reduced gradient (a mean over ranks) is
        the mean (1/B)·Σ_i ∇ℓ_i over the B samples of the global micro-batch. Micro-batches enter Ω with
        weight B / (samples in all), so every sample counts once (the last micro-batch may be smaller).
        """
        o = self.options
        samples = pick_samples(examples, o.n_samples, seed)
        world, rank = D.world_size(), D.rank()
        step = world * o.micro_batch_size
        omega = torch.zeros(self.layout.numel, dtype=torch.float32, device=self.layout.device)
        module = engine.module
        was_training = module.training
        module.eval()
        engine.set_gradient_accumulation_boundary(True)  # reduce now, whatever the accumulation counter says
        try:
            for first in range(0, len(samples), step):
                group = samples[first:first + step]
                mine = group[rank::world]
                batch = {k: v.to(D.device()) for k, v in collate(tok, mine or group[:1], max_len).items()}
                out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                weight = world / len(group) if mine else 0.0  # a rank with no sample still joins the reduction
                loss = per_sample(out.logits, batch["labels"], self.token_objective).sum() * weight
                engine.backward(loss, scale_wrt_gas=False)
                self._accumulate(omega, engine, len(group), len(samples))
                discard_gradients(engine, self.layout)
        finally:
            engine.set_gradient_accumulation_boundary(None)  # back to the engine's micro-step counter
            module.train(was_training)
        return omega, len(samples)

    @torch.no_grad()
    def _accumulate(self, omega: torch.Tensor, engine, batch: int, total: int) -> None:
        for grad, offset in grad_segments(engine, self.layout):
            for a, k in chunks(grad.numel()):
                g = grad.narrow(0, a, k).to(torch.float32, copy=True)
                omega.narrow(0, offset + a, k).add_(self.statistic(g, batch), alpha=batch / total)

    @torch.no_grad()
    def _normalise(self, omega_t: torch.Tensor) -> float:
        """Divide Ω_τ in place by its max or mean over every rank's elements; return the divisor."""
        mode = self.options.normalize
        if mode == "none":
            return 1.0
        sharded = self.layout.stage > 0 and D.world_size() > 1  # ZeRO-0: every rank holds every element
        if mode == "max":
            top = omega_t.max() if omega_t.numel() else omega_t.new_zeros(())
            if sharded:
                dist.all_reduce(top, op=dist.ReduceOp.MAX)
            scale = float(top)
        else:
            local = [float(omega_t.sum(dtype=torch.float64)), float(sum(s.numel for s in self.layout.specs.values()))]
            total, count = D.all_sum(local) if sharded else local
            scale = total / max(count, 1.0)
        if scale > 0:
            omega_t.div_(scale)
        return scale

    @torch.no_grad()
    def consolidate(self, task: str, omega_t: torch.Tensor) -> None:
        """Ω += Ω_τ and θ* = the current masters (online consolidation, γ = 1)."""
        if self.omega is None:
            self.omega = omega_t
            self.anchor = torch.empty_like(omega_t)
        else:
            self.omega.add_(omega_t)
        copy_masters(self.layout, self.anchor)
        self.tasks.append(task)

    # ------------------------------------------------------------------ persistence
    def save(self, folder: str) -> None:
        """Collective: Ω and θ* in `<folder>/anchor/`, this rank's flat layout (`flatstate.save`)."""
        tensors = {} if self.omega is None else {"omega": self.omega, "anchor": self.anchor}
        flatstate.save(Path(folder) / SUBDIR, STATE, self.layout.specs, self.layout.stage, tensors,
                       {"meta": {"method": self.name, "tasks": self.tasks}})

    def load(self, folder: str) -> None:
        """What `save` wrote, re-partitioned when the saved world size or ZeRO stage differs."""
        layout = self.layout
        tensors, info = flatstate.load(Path(folder) / SUBDIR, STATE, layout.specs, layout.numel, torch.float32,
                                       layout.device)
        meta = info["meta"]
        if meta.get("method") != self.name:
            raise ValueError(f"the anchor state in {folder} belongs to method {meta.get('method')!r}, "
                             f"not {self.name!r}")
        self.omega, self.anchor = tensors.get("omega"), tensors.get("anchor")
        self.tasks = list(meta["tasks"])
