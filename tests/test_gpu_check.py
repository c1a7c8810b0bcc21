"""The GPU check cannot rot before a device comes: its dry run executes every step on this CPU machine."""

import json
import os
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from gpu_check import TESTS  # noqa: E402


def _wheel_pins() -> dict[str, str]:
    with open(os.path.join(ROOT, "benchmarks", "gpu_wheels.txt")) as f:
        lines = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    pins = {}
    for line in lines:
        name, sep, ver = line.partition("==")
        assert sep and ver, f"gpu_wheels.txt: {line!r} is not pinned as name==version"
        pins[name] = ver
    return pins


def test_wheel_list_pins_what_is_tested_here():
    """The GPU machine gets the deepspeed (and helpers) the CPU suite runs against, pinned exactly."""
    pins = _wheel_pins()
    assert {"deepspeed", "hjson", "pydantic", "pydantic-core", "py-cpuinfo", "gguf"} <= pins.keys()
    for name, ver in pins.items():
        try:
            here = version(name)
        except PackageNotFoundError:
            continue
        assert here == ver, f"gpu_wheels.txt pins {name}=={ver}, this machine tests {here}"


def test_without_cuda_the_real_run_refuses_in_one_line(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["gpu_check: no CUDA device here; use --dry-run on a CPU machine"]


@pytest.mark.slow
def test_dry_run_executes_every_step(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", "--out", str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    with open(tmp_path / "gpu_check.json") as f:
        result = json.load(f)
    steps = {s["name"]: s for s in result["steps"]}
    assert r.returncode == 0, {n: (s["status"], open(s["log"]).read()[-2000:]) for n, s in steps.items()}
    assert list(steps) == ["tests", "bench_gate", "bench_attr", "sequence_seq", "sequence_agcl", "report"]
    assert all(s["status"] == "passed" for s in steps.values())
    # every named test still exists (a renamed one would be an error at collection)
    assert steps["tests"]["figures"]["collected"] >= len(TESTS)
    # the figures RESULTS.md needs are found in the logs
    assert {"snapshot_gate_per_step_pct", "fused_gate_per_step_pct"} <= steps["bench_gate"]["figures"].keys()
    assert "attribution_over_fwd_bwd" in steps["bench_attr"]["figures"]
    assert os.path.isfile(tmp_path / "sequence" / "agcl" / "results.json")
    assert os.path.isfile(tmp_path / "sequence" / "curves.png")
    with open(tmp_path / "summary.txt") as f:
        summary = f.read()
    assert summary.startswith("gpu_check dry run on CPU") and "collected only" in summary
