"""`agcl export`, `eval`, `attribute` and `report` on real sharded checkpoints.

The run learns two JSONL tasks with constant answers ("7", then "8"), so the accuracy rows of its two
checkpoints differ ([1, 0] then [0, 1]) and a wrongly loaded model would show.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from _dist import run_ranks
from test_loop import TINY

from agcl_ds.cli import main
from agcl_ds.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
RUN = [*(o for o in TINY if not o.startswith(("data.tasks", "training.lr", "training.steps"))), "model.pretrain=null",
       "data.source=jsonl", "data.tasks=[seven, eight]", "training.lr=1e-2", "training.steps_per_task=20"]
PROBE = ["seven:1234=7", "eight:0042=8"]  # logits are compared on these


def make_data(root, tasks=(("seven", "7"), ("eight", "8")), prompt="{task}:{n:04d}="):
    for i, (task, answer) in enumerate(tasks):
        os.makedirs(root / task)
        for split, n in (("train", 64), ("test", 16)):
            with open(root / task / f"{split}.jsonl", "w") as f:
                for k in range(n):
                    f.write(json.dumps({"prompt": prompt.format(task=task, n=(37 * k + 11 * i + n) % 10000),
                                        "answer": answer}) + "\n")


def _probe_ids(tok):
    rows = [tok.encode(p, prompt=True) for p in PROBE]
    width = max(map(len, rows))
    return torch.tensor([r + [tok.pad_id] * (width - len(r)) for r in rows])


def _train_body(tmp, args, ds_name):
    """Train, then restore the last checkpoint into a fresh engine (the resume path) for its logits."""
    from agcl_ds import checkpoint
    from agcl_ds.config import load_ds_config, resolve_ds_config
    from agcl_ds.engine import build_engine
    from agcl_ds.loop import run
    from agcl_ds.methods.base import Method, NoOptions
    from agcl_ds.models import load_model

    cfg = load_config("configs/demo_synthetic.yaml", args)
    ds = resolve_ds_config(load_ds_config(f"ds_configs/{ds_name}.json"), cfg, torch.distributed.get_world_size())
    results = run(cfg, ds)
    loaded = load_model(cfg, ds)
    engine = build_engine(loaded, ds)
    checkpoint.load(os.path.join(cfg.run_dir(), "checkpoints", "t002-s0000000"), engine, Method(NoOptions()))
    engine.module.eval()
    with torch.no_grad():
        logits = engine.module(input_ids=_probe_ids(loaded.tokenizer)).logits
    return {"results": results, "logits": logits}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """2 ranks, ZeRO-3, byte tokenizer, from-config Llama."""
    tmp = tmp_path_factory.mktemp("run")
    make_data(tmp / "data")
    args = [*RUN, f"data.path={tmp / 'data'}", f"output.dir={tmp / 'out'}"]
    out = run_ranks(_train_body, args, "zero3", tmp=str(tmp))
    res = out[0]["results"]
    assert res["matrix"] == [[1.0, 0.0], [0.0, 1.0]], res["matrix"]  # two distinguishable checkpoints
    return {"args": args, "run_dir": tmp / "out" / "seq", "logits": out[0]["logits"], "tmp": tmp}


def load_export(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()


@pytest.mark.slow
def test_export_round_trip_zero3(trained, capsys):
    out = trained["tmp"] / "hf"
    main(["export", "--checkpoint", str(trained["run_dir"] / "checkpoints" / "t002-s0000000"), "--out", str(out)])
    assert {"config.json", "model.safetensors", "agcl_export.json"} <= set(os.listdir(out))
    assert not any(n.startswith(".tmp") for n in os.listdir(out.parent))
    model = load_export(out)
    from agcl_ds.data.collate import ByteTokenizer

    with torch.no_grad():
        logits = model(input_ids=_probe_ids(ByteTokenizer())).logits
    torch.testing.assert_close(logits, trained["logits"], rtol=1e-5, atol=1e-5)  # fp32 sums in another order: ~1e-6
    assert json.loads((out / "agcl_export.json").read_text())["tokenizer"].startswith("byte")
    # the run dir resolves to the latest checkpoint; an existing --out is refused, and kept
    before = (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["export", "--checkpoint", str(trained["run_dir"]), "--out", str(out)])
    assert e.value.code == 2 and "exists; pass --overwrite" in capsys.readouterr().err
    main(["export", "--checkpoint", str(trained["run_dir"]), "--out", str(out), "--overwrite", "--dtype", "bf16"])
    assert (out / "model.safetensors").read_bytes() != before and load_export(out).dtype == torch.bfloat16


@pytest.mark.slow
def test_eval_row_equals_the_matrix_row_under_torchrun(trained):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    out_dir = trained["tmp"] / "eval"
    cmd = [os.path.join(BIN, "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "agcl_ds.cli", "eval",
           "--ds", "ds_configs/zero3.json", "--config", "configs/demo_synthetic.yaml", "--checkpoint",
           str(trained["run_dir"] / "checkpoints" / "t001-s0000000"), "--out", str(out_dir), *trained["args"]]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((out_dir / "eval.json").read_text())
    matrix = json.loads((trained["run_dir"] / "results.json").read_text())["matrix"]
    assert got["row"] == matrix[0] != matrix[1]
    assert got["tasks"] == ["seven", "eight"] and got["position"] == {"task": 1, "step": 0}
    assert "1.000" in proc.stdout


def _attribute_body(tmp, args, ckpt, out):
    main(["attribute", "--ds", "ds_configs/zero3.json", "--config", "configs/demo_synthetic.yaml", "--checkpoint", ckpt,
          "--task", "seven", "--out", out, *args])


@pytest.mark.slow
def test_attribute_writes_a_loadable_store(trained):
    from safetensors.torch import load_file

    from agcl_ds.importance.partition import full_specs
    from agcl_ds.importance.store import ImportanceStore, read_meta

    out = trained["tmp"] / "attr"
    ckpt = str(trained["run_dir"] / "checkpoints" / "t001-s0000000")
    run_ranks(_attribute_body, trained["args"], ckpt, str(out), tmp=str(trained["tmp"] / "attr_ranks"))
    meta = read_meta(out)
    assert meta["tasks"] == ["seven"] and meta["keep_tasks"] and meta["world_size"] == 2
    assert meta["meta"]["checkpoint"] == ckpt
    specs = full_specs({n: tuple(s) for n, s in meta["shapes"].items()})
    store = ImportanceStore.load(out, specs)  # one process: re-partitioned from the two rank files
    full = load_file(out / "importance" / "consolidated.safetensors")
    total = 0.0
    for name, rbar in store.rbar.items():
        assert torch.equal(full[name].reshape(-1), rbar) and torch.equal(store.task("seven")[name], rbar)
        assert 0.0 <= float(rbar.min()) and float(rbar.max()) <= 1.0
        total += float(rbar.float().sum())
    assert total > 0


def _hf_body(tmp, args):
    return _train_body(tmp, args, "zero0")


@pytest.mark.slow
def test_export_stage0_with_hf_tokenizer(tmp_path):
    from test_models import make_folder

    make_folder(tmp_path / "model")
    make_data(tmp_path / "data", (("affirm", "yes"), ("deny", "no")), prompt="is it ?")
    args = [*RUN, "model.from_config=null", f"model.path={tmp_path / 'model'}", "data.tasks=[affirm, deny]",
            f"data.path={tmp_path / 'data'}", f"output.dir={tmp_path / 'out'}"]
    ref = run_ranks(_hf_body, args, world=1, tmp=str(tmp_path))[0]
    # stage 0 keeps the whole module in the model-states file, no optimizer shards
    assert not list((tmp_path / "out" / "seq" / "checkpoints" / "t002-s0000000").glob("*optim_states.pt"))
    out = tmp_path / "hf"
    main(["export", "--checkpoint", str(tmp_path / "out" / "seq"), "--out", str(out)])
    assert "tokenizer.json" in os.listdir(out)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tok("is it ?")["input_ids"] == [6, 7, 8]
    from agcl_ds.data.collate import HFTokenizer

    with torch.no_grad():
        logits = load_export(out)(input_ids=_probe_ids(HFTokenizer(tok))).logits
    torch.testing.assert_close(logits, ref["logits"], rtol=1e-5, atol=1e-5)  # 1-thread rank vs this process: sum order


def test_report_prints_side_by_side_and_writes_png(tmp_path, capsys):
    paths = []
    for method, matrix in (("seq", [[0.9, 0.1], [0.2, 0.8]]), ("agcl", [[0.9, 0.1], [0.7, 0.8]])):
        res = {"tasks": ["a", "b"], "matrix": matrix, "base": [0.1, 0.1], "method": method, "config": {"name": "x"},
               "OP": sum(matrix[-1]) / 2, "BWT": matrix[1][0] - matrix[0][0], "FWT": matrix[0][1] - 0.1}
        paths.append(tmp_path / method / "results.json")
        paths[-1].parent.mkdir()
        paths[-1].write_text(json.dumps(res))
    png, curves = tmp_path / "plots" / "metrics.png", tmp_path / "plots" / "curves.png"
    main(["report", *map(str, paths), "--png", str(png), "--curves", str(curves)])
    out = capsys.readouterr().out
    assert "method: seq" in out and "method: agcl" in out and "|" in out
    assert f"wrote {curves}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    other = json.loads(paths[1].read_text()) | {"tasks": ["a", "c"]}
    paths[1].write_text(json.dumps(other))
    with pytest.raises(SystemExit) as e:
        main(["report", *map(str, paths), "--curves", str(tmp_path / "mixed.png")])
    assert e.value.code == 2 and "--curves: the runs' task sequences differ" in capsys.readouterr().err
    assert not (tmp_path / "mixed.png").exists()
    (tmp_path / "bad.json").write_text('{"tasks": []}')
    with pytest.raises(SystemExit) as e:
        main(["report", str(tmp_path / "bad.json"), "--png", str(tmp_path / "no.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err == [f"agcl: error: {tmp_path / 'bad.json'}: not a results.json (no 'matrix')"]
    assert not (tmp_path / "no.png").exists()


def fake_checkpoint(folder, *overrides, world_size=2, zero_stage=3):
    """A checkpoint folder with only position.json: enough for every check made before ranks start."""
    cfg = load_config("configs/demo_synthetic.yaml", [*TINY, "model.pretrain=null", *overrides])
    os.makedirs(folder)
    pos = {"task": 1, "step": 0, "matrix": [], "base": [], "config": cfg.resume_view(), "world_size": world_size,
           "zero_stage": zero_stage, "method": "seq"}
    (folder / "position.json").write_text(json.dumps(pos))
    return str(folder)


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    two = fake_checkpoint(tmp_path / "run" / "checkpoints" / "t001-s0000000")
    one = fake_checkpoint(tmp_path / "one" / "checkpoints" / "t001-s0000000", world_size=1)
    wide = fake_checkpoint(tmp_path / "wide" / "checkpoints" / "t001-s0000000", "model.from_config.hidden_size=64",
                           world_size=1)
    out = tmp_path / "out"
    launched = ["--config", "configs/demo_synthetic.yaml", *TINY, "model.pretrain=null", f"output.dir={out}"]
    cases = [
        (["export", "--checkpoint", str(tmp_path / "nope"), "--out", str(out)], "nope: not a checkpoint folder"),
        (["export", "--checkpoint", two, "--out", str(out)],
         "unusable checkpoint (manifest.json missing or unreadable)"),
        (["export", "--checkpoint", two, "--out", str(out), "--dtype", "int8"], "argument --dtype: invalid choice"),
        (["export", "--checkpoint", two, "--out", str(out), "--adapter"],
         "apply to LoRA runs (model.peft.type lora); this run trained the model itself"),
        (["eval", "--ds", "ds_configs/zero2.json", "--checkpoint", one, *launched],
         "saved under ZeRO stage 3, --ds has stage 2"),
        (["eval", "--ds", "ds_configs/zero3.json", "--checkpoint", wide, *launched],
         "trained with model.from_config = {'arch': 'llama', 'hidden_size': 64"),
        (["eval", "--ds", "ds_configs/zero3.json", *launched, "training.lr=0"], "training.lr: expected a positive"),
        (["attribute", "--ds", "ds_configs/zero3.json", "--checkpoint", one, "--task", "nope", *launched],
         "--task 'nope': not among data.tasks (dec, swap)"),
        (["export", "--checkpoint", two, "--out", "/proc/agcl-export"], "--out: cannot write to '/proc/agcl-export'"),
        (["eval", "--ds", "ds_configs/zero3.json", "--checkpoint", one, "--out", "/proc/x", *launched],
         "--out: cannot write to '/proc/x'"),
        (["attribute", "--ds", "ds_configs/zero3.json", "--task", "dec", *launched],
         "the following arguments are required: --checkpoint"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as e:
            main(args)
        lines = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2, (args, lines)
        assert len(lines) == 1 and lines[0].startswith("agcl: error: ") and message in lines[0], (args, lines)
        assert not out.exists()
        assert sorted(os.listdir(tmp_path / "run")) == ["checkpoints"]
