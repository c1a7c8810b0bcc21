"""`agcl_replay`: agcl's attribution gate and replay's buffer together, by composition.

Later tasks train on the task's examples plus replayed ones (agcl_ds.methods.replay) while every
update is gated by R̄ of the earlier tasks (agcl_ds.methods.agcl); importance is still estimated on
the finished task's own training examples. Options: `{agcl: {…agcl's options…}, replay: {…replay's…}}`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from agcl_ds.config import ConfigError
from agcl_ds.methods.agcl import Agcl, AgclOptions
from agcl_ds.methods.base import Method, RunContext
from agcl_ds.methods.replay import Replay, ReplayOptions

if TYPE_CHECKING:
    from agcl_ds.config import ExperimentConfig
    from agcl_ds.data.types import Example, Task


@dataclass
class AgclReplayOptions:
    agcl: AgclOptions = field(default_factory=AgclOptions)
    replay: ReplayOptions = field(default_factory=ReplayOptions)


class AgclReplay(Method):
    """Every lifecycle call goes to agcl, then replay; the training examples are replay's mixture."""

    name = "agcl_replay"
    Options = AgclReplayOptions

    def __init__(self, options: AgclReplayOptions) -> None:
        super().__init__(options)
        try:  # each part names its keys from method.options
            self.agcl = Agcl(options.agcl)
        except ValueError as e:
            raise ConfigError(str(e).replace("method.options.", "method.options.agcl.", 1)) from None
        try:
            self.replay = Replay(options.replay)
        except ValueError as e:
            raise ConfigError(str(e).replace("method.options.", "method.options.replay.", 1)) from None
        self.parts: tuple[Method, ...] = (self.agcl, self.replay)

    def _each(self, hook: str, *args: Any) -> None:
        for part in self.parts:
            getattr(part, hook)(*args)

    def check(self, cfg: ExperimentConfig) -> None:
        self._each("check", cfg)

    def setup(self, ctx: RunContext) -> None:
        self._each("setup", ctx)

    def before_task(self, ctx: RunContext, index: int, task: Task) -> None:
        self._each("before_task", ctx, index, task)

    def training_examples(self, ctx: RunContext, index: int, task: Task) -> list[Example]:
        return self.replay.training_examples(ctx, index, task)

    def loss_term(self, ctx: RunContext, batch: dict[str, torch.Tensor], outputs: Any) -> torch.Tensor | None:
        terms = [t for part in self.parts if (t := part.loss_term(ctx, batch, outputs)) is not None]
        return sum(terms) if terms else None

    def before_step(self, ctx: RunContext) -> None:
        self._each("before_step", ctx)

    def after_task(self, ctx: RunContext, index: int, task: Task) -> None:
        self._each("after_task", ctx, index, task)

    def save(self, folder: str) -> None:
        self._each("save", folder)

    def load(self, folder: str) -> None:
        self._each("load", folder)
