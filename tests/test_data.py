import json
import os

import pytest

from agcl_ds.config import SyntheticConfig
from agcl_ds.data import synthetic
from agcl_ds.data.collate import IGNORE, ByteTokenizer, collate
from agcl_ds.data.hf import load_hf_task, load_trace
from agcl_ds.data.tasks import load_cl_benchmark, load_jsonl
from agcl_ds.data.types import DataError, Example

CL = os.path.join("data", "CL_Benchmark")  # the project's own copy (data/README.md)


def test_cl_benchmark_layout():
    task = load_cl_benchmark(CL, "agnews", max_train=50, max_test=20)
    assert task.name == "agnews" and len(task.train) == 50 and len(task.test) == 20
    assert task.options == [" World", " Sports", " Business", " Science or Technology"]
    ex = task.train[0]
    assert ex.prompt.startswith("What is the topic of the following paragraph?")
    assert "Option: World, Sports, Business, Science or Technology\n" in ex.prompt
    assert ex.prompt.endswith("\nAnswer:") and ex.answer in task.options
    assert load_cl_benchmark(CL, "TC/agnews", 5, 5).train == task.train[:5]
    short = load_cl_benchmark(CL, "agnews", max_train=50, max_test=20, max_input_chars=30)
    for a, b in zip(short.train, task.train, strict=True):  # the instruction and options stay whole
        text = b.prompt.split("Option: World, Sports, Business, Science or Technology\n")[1][:-len("\nAnswer:")]
        assert a.prompt == b.prompt.replace(text, text[:30].rstrip()) and a.answer == b.answer


def make_cl(tmp_path, train, labels=("yes", "no"), test=None):
    root = tmp_path / "cl"
    folder = root / "SC" / "toy"
    folder.mkdir(parents=True)
    (root / "instruction_config.json").write_text(json.dumps({"SC": [{"instruction": "Sentiment?\n"}]}))
    (folder / "labels.json").write_text(json.dumps(list(labels)))
    (folder / "train.json").write_text(train if isinstance(train, str) else json.dumps(train))
    (folder / "test.json").write_text(json.dumps(test or [{"sentence": "a", "label": "yes"}]))
    return str(root)


@pytest.mark.parametrize("train, message", [
    ('[{"sentence": "a", "label": "yes"},\n {"sentence": "b" "label": "no"}]', r"train.json: malformed JSON at line 2"),
    ([{"sentence": "a"}], r"train.json: item 0: missing field 'label'"),
    ([{"sentence": "a", "label": "maybe"}], r"train.json: item 0: label 'maybe' is not in .*labels.json"),
    ([], r"train.json: no examples \(empty task\)"),
    ([{"sentence": 3, "label": "yes"}], r"item 0: field 'sentence' must be a string"),
    ({"sentence": "a"}, r"expected a JSON list of objects"),
])
def test_cl_benchmark_bad_input(tmp_path, train, message):
    root = make_cl(tmp_path, train)
    with pytest.raises(DataError, match=message):
        load_cl_benchmark(root, "toy")


def test_cl_benchmark_unknown_task_lists_known(tmp_path):
    root = make_cl(tmp_path, [{"sentence": "a", "label": "yes"}])
    with pytest.raises(DataError, match=r"no task 'nope' \(found: SC/toy\)"):
        load_cl_benchmark(root, "nope")
    os.remove(os.path.join(root, "instruction_config.json"))
    with pytest.raises(DataError, match="instruction_config.json: file not found"):
        load_cl_benchmark(root, "toy")


