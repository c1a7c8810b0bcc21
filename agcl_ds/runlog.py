"""Run logging on rank 0: a JSONL event log, a progress bar, per-task summary tables, and optional
wandb (offline unless `logging.wandb_mode: online`) / TensorBoard scalars.

Every rank may call these methods; only rank 0 writes, so call sites need no rank checks.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from agcl_ds.distributed import is_main

# task label, step n/total, bar, elapsed and ETA, then the postfix (loss, lr)
BAR_FORMAT = "{desc} | step {n_fmt}/{total_fmt} |{bar}| {elapsed} elapsed, ETA {remaining}{postfix}"


class RunLog:
    def __init__(self, run_dir: str, cfg) -> None:
        """cfg: agcl_ds.config.ExperimentConfig."""
        self.main = is_main()
        self.cfg = cfg.logging
        self.start = time.time()
        self._jsonl = None
        self._bar = None
        self._wandb = None
        self._tb = None
        self._step = 0  # last step given to scalars(): per-task scalars are logged at it
        if not self.main:
            return
        os.makedirs(run_dir, exist_ok=True)
        if self.cfg.jsonl:
            self._jsonl = open(os.path.join(run_dir, "log.jsonl"), "a", buffering=1)
        if self.cfg.wandb:
            import wandb

            # mode= wins over WANDB_MODE in the environment: offline unless the YAML says online,
            # so a run never reaches the network by accident (offline runs land in <run_dir>/wandb)
            self._wandb = wandb.init(project=self.cfg.wandb_project, name=f"{cfg.name}-{cfg.method.name}",
                                     dir=run_dir, mode=self.cfg.wandb_mode, config=cfg.to_dict())
        if self.cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def event(self, kind: str, **fields: Any) -> None:
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"event": kind, "time": round(time.time() - self.start, 3), **fields}) + "\n")

    def scalars(self, step: int, **values: float) -> None:
        self._step = max(self._step, step)
        if self._wandb is not None:
            self._wandb.log(values, step=self._step)
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, self._step)

    def progress(self, total: int, desc: str) -> None:
        """Start a progress bar of `total` steps (rank 0, when enabled).

        Outside a terminal (Slurm logs) the bar is redrawn at most every 30 s, not on every step."""
        self.close_progress()
        if self.main and self.cfg.progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=True,
                             bar_format=BAR_FORMAT, mininterval=0.1 if sys.stderr.isatty() else 30.0)

    def advance(self, **postfix: Any) -> None:
        if self._bar is not None:
            self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(1)

    def close_progress(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def print(self, text: str) -> None:
        if self.main:
            print(text, flush=True)

    def task_summary(self, task_name: str, matrix: list[list[float]], tasks: list[str], seconds: float,
                     mean_loss: float | None) -> str:
        """Print (rank 0) and return a table at the end of a task: every task's accuracy now next to
        its accuracy right after it was learned, and this task's training time and mean loss.

        `matrix` is the loop's rows so far, the current row last; it is restored from the
        checkpoint on resume, so the "learned" column (its diagonal) survives a restart. Also
        logs `acc/<task>` scalars and a `task_summary` event."""
        row = matrix[-1]
        index = tasks.index(task_name)
        width = max(6, *(len(t) for t in tasks)) + 2
        loss = "n/a" if mean_loss is None else f"{mean_loss:.4f}"
        lines = [f"task {index + 1}/{len(tasks)} {task_name}: trained in {seconds:.1f} s, mean loss {loss}",
                 f"{'task':<{width}}{'learned':>9}{'now':>9}{'change':>9}"]
        for j, (name, now) in enumerate(zip(tasks, row, strict=True)):
            if j < len(matrix):
                learned = matrix[j][j]
                cells = f"{learned:>9.3f}{now:>9.3f}{now - learned:>+9.3f}"
            else:
                cells = f"{'-':>9}{now:>9.3f}{'':>9}"
            mark = "  <- just learned" if j == index else ""
            lines.append(f"{name:<{width}}{cells}{mark}".rstrip())
        text = "\n".join(lines)
        self.print(text)
        self.event("task_summary", task=task_name, seconds=round(seconds, 3), mean_loss=mean_loss,
                   accuracies=dict(zip(tasks, row, strict=True)))
        self.scalars(self._step, **{f"acc/{t}": a for t, a in zip(tasks, row, strict=True)})
        return text

    def close(self) -> None:
        self.close_progress()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()
