"""`replay`: a bounded buffer of examples from every finished task, mixed into later tasks' data.

The positive control of the benchmarks: it shows that forgetting can be reduced in a setting at all.
After each task `per_task` of its training examples (seeded choice) enter the buffer; while a later
task trains, the buffer is repeated so that it makes up about `fraction` of the examples drawn.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agcl_ds.data.types import Example
from agcl_ds.distributed import is_main
from agcl_ds.fileio import write_json
from agcl_ds.methods.base import Method, RunContext

if TYPE_CHECKING:
    from agcl_ds.data.types import Task


@dataclass
class ReplayOptions:
    per_task: int = 32  # examples kept per finished task
    fraction: float = 0.25  # share of replayed examples in a later task's training stream


class Replay(Method):
    name = "replay"
    Options = ReplayOptions

    def __init__(self, options: ReplayOptions) -> None:
        super().__init__(options)
        if not 0 <= options.fraction < 1:
            raise ValueError(f"method.options.fraction: expected a number in [0, 1), got {options.fraction}")
        self.buffer: list[Example] = []

    def training_examples(self, ctx: RunContext, index: int, task: Task) -> list[Example]:
        if not self.buffer or self.options.fraction == 0:
            return task.train
        want = round(len(task.train) * self.options.fraction / (1 - self.options.fraction))
        repeats = [self.buffer[i % len(self.buffer)] for i in range(max(want, len(self.buffer)))]
        return task.train + repeats

    def after_task(self, ctx: RunContext, index: int, task: Task) -> None:
        rng = random.Random(f"replay:{ctx.cfg.seed}:{index}")
        self.buffer.extend(rng.sample(task.train, min(self.options.per_task, len(task.train))))

    def save(self, folder: str) -> None:
        if is_main():
            write_json(os.path.join(folder, "replay.json"), [[e.prompt, e.answer] for e in self.buffer], indent=None)

    def load(self, folder: str) -> None:
        with open(os.path.join(folder, "replay.json")) as f:
            self.buffer = [Example(p, a) for p, a in json.load(f)]
