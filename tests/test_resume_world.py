"""A checkpoint written by 2 ranks resumes on 1 and one written by 1 rank resumes on 2 (ZeRO-3,
method agcl: model, Adam moments and the importance R̄ that gates task 2).

What holds across world sizes: `BatchOrder` hands optimizer step s the global sample positions
[s·G, (s+1)·G) with G = micro_batch_size × gradient_accumulation × world size, so keeping G gives
every step the same examples. With the same micro-batch size (8) split as 2 ranks × 1 or 1 rank × 2
accumulation steps, each micro-batch gradient is computed on the same 8 examples and the two are
averaged by a sum and a halving, which is exact in floating point: the resumed run then ends
bitwise equal to the uninterrupted one (weights, matrix, R̄). (1 rank × 16 would only be close:
one mean over 16 examples rounds differently.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_loop import TINY

ROOT = Path(__file__).resolve().parent.parent
BIN = os.path.dirname(sys.executable)
ARGS = ["--ds", "ds_configs/zero3.json", "--config", "configs/demo_synthetic.yaml", *TINY, "model.pretrain=null",
        "method.name=agcl", "method.options.attribution.only_correct=false",  # a non-zero R̄ after task 1
        "method.options.attribution.n_samples=16", "checkpoint.every_steps=3", "checkpoint.keep=20"]
STOP = "t001-s0000003"  # task 2 (gated by R̄ of task 1), 3 steps in
FINAL = "t002-s0000000"


def train(out: Path, ranks: int, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    launcher = [os.path.join(BIN, "torchrun"), "--standalone", "--nproc_per_node", str(ranks)] if ranks > 1 \
        else [sys.executable]
    return subprocess.run([*launcher, "launch/train.py", *ARGS, f"output.dir={out}", *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def outcome(out: Path) -> dict:
    """Matrix, final fp32 weights and the final R̄ (whole tensors, whatever the world size was)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from agcl_ds.importance.store import consolidate

    run = out / "agcl"
    with open(run / "results.json") as f:
        res = json.load(f)
    weights = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag=FINAL)
    rbar = consolidate(run / "checkpoints" / FINAL, out=out / "rbar.safetensors")
    return {"matrix": res["matrix"], "base": res["base"], "world_size": res["world_size"], "weights": weights,
            "rbar": rbar}


def interrupt(out: Path) -> None:
    """The state a run killed right after checkpoint STOP leaves (checkpoints are deterministic)."""
    ckpts = out / "agcl" / "checkpoints"
    for tag in os.listdir(ckpts):
        if tag.startswith("t") and tag > STOP and (ckpts / tag).is_dir():
            shutil.rmtree(ckpts / tag)
    os.remove(out / "agcl" / "results.json")


def assert_same(a: dict, b: dict) -> None:
    assert a["matrix"] == b["matrix"] and a["base"] == b["base"]
    assert a["weights"].keys() == b["weights"].keys()
    for k in a["weights"]:
        assert torch.equal(a["weights"][k], b["weights"][k]), k
    assert a["rbar"].keys() == b["rbar"].keys()
    for k in a["rbar"]:
        assert torch.equal(a["rbar"][k], b["rbar"][k]), k


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> tuple[Path, dict]:
    """The sequence on 2 ranks × micro-batch 8, start to end: its folder (one test interrupts it
    afterwards) and its outcome."""
    out = tmp_path_factory.mktemp("ref2")
    done = train(out, 2)
    assert done.returncode == 0, done.stderr[-3000:]
    ref = outcome(out)
    assert ref["world_size"] == 2
    assert any(float(t.float().max()) > 0 for t in ref["rbar"].values())  # the gate really protects something
    return out, ref


@pytest.fixture
def uninterrupted(two_rank_run) -> dict:
    return two_rank_run[1]


@pytest.mark.slow
def test_two_rank_checkpoint_resumes_on_one_rank(two_rank_run, uninterrupted):
    tmp_path, _ = two_rank_run
    interrupt(tmp_path)
    # the same micro-batch on half the ranks would halve the global batch: refused, naming the fix
    refused = train(tmp_path, 1)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith(
        f"agcl: error: {tmp_path}/agcl/checkpoints/{STOP}: the config changed since this checkpoint "
        f"(training.micro_batch_size x gradient_accumulation x world size: 16 -> 8) (saved by 2 rank(s), this "
        f"run has 1: keep the product")
    done = train(tmp_path, 1, "training.gradient_accumulation=2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "saved by 2 rank(s), this run has 1: loading it through DeepSpeed's universal" in done.stdout
    assert f"resumed from {tmp_path}/agcl/checkpoints/{STOP}: task 2/2, step 3" in done.stdout
    assert not any(n.startswith(".universal") for n in os.listdir(tmp_path / "agcl" / "checkpoints"))
    resumed = outcome(tmp_path)
    assert resumed["world_size"] == 1
    assert_same(resumed, uninterrupted)


@pytest.mark.slow
def test_one_rank_checkpoint_resumes_on_two_ranks(tmp_path, uninterrupted):
    done = train(tmp_path, 1, "training.gradient_accumulation=2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same(outcome(tmp_path), uninterrupted)  # 1 rank × 2 accumulation steps is the 2-rank run
    interrupt(tmp_path)
    done = train(tmp_path, 2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "saved by 1 rank(s), this run has 2: loading it through DeepSpeed's universal" in done.stdout
    resumed = outcome(tmp_path)
    assert resumed["world_size"] == 2
    assert_same(resumed, uninterrupted)
