"""Fault tolerance: a rank killed mid-task, or a preemption signal, and the resumed sequence ends
exactly where an uninterrupted run ends (bitwise weights and matrix, fp32 on CPU)."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from test_loop import TINY

from agcl_ds.distributed import local_accelerator, local_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
ARGS = ["--config", "configs/demo_synthetic.yaml", *TINY, "model.pretrain=null", "checkpoint.every_steps=3",
        "checkpoint.keep=3"]


def start(out_dir, *extra, ds="ds_configs/zero3.json"):
    """2 CPU ranks, or one rank per GPU under DS_ACCELERATOR=cuda (benchmarks/gpu_check.sh)."""
    env = dict(os.environ, DS_ACCELERATOR=local_accelerator(), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [os.path.join(BIN, "torchrun"), "--standalone", "--nproc_per_node", str(local_world(2)), "launch/train.py",
           "--ds", ds, *ARGS, f"output.dir={out_dir}", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def ranks(proc):
    return [c for c in psutil.Process(proc.pid).children(recursive=True) if "launch/train.py" in " ".join(c.cmdline())]


def wait_for(path, proc, timeout=300):
    t0 = time.time()
    while not os.path.isdir(path):
        assert proc.poll() is None, "the run ended before the checkpoint appeared"
        assert time.time() - t0 < timeout
        time.sleep(0.2)


def final_weights(run_dir):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(os.path.join(run_dir, "checkpoints"), tag="t002-s0000000")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    code, _, err = finish(start(out))
    assert code == 0, err[-3000:]
    with open(out / "seq" / "results.json") as f:
        return json.load(f), final_weights(out / "seq")


def same_as_reference(out, reference, method="seq"):
    with open(out / method / "results.json") as f:
        res = json.load(f)
    ref_res, ref_w = reference
    assert res["matrix"] == ref_res["matrix"] and res["base"] == ref_res["base"]
    w = final_weights(out / method)
    assert w.keys() == ref_w.keys()
    for k in w:
        assert torch.equal(w[k], ref_w[k]), k


def kill_mid_task_then_resume(tmp_path, method: str = "seq", *extra: str, ds: str = "ds_configs/zero3.json") -> None:
    proc = start(tmp_path, *extra, ds=ds)
    wait_for(tmp_path / method / "checkpoints" / "t001-s0000003", proc)  # second task, mid-way
    ranks(proc)[-1].send_signal(signal.SIGKILL)  # the last rank (the only one on a 1-GPU machine)
    code, _, _ = finish(proc)
    assert code != 0
    code, out, err = finish(start(tmp_path, *extra, ds=ds))
    assert code == 0, err[-3000:]
    assert "resumed from" in out and "t001-s00000" in out


@pytest.mark.slow
def test_sigkill_one_rank_mid_task_then_resume(tmp_path, reference):
    kill_mid_task_then_resume(tmp_path)
    same_as_reference(tmp_path, reference)
    # a finished sequence is not re-run
    code, out, _ = finish(start(tmp_path))
    assert code == 0 and "already finished" in out


# LoRA adapters gated by agcl: adapter, importance store, optimizer and data order all come back from the checkpoint
LORA_AGCL = ["model.peft.r=4", "method.name=agcl", "method.options.attribution.only_correct=false"]


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ["shared", "per_task_merge"])  # merged: the base weights changed after task 1
def test_sigkill_mid_task_then_resume_lora_agcl(tmp_path, tmp_path_factory, adapter):
    extra = [*LORA_AGCL, f"model.peft.adapter={adapter}"]
    ref = tmp_path_factory.mktemp("lora_ref")
    code, _, err = finish(start(ref, *extra))
    assert code == 0, err[-3000:]
    with open(ref / "agcl" / "results.json") as f:
        reference = json.load(f), final_weights(ref / "agcl")
    assert any(".lora_B." in k for k in reference[1]) and any(".base_layer." in k for k in reference[1])
    kill_mid_task_then_resume(tmp_path, "agcl", *extra)
    same_as_reference(tmp_path, reference, "agcl")


@pytest.mark.slow
def test_sigkill_mid_task_then_resume_osf(tmp_path, tmp_path_factory):
    """osf re-sculpts between tasks: the new frozen factors (not in any state dict) come back from the
    method's own checkpoint file. ZeRO-2 (osf refuses ZeRO-3)."""
    extra, ds = ["model.peft.type=osf", "method.name=osf"], "ds_configs/zero2.json"
    ref = tmp_path_factory.mktemp("osf_ref")
    code, _, err = finish(start(ref, *extra, ds=ds))
    assert code == 0, err[-3000:]
    with open(ref / "osf" / "results.json") as f:
        reference = json.load(f), final_weights(ref / "osf")
    kill_mid_task_then_resume(tmp_path, "osf", *extra, ds=ds)
    same_as_reference(tmp_path, reference, "osf")
    assert (tmp_path / "osf" / "checkpoints" / "t002-s0000000" / "osf" / "factors.safetensors").is_file()


@pytest.mark.slow
def test_preemption_signal_checkpoints_then_resume(tmp_path, reference):
    proc = start(tmp_path)
    wait_for(tmp_path / "seq" / "checkpoints" / "t000-s0000003", proc)
    for r in ranks(proc)[:1]:  # one rank is signalled; all must agree and save
        r.send_signal(signal.SIGUSR1)
    code, _, err = finish(proc)
    assert code != 0 and "preempted" in err
    saved = sorted(os.listdir(tmp_path / "seq" / "checkpoints"))
    assert any(t.startswith("t00") for t in saved) and not any(t.startswith(".tmp") for t in saved)
    code, out, err = finish(start(tmp_path))
    assert code == 0, err[-3000:]
    same_as_reference(tmp_path, reference)


@pytest.mark.slow
def test_corrupt_checkpoint_falls_back_and_config_change_is_refused(tmp_path, reference):
    code, _, err = finish(start(tmp_path, "checkpoint.keep=2"))
    assert code == 0, err[-3000:]
    ckpts = tmp_path / "seq" / "checkpoints"
    tags = sorted(t for t in os.listdir(ckpts) if t.startswith("t"))
    assert tags == ["t001-s0000009", "t002-s0000000"]  # the last two are kept
    victim = next((ckpts / tags[-1]).glob("*optim_states.pt"))
    with open(victim, "r+b") as f:  # truncate one shard
        f.truncate(os.path.getsize(victim) // 2)
    os.remove(tmp_path / "seq" / "results.json")
    code, out, err = finish(start(tmp_path))
    assert code == 0, err[-3000:]
    assert "is unusable" in err and "does not match its checksum" in err and "resumed from" in out
    assert tags[0] in out
    same_as_reference(tmp_path, reference)
    code, _, err = finish(start(tmp_path, "training.lr=0.01"))
    assert code != 0 and "the config changed since this checkpoint (training.lr: 0.003 -> 0.01)" in err
