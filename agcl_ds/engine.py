"""Training steps on a DeepSpeed engine: the engine stage below the continual loop and the methods.

The data order is a pure function of (seed, task, step), so any rank can rebuild exactly the
batch it would have seen at any step: the basis for resuming mid-task. `train_task` is what the
loop runs per task, and what a method runs when it needs a model of its own (agcl's single-task
importance); both hand it their lifecycle hooks through `StepHooks`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any, Protocol

import torch

from agcl_ds import distributed as D
from agcl_ds.config import ExperimentConfig
from agcl_ds.data.collate import Tokenizer, collate
from agcl_ds.data.types import Example
from agcl_ds.models import LoadedModel
from agcl_ds.runlog import RunLog


class StepHooks(Protocol):
    """The two per-step calls of a method's lifecycle (agcl_ds.methods.base.Method has them)."""

    def loss_term(self, ctx: Any, batch: dict[str, torch.Tensor], outputs: Any) -> torch.Tensor | None: ...

    def before_step(self, ctx: Any) -> None: ...


class BatchOrder:
    """Which train examples each rank sees at each step of a task.

    Sample position s = ((step * accumulation + micro) * world + rank) * micro_batch + i walks
    through a fresh seeded permutation of the task's examples every epoch.
    """

    def __init__(self, n: int, seed: int, task_index: int) -> None:
        self.n, self.seed, self.task_index = n, seed, task_index
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            order = list(range(self.n))
            random.Random(f"{self.seed}:{self.task_index}:{epoch}").shuffle(order)
            self._perms = {epoch: order}  # one epoch alive at a time
        return self._perms[epoch]

    def indices(self, step: int, micro: int, accumulation: int, rank: int, world: int, mbs: int) -> list[int]:
        first = ((step * accumulation + micro) * world + rank) * mbs
        return [self._perm(s // self.n)[s % self.n] for s in range(first, first + mbs)]


def lr_at(step: int, total: int, base: float, warmup: int, schedule: str) -> float:
    """Per-task schedule: linear warm-up, then constant or cosine to zero."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return base * 0.5 * (1.0 + math.cos(math.pi * progress))
    return base


def build_engine(loaded: LoadedModel, ds_config: dict[str, Any]):
    import deepspeed

    params = [p for p in loaded.model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=loaded.model, model_parameters=params, config=ds_config)
    engine.agcl_zero3_handle = loaded.zero3_handle  # keep HfDeepSpeedConfig alive with the engine
    return engine


@torch.no_grad()
def reset_optimizer_state(engine) -> None:
    """Zero the inner optimizer's moments and step counts in place (every rank, its own partition).

    Adam's second moment from a converged task is tiny, so carrying it into a new task turns the
    first updates into several times the learning rate; each task is treated as a fresh fine-tune.
    The state keeps its structure, so DeepSpeed's checkpoints and offload see the same tensors.
    """
    from agcl_ds.importance.partition import inner_optimizers

    for opt in inner_optimizers(engine):
        for state in opt.state.values():
            for value in state.values():
                if torch.is_tensor(value):
                    value.zero_()


def _to_device(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    dev = D.device()
    return {k: v.to(dev) for k, v in batch.items()}


def train_task(engine, tok: Tokenizer, examples: list[Example], task_index: int, *, steps: int, lr: float,
               cfg: ExperimentConfig, log: RunLog, desc: str, method: StepHooks | None = None,
               ctx: Any = None, micro_batch: int | None = None, start: int = 0,
               after_step: Callable[[int], None] | None = None, schedule: tuple[str, int] | None = None
               ) -> list[float]:
    """Train optimizer steps `start`..`steps`-1 on `examples`; return the rank-averaged losses.

    `after_step(done)` runs after each optimizer step on every rank (checkpoints, preemption);
    `schedule` = (lr_schedule, warmup_steps) overrides the training section's (pretraining)."""
    t = cfg.training
    kind, warmup = schedule or (t.lr_schedule, t.warmup_steps)
    mbs = micro_batch or t.micro_batch_size
    rank, world = D.rank(), D.world_size()
    order = BatchOrder(len(examples), cfg.seed, task_index)
    engine.train()
    log.progress(steps - start, desc)
    losses: list[float] = []
    window: list[float] = []
    for step in range(start, steps):
        step_lr = lr_at(step, steps, lr, warmup, kind)
        for group in engine.optimizer.param_groups:
            group["lr"] = step_lr
        step_loss = 0.0
        for micro in range(t.gradient_accumulation):
            idx = order.indices(step, micro, t.gradient_accumulation, rank, world, mbs)
            batch = _to_device(collate(tok, [examples[i] for i in idx], cfg.data.max_seq_len))
            out = engine(**batch)
            loss = out.loss
            if method is not None:
                extra = method.loss_term(ctx, batch, out)
                if extra is not None:
                    loss = loss + extra
            engine.backward(loss)
            if method is not None and engine.is_gradient_accumulation_boundary():
                method.before_step(ctx)
            engine.step()
            step_loss += loss.detach().float().item() / t.gradient_accumulation
        window.append(step_loss)
        if len(window) == cfg.logging.every or step == steps - 1:
            mean = D.all_sum([sum(window)])[0] / (len(window) * world)
            losses.extend([mean] * len(window))
            log.event("train", task=desc, step=step + 1, loss=round(mean, 6), lr=step_lr)
            log.scalars(engine.global_steps, loss=mean, lr=step_lr)
            window = []
        log.advance(loss=f"{step_loss:.4f}", lr=f"{step_lr:.2e}")
        if after_step is not None:
            after_step(step + 1)
    log.close_progress()
    return losses
