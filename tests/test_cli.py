"""The launch entry point as users run it: launchers, one-line errors, nothing written on failure."""

import json
import os
import subprocess
import sys

import pytest
from test_loop import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def launch(args, launcher=(), timeout=600):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    cmd = [*launcher, *(() if launcher else (sys.executable,)), "launch/train.py", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [
    (os.path.join(BIN, "deepspeed"), "--num_gpus", "2"),
    (os.path.join(BIN, "torchrun"), "--standalone", "--nproc_per_node", "2"),
])
def test_launchers_run_the_sequence(tmp_path, launcher):
    out = launch(["--ds", "ds_configs/zero3.json", "--config", "configs/demo_synthetic.yaml", *TINY,
                  "training.steps_per_task=4", "model.pretrain=null", f"output.dir={tmp_path}"], launcher)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp_path / "seq" / "results.json") as f:
        res = json.load(f)
    assert res["world_size"] == 2 and len(res["matrix"]) == 2
    assert "OP" in out.stdout and "BWT" in out.stdout  # the matrix is printed
