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
    out = launch(["--ds", "ds_configs/zero3.json", "--config", "configs/demo.yaml", *TINY,
                  "training.steps_per_task=4", "model.pretrain=null", f"output.dir={tmp_path}"], launcher)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp_path / "seq" / "results.json") as f:
        res = json.load(f)
    assert res["world_size"] == 2 and len(res["matrix"]) == 2
    assert "OP" in out.stdout and "BWT" in out.stdout  # the matrix is printed


def bad_cases(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: {from_config: {}}\ntraining: {lr: -1}\n")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"zero_optimization": {"stage": 3},\n "optimizer": }')
    conflict = tmp_path / "conflict.json"
    conflict.write_text(json.dumps({"train_micro_batch_size_per_gpu": 3, "optimizer": {"type": "AdamW"}}))
    return [
        (["--config", "nope.yaml"], "nope.yaml: config file not found"),
        (["--config", str(bad_yaml)], "training.lr: expected a positive number"),
        (["--config", "configs/demo.yaml", "training.optimiser=sgd"], "config.training.optimiser: unknown key"),
        (["--config", "configs/demo.yaml", "--ds", str(bad_json)], "bad.json: not valid JSON (line 2"),
        (["--config", "configs/demo.yaml", "--ds", str(conflict)],
         "train_micro_batch_size_per_gpu = 3 conflicts with training.micro_batch_size = 32"),
        (["--config", "configs/demo.yaml", "data.tasks=[dec, nope]"], "data.tasks: unknown synthetic task 'nope'"),
        (["--config", "configs/demo.yaml", "model.from_config=null", "model.path=/no/such/model",
          "model.pretrain=null"],
         "model.path: folder '/no/such/model' not found"),
        (["--config", "configs/demo.yaml", "method.name=magic"], "method.name: unknown method 'magic'"),
        (["--config", "configs/demo.yaml", "data.source=cl_benchmark", "data.path=/no/data", "model.pretrain=null"],
         "/no/data: data folder not found"),
    ]


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    from agcl_ds.cli import main

    for args, message in bad_cases(tmp_path):
        if "--ds" not in args:
            args = ["--ds", "ds_configs/zero3.json", *args]
        out_dir = tmp_path / "out"
        with pytest.raises(SystemExit) as e:
            main(["train", *args, f"output.dir={out_dir}"])
        lines = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2, (args, lines)
        assert len(lines) == 1 and lines[0].startswith("agcl: error: ") and message in lines[0], (args, lines)
        assert not out_dir.exists()


def test_bad_input_exit_code_from_the_launch_script(tmp_path):
    out = launch(["--ds", "ds_configs/zero3.json", "--config", "configs/demo.yaml", "training.lr=0",
                  f"output.dir={tmp_path / 'out'}"])
    assert out.returncode == 2
    assert out.stderr.strip() == "agcl: error: configs/demo.yaml: training.lr: expected a positive number"
    assert not (tmp_path / "out").exists()
