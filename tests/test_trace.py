"""The TRACE path end to end on 2 CPU ranks, ZeRO-3: training, real generation under the sharded
model, every metric, the score matrix, general-ability retention and the report."""

import json
import os

import pytest
from _dist import run_ranks

from agcl_ds.config import load_config, load_ds_config, resolve_ds_config

FIXTURES = os.path.join("tests", "fixtures", "trace")
TINY = [
    f"data.path={FIXTURES}", "data.tasks=[C-STANCE, NumGLUE-cm, MeetingBank, Py150, 20Minuten]",
    "evaluation.general=[ScienceQA]", "model.gguf_package=null", "data.max_seq_len=192", "data.max_test=3",
    "model.from_config={arch: llama, hidden_size: 32, intermediate_size: 64, num_layers: 2, num_heads: 4, "
    "num_kv_heads: 2, max_position_embeddings: 192}",
    "training.steps_per_task=3", "training.micro_batch_size=2", "training.gradient_accumulation=1",
    "training.lr=1e-3", "training.warmup_steps=0", "evaluation.batch_size=2", "evaluation.max_new_tokens=12",
    "logging.progress=false", "checkpoint.keep=1",
]


def _body(tmp):
    from agcl_ds.loop import run

    cfg = load_config("configs/trace.yaml", TINY + [f"output.dir={tmp}"])
    ds = resolve_ds_config(load_ds_config("ds_configs/zero3.json"), cfg, 2)
    return run(cfg, ds)


@pytest.mark.slow
def test_trace_sequence_on_zero3_scores_every_metric(tmp_path):
    out = run_ranks(_body, tmp=str(tmp_path))
    res = out[0]
    assert out[1]["matrix"] == res["matrix"] and out[1]["general"] == res["general"]  # ranks agree
    assert res["metrics"] == ["choice", "accuracy", "rouge_l", "edit_sim", "sari"]
    assert len(res["matrix"]) == 5 and all(len(r) == 5 and all(0 <= x <= 1 for x in r) for r in res["matrix"])
    g = res["general"]
    assert g["tasks"] == ["ScienceQA"] and g["metrics"] == ["choice"] and len(g["rows"]) == 5
    assert g["delta"] == pytest.approx(g["rows"][-1][0] - g["base"][0])
    with open(os.path.join(tmp_path, "seq", "results.json")) as f:
        saved = json.load(f)
    assert saved["general"] == g and saved["bwt_over"] == "T-1"
    from agcl_ds.report import matrix_table, summary_table

    text = matrix_table(saved)
    assert "edit_sim" in text and "sari" in text and "general delta" in text
    assert "general" in summary_table([saved]).splitlines()[0]