def test_trace_layout(tmp_path):
    folder = tmp_path / "C-STANCE"
    folder.mkdir()
    rows = [{"prompt": f"q{i}", "answer": f"a{i}"} for i in range(4)]
    for split in ("train", "eval", "test"):
        (folder / f"{split}.json").write_text(json.dumps(rows))
    task = load_trace(str(tmp_path), "C-STANCE", max_train=3)
    assert task.train == [Example("q0", "a0"), Example("q1", "a1"), Example("q2", "a2")]
    assert len(task.test) == 4 and task.options is None and task.metric == "choice"  # TRACE's metric for it
    (folder / "test.json").write_text(json.dumps([{"prompt": "q"}]))
    with pytest.raises(DataError, match=r"test.json: no field 'answer' \(fields: prompt\)"):
        load_trace(str(tmp_path), "C-STANCE")
    (folder / "test.json").write_text(json.dumps([{"prompt": "q", "answer": "a"}, {"prompt": "r"}]))
    with pytest.raises(DataError, match=r"test.json: item 1: missing field 'answer'"):
        load_trace(str(tmp_path), "C-STANCE")
    (folder / "test.json").write_text("[]")
    with pytest.raises(DataError, match=r"test.json: no examples \(empty split\)"):
        load_trace(str(tmp_path), "C-STANCE")
    (folder / "test.json").write_text('[{"prompt": "q", "answer": ')
    with pytest.raises(DataError, match=r"test.json: cannot read it as json"):
        load_trace(str(tmp_path), "C-STANCE")
    with pytest.raises(DataError, match="TRACE task folder not found"):
        load_trace(str(tmp_path), "other")


def test_trace_fixtures_carry_each_tasks_metric():
    root = os.path.join(os.path.dirname(__file__), "fixtures", "trace")
    metrics = {name: load_trace(root, name).metric for name in sorted(os.listdir(root)) if "." not in name}
    assert metrics == {"20Minuten": "sari", "C-STANCE": "choice", "MeetingBank": "rouge_l", "NumGLUE-cm": "accuracy",
                       "Py150": "edit_sim", "ScienceQA": "choice"}


def test_hf_source_reads_save_to_disk_files_and_templates(tmp_path):
    import datasets

    rows = {"train": [{"question": f"q{i}", "label": i % 2} for i in range(5)],
            "validation": [{"question": "z", "label": 1}]}
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in rows.items()}).save_to_disk(tmp_path / "disk")
    spec = {"path": str(tmp_path / "disk"), "test_split": "validation", "answer_field": "label",
            "template": "Q: {question}\nA:", "metric": "f1"}
    task = load_hf_task("bq", spec, max_train=2)
    assert task.train == [Example("Q: q0\nA:", "0"), Example("Q: q1\nA:", "1")]
    assert task.test == [Example("Q: z\nA:", "1")] and task.metric == "f1"
    files = tmp_path / "files"
    files.mkdir()
    datasets.Dataset.from_list(rows["train"]).to_parquet(files / "train.parquet")
    (files / "test.jsonl").write_text('{"question": "z", "label": 1}\n')
    got = load_hf_task("bq", {**spec, "path": str(files), "test_split": "test"})
    assert got.train[:2] == task.train and got.test == task.test
    with pytest.raises(DataError, match=r"data.hf.bq: no split 'dev' in .* \(found: test, train\)|no split 'dev'"):
        load_hf_task("bq", {**spec, "path": str(files), "test_split": "dev"})
    with pytest.raises(DataError, match=r"template names field 'passage', not among label, question"):
        load_hf_task("bq", {**spec, "template": "{passage}"})
    with pytest.raises(DataError, match=r"no field 'answer' \(fields: label, question\)"):
        load_hf_task("bq", {"path": str(files), "prompt_field": "question"})


def test_hf_source_refuses_what_is_not_on_disk(tmp_path):
    with pytest.raises(DataError, match=r"data.hf.x.path: 'someone/not-cached' is neither a local path nor a "
                                        r"dataset in the offline cache"):
        load_hf_task("x", {"path": "someone/not-cached"})
    with pytest.raises(DataError, match=r"data.hf.x.path: .* holds no save_to_disk dataset"):
        load_hf_task("x", {"path": str(tmp_path)})


def test_jsonl_layout_and_bad_line(tmp_path):
    folder = tmp_path / "t"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"prompt": "p", "answer": " x"}\n\n{"prompt": "q", "answer": " y"}\n')
    (folder / "test.jsonl").write_text('{"prompt": "p", "answer": " y"}\n')
    (folder / "options.json").write_text('[" x", " y"]')
    task = load_jsonl(str(tmp_path), "t")
    assert [e.answer for e in task.train] == [" x", " y"] and task.options == [" x", " y"]
    (folder / "options.json").write_text('[" x"]')
    with pytest.raises(DataError, match=r"answer ' y' is not in .*options.json"):
        load_jsonl(str(tmp_path), "t")
    (folder / "train.jsonl").write_text('{"prompt": "p", "answer": " x"}\n{"prompt": oops}\n')
    with pytest.raises(DataError, match=r"train.jsonl: malformed JSON at line 2"):
        load_jsonl(str(tmp_path), "t")


