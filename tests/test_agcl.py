"""Method `agcl` end to end on 2 ranks: importance after each task, R̄ = 1 elements frozen later."""

import os

import pytest
from _dist import run_ranks
from test_loop import TINY

from agcl_ds.config import load_config, load_ds_config, resolve_ds_config
from agcl_ds.methods import METHODS
from agcl_ds.methods.agcl import Agcl


class FrozenCheck(Agcl):
    """Agcl that records, for the second task, how many R̄ = 1 elements moved and how many others did."""

    report: dict = {}

    def _master(self, ctx):
        from deepspeed.utils import safe_get_local_fp32_param

        out = {}
        for n, p in ctx.engine.module.named_parameters():
            local = safe_get_local_fp32_param(p) if hasattr(p, "ds_id") else p.detach()
            out[n] = local.reshape(-1)[: self.store.specs[n].numel].clone()
        return out

    def before_task(self, ctx, index, task):
        super().before_task(ctx, index, task)
        if index == 1:
            self._before = self._master(ctx)
            FrozenCheck.report["gate_mode"] = self.gate.mode
            FrozenCheck.report["tasks_in_store"] = list(self.store.tasks)

    def after_task(self, ctx, index, task):
        if index == 1:
            after = self._master(ctx)
            rbar = self.store.rbar
            frozen_moved = sum(int(((after[n] != self._before[n]) & (rbar[n].float() == 1)).sum()) for n in after)
            free_moved = sum(int(((after[n] != self._before[n]) & (rbar[n].float() == 0)).sum()) for n in after)
            FrozenCheck.report.update(frozen=sum(int((r.float() == 1).sum()) for r in rbar.values()),
                                      frozen_moved=frozen_moved, free_moved=free_moved)
        super().after_task(ctx, index, task)


def _body(tmp, importance_from, gate_on):
    from agcl_ds.loop import run

    METHODS["frozen_check"] = "test_agcl:FrozenCheck"
    cfg = load_config("configs/demo_synthetic.yaml", TINY + [
        f"output.dir={tmp}", "method.name=frozen_check", "model.pretrain=null", "training.weight_decay=0.1",
        "data.tasks=[dec, swap, add2]",
        f"method.options={{importance_from: {importance_from}, gate_on: {gate_on}, attribution: "
        "{only_correct: false, n_samples: 8, micro_batch_size: 4, k: 2, top_frac: 0.3}}"])
    ds = resolve_ds_config(load_ds_config("ds_configs/zero3.json"), cfg, 2)
    results = run(cfg, ds)
    return {"results": results, "report": FrozenCheck.report}


@pytest.mark.slow
@pytest.mark.parametrize("importance_from, gate_on", [("continual", "auto"), ("single_task", "update")])
def test_agcl_protects_important_elements(tmp_path, importance_from, gate_on):
    out = run_ranks(_body, importance_from, gate_on, tmp=str(tmp_path))
    for rank_out in out:
        rep = rank_out["report"]
        assert rep["gate_mode"] == "update"  # AdamW: auto picks the update gate
        assert rep["tasks_in_store"] == ["dec"]
        assert rep["frozen"] > 0 and rep["frozen_moved"] == 0  # R̄ = 1: bit-identical through AdamW + decay
        assert rep["free_moved"] > rep["frozen"]  # the rest still learns
    assert len(out[0]["results"]["matrix"]) == 3
    store = os.path.join(tmp_path, "frozen_check", "checkpoints", "t003-s0000000", "importance")
    assert sorted(os.listdir(store)) == ["meta.json", "rank0.safetensors", "rank1.safetensors"]
