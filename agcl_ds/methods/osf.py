"""`osf`: Orthogonal Subspace Fine-tuning (Nayak et al. 2025, "Sculpting Subspaces"), through peft's OSF
tuner (`model.peft.type: osf`, agcl_ds.adapters.add_osf).

Each targeted weight is split by SVD into a preserved subspace, its top singular directions, and a
trainable rest; peft projects the rest's gradients orthogonal to the preserved directions, so the
update of a task leaves them alone. Between tasks the method re-sculpts (agcl_ds.adapters.osf_resculpt):
the learned change is folded into the weight, the weight is decomposed again, and more directions are
preserved than before (`model.peft.effective_rank` of the smaller dimension for the first task, growing
linearly to leave 1/T of what was free at the start for the last one), so each task trains orthogonal
to what the earlier tasks made dominant. Unlike peft's documented recipe (a new tuner per task), the
shapes never change: one DeepSpeed engine, one set of optimizer partitions and checkpoints all along.

Under Adam the projection holds for the gradients, not exactly for the updates (element-wise
normalisation), as in peft's own tuner.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from agcl_ds.adapters import OSF_STATE, load_osf_factors, osf_compute_dtype, osf_factors, osf_resculpt
from agcl_ds.config import ConfigError
from agcl_ds.distributed import is_main
from agcl_ds.methods.base import Method, RunContext

if TYPE_CHECKING:
    from agcl_ds.config import ExperimentConfig
    from agcl_ds.data.types import Task


class Osf(Method):
    name = "osf"

    def check(self, cfg: ExperimentConfig) -> None:
        if cfg.model.peft is None or cfg.model.peft.type != "osf":
            raise ConfigError("method osf: trains peft's OSF tuner; set model.peft.type: osf")

    def setup(self, ctx: RunContext) -> None:
        self.module = ctx.engine.module
        osf_compute_dtype(self.module)

    def save(self, folder: str) -> None:
        """The frozen factors (replicated on every rank: rank 0 writes them); peft keeps them out of the
        state dicts, and after a re-sculpting they are not what a fresh model would compute."""
        from safetensors.torch import save_file

        if is_main():
            os.makedirs(os.path.join(folder, os.path.dirname(OSF_STATE)), exist_ok=True)
            save_file(osf_factors(self.module), os.path.join(folder, OSF_STATE))

    def load(self, folder: str) -> None:
        from safetensors.torch import load_file

        load_osf_factors(self.module, load_file(os.path.join(folder, OSF_STATE)))

    def after_task(self, ctx: RunContext, index: int, task: Task) -> None:
        from agcl_ds.engine import reset_optimizer_state

        if index == len(ctx.tasks) - 1:
            return
        osf_resculpt(ctx.engine.module, ctx.cfg.model.peft.effective_rank, index + 1, len(ctx.tasks))
        reset_optimizer_state(ctx.engine)  # the moments belong to the factors of the old decomposition
        ctx.log.event("osf", task=task.name, preserved_share=round(
            ctx.cfg.model.peft.effective_rank + (index + 1) * (1 - ctx.cfg.model.peft.effective_rank)
            / len(ctx.tasks), 4))
