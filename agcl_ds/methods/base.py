"""The method plug-in lifecycle.

A continual-learning method is one file with one subclass of `Method`. The loop calls, for each
task in order:

    before_task(ctx, index, task)
    training_examples(ctx, index, task)    # what the task trains on (default: task.train)
      for every micro-batch:   loss = model loss + loss_term(ctx, batch, outputs)
      at every accumulation boundary, after backward, before the optimizer step:
                               before_step(ctx)          # gradients are partitioned here
    after_task(ctx, index, task)

A method never reaches into the engine's internals: it gets these calls, returns loss terms, and
may install a gate (agcl_ds.gate) on the engine it is handed. `save`/`load` write and read
everything it needs to resume into a checkpoint folder (agcl_ds.checkpoint lists the contract);
when a run resumes mid-task, `before_task` is called again after `load`, so it must be idempotent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from agcl_ds.config import ExperimentConfig
from agcl_ds.data.collate import Tokenizer
from agcl_ds.data.types import Example, Task
from agcl_ds.evaluation import Evaluator
from agcl_ds.runlog import RunLog


@dataclass
class RunContext:
    """What a method may use: never the engine's internals, only its public calls."""

    cfg: ExperimentConfig
    engine: Any
    tokenizer: Tokenizer
    tasks: list[Task]
    run_dir: str
    log: RunLog
    evaluator: Evaluator
    ds_config: dict[str, Any]  # the resolved DeepSpeed config (a method may build a second engine)
    base_dir: str | None  # the cached pretrained base, when the model is pretrained here


@dataclass
class NoOptions:
    """Methods without options accept an empty `method.options`."""


class Method:
    name = "base"
    Options: type = NoOptions

    def __init__(self, options: Any) -> None:
        self.options = options

    def check(self, cfg: ExperimentConfig) -> None:
        """Before any rank starts: refuse, with a one-line ConfigError, a config this method cannot
        run (so the mistake costs a second, not a model load)."""

    def setup(self, ctx: RunContext) -> None:
        """Once, after the engine exists and before the first task."""

    def before_task(self, ctx: RunContext, index: int, task: Task) -> None:
        """Before training task `index`."""

    def training_examples(self, ctx: RunContext, index: int, task: Task) -> list[Example]:
        """The examples task `index` trains on (replay mixes stored ones in); same on every rank."""
        return task.train

    def loss_term(self, ctx: RunContext, batch: dict[str, torch.Tensor], outputs: Any) -> torch.Tensor | None:
        """An extra term added to the model's loss for this micro-batch (e.g. a penalty)."""
        return None

    def before_step(self, ctx: RunContext) -> None:
        """At the accumulation boundary, after backward and before the optimizer step."""

    def after_task(self, ctx: RunContext, index: int, task: Task) -> None:
        """After task `index` was trained and every task evaluated."""

    def save(self, folder: str) -> None:
        """Write this rank's method state into a checkpoint folder (every rank calls it)."""

    def load(self, folder: str) -> None:
        """Restore what `save` wrote."""
