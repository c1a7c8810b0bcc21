"""Run logging on rank 0: a JSONL event log, a progress bar, and optional wandb / TensorBoard.

Every rank may call these methods; only rank 0 writes, so call sites need no rank checks.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from agcl_ds.distributed import is_main


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
        if not self.main:
            return
        os.makedirs(run_dir, exist_ok=True)
        if self.cfg.jsonl:
            self._jsonl = open(os.path.join(run_dir, "log.jsonl"), "a", buffering=1)
        if self.cfg.wandb:
            import wandb

            self._wandb = wandb.init(project=self.cfg.wandb_project, name=f"{cfg.name}-{cfg.method.name}",
                                     dir=run_dir, mode=self.cfg.wandb_mode, config=cfg.to_dict())
        if self.cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def event(self, kind: str, **fields: Any) -> None:
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"event": kind, "time": round(time.time() - self.start, 3), **fields}) + "\n")

    def scalars(self, step: int, **values: float) -> None:
        if self._wandb is not None:
            self._wandb.log(values, step=step)
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)

    def progress(self, total: int, desc: str) -> None:
        """Start a progress bar of `total` steps (rank 0, when enabled and not disabled by env)."""
        self.close_progress()
        if self.main and self.cfg.progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=True)

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

    def close(self) -> None:
        self.close_progress()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()