def test_synthetic_family_shares_inputs_and_differs_in_outputs():
    cfg = SyntheticConfig(n_train=300, n_test=50, seed=3)
    tasks = synthetic.make_tasks(["dec", "revinc", "swap"], cfg)
    again = synthetic.make_tasks(["dec", "revinc", "swap"], cfg)
    assert [t.train for t in tasks] == [t.train for t in again]  # deterministic from the seed
    digits = [[e.prompt.split(":")[1] for e in t.test] for t in tasks]
    assert digits[0] == digits[1] == digits[2]  # the same inputs ...
    answers = [[e.answer for e in t.test] for t in tasks]
    assert all(len({a[i] for a in answers}) > 1 for i in range(50))  # ... mapped differently
    train_in = {e.prompt.split(":")[1] for e in tasks[0].train}
    assert not train_in & set(digits[0])  # no test input is seen in training
    ex = tasks[1].train[0]
    d = [int(c) for c in ex.prompt.split(":")[1].rstrip("=")]
    assert ex.prompt.startswith("revinc:") and ex.answer == "".join(str((x + 1) % 10) for x in d[::-1])


def test_synthetic_mixture_and_bad_names():
    cfg = SyntheticConfig(n_train=100, n_test=10)
    mix = synthetic.make_mixture(cfg)
    assert len(mix.train) == 100 * len(cfg.base_tasks)
    assert {e.prompt.split(":")[0] for e in mix.train} == set(cfg.base_tasks)
    with pytest.raises(DataError, match="data.tasks: unknown synthetic task 'nope'"):
        synthetic.make_tasks(["nope"], cfg)
    with pytest.raises(DataError, match="'rev' is also a base task"):
        synthetic.make_tasks(["rev"], cfg)


def test_collate_masks_the_prompt_and_pads_right():
    tok = ByteTokenizer()
    batch = collate(tok, [Example("ab=", "xy"), Example("a=", "z")], max_len=16)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == (2, 7)  # bos + 3 prompt + 2 answer + eos
    assert labels[0].tolist() == [IGNORE] * 4 + [ord("x") + 3, ord("y") + 3, tok.eos_id]
    assert labels[1].tolist() == [IGNORE] * 3 + [ord("z") + 3, tok.eos_id] + [IGNORE] * 2
    assert mask[1].tolist() == [1] * 5 + [0, 0] and ids[1, 5:].tolist() == [tok.pad_id] * 2
    cut = collate(tok, [Example("0123456789", "xy")], max_len=6)  # prompt cut from the left
    assert cut["labels"][0].tolist()[-3:] == [ord("x") + 3, ord("y") + 3, tok.eos_id]
    assert cut["input_ids"].shape == (1, 6)
    with pytest.raises(DataError, match="does not fit max_seq_len=3"):
        collate(tok, [Example("p", "xyz")], max_len=3)


def test_project_data_is_complete_and_datasets_reads_it(tmp_path):
    """data/CL_Benchmark holds every task the configs name, 500 train / 250 test rows each, in a layout
    that `datasets`' json builder reads too; make_subset.py redraws it byte for byte."""
    import importlib.util

    import datasets

    spec = importlib.util.spec_from_file_location("make_subset", os.path.join("data", "make_subset.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    TASKS, make_subset = tool.TASKS, tool.make_subset

    for name in TASKS:
        task = load_cl_benchmark(CL, name)
        assert (len(task.train), len(task.test)) == (500, 250), name
    rows = datasets.load_dataset("json", data_files=os.path.join(CL, "TC", "agnews", "test.json"),
                                 split="train", cache_dir=str(tmp_path / "hf"))
    assert rows.num_rows == 250 and set(rows.column_names) == {"sentence", "label"}
    make_subset(CL, str(tmp_path / "again"), 500, 250, None)
    for name in TASKS:
        for split in ("train", "test", "labels"):
            rel = os.path.join(name, f"{split}.json")
            assert (tmp_path / "again" / rel).read_bytes() == open(os.path.join(CL, rel), "rb").read(), rel
