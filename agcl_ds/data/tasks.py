"""Tasks and their loaders: the data stage of the pipeline.

A task is a name, train and test examples (prompt → answer text) and how it is scored. Loaders read
the layouts users already have on disk; every problem with a file is reported with the file, the
item and the field, in one line, before any model is loaded.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable
from typing import Any

from agcl_ds.data import synthetic
from agcl_ds.data.hf import load_hf_task, load_trace
from agcl_ds.data.types import DataError, Example, Task


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None


def _read_jsonl(path: str) -> list[Any]:
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}: malformed JSON at line {lineno}: {e.msg}") from None
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    return rows


def _field(item: Any, key: str, path: str, index: int) -> str:
    if not isinstance(item, dict):
        raise DataError(f"{path}: item {index}: expected an object, got {type(item).__name__}")
    if key not in item:
        raise DataError(f"{path}: item {index}: missing field '{key}'")
    value = item[key]
    if not isinstance(value, str):
        raise DataError(f"{path}: item {index}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def _pairs(rows: Any, path: str, prompt_key: str, answer_key: str) -> list[tuple[str, str]]:
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of objects")
    if not rows:
        raise DataError(f"{path}: no examples (empty task)")
    return [(_field(r, prompt_key, path, i), _field(r, answer_key, path, i)) for i, r in enumerate(rows)]


def _cap(examples: list[Example], limit: int | None) -> list[Example]:
    return examples if limit is None else examples[:limit]


# --------------------------------------------------------------------------- Standard-CL layout


def _find_cl_task(root: str, name: str) -> str:
    """`agnews` or `TC/agnews` → the folder `<root>/<TYPE>/<TASK>`."""
    if "/" in name:
        folder = os.path.join(root, name)
        if os.path.isdir(folder):
            return folder
    else:
        hits = sorted(glob.glob(os.path.join(root, "*", name)))
        if len(hits) == 1 and os.path.isdir(hits[0]):
            return hits[0]
        if len(hits) > 1:
            raise DataError(f"{root}: task '{name}' is ambiguous ({', '.join(hits)}); write TYPE/{name}")
    known = sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, "*", "*")) if os.path.isdir(p))
    raise DataError(f"{root}: no task '{name}' (found: {', '.join(known) or 'none'})")


def load_cl_benchmark(root: str, name: str, max_train: int | None = None,
                      max_test: int | None = None, max_input_chars: int | None = None) -> Task:
    """`<root>/<TYPE>/<TASK>/{train,test}.json` of {"sentence","label"}, `labels.json`, and one
    instruction per TYPE in `<root>/instruction_config.json` (the O-LoRA / Standard-CL layout).

    `max_input_chars` shortens the input text itself, so that the instruction and the option list
    in front of it survive (`encode` would otherwise cut a long prompt from the left)."""
    if not os.path.isdir(root):
        raise DataError(f"{root}: data folder not found")
    folder = _find_cl_task(root, name)
    task_type = os.path.basename(os.path.dirname(folder))
    cfg_path = os.path.join(root, "instruction_config.json")
    instructions = _read_json(cfg_path)
    if not isinstance(instructions, dict) or task_type not in instructions:
        raise DataError(f"{cfg_path}: no instruction for task type '{task_type}'")
    entry = instructions[task_type]
    entry = entry[0] if isinstance(entry, list) and entry else entry
    if not isinstance(entry, dict) or not isinstance(entry.get("instruction"), str):
        raise DataError(f"{cfg_path}: {task_type}: expected [{{\"instruction\": \"...\"}}]")
    instruction = entry["instruction"]
    labels_path = os.path.join(folder, "labels.json")
    labels = _read_json(labels_path)
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise DataError(f"{labels_path}: expected a non-empty JSON list of label strings")
    header = f"{instruction}Option: {', '.join(labels)}\n"

    def split(kind: str, limit: int | None) -> list[Example]:
        path = os.path.join(folder, f"{kind}.json")
        pairs = _pairs(_read_json(path), path, "sentence", "label")
        out = []
        for i, (sentence, label) in enumerate(pairs[: limit if limit is not None else len(pairs)]):
            if label not in labels:
                raise DataError(f"{path}: item {i}: label {label!r} is not in {labels_path}")
            text = sentence.strip()[:max_input_chars].rstrip()
            out.append(Example(f"{header}{text}\nAnswer:", f" {label}"))
        return out

    return Task(name=os.path.basename(folder), train=split("train", max_train), test=split("test", max_test),
                options=[f" {x}" for x in labels], meta={"type": task_type})


# --------------------------------------------------------------------------- JSONL


def _task_folder(root: str, name: str, layout: str) -> str:
    folder = os.path.join(root, name)
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: {layout} task folder not found")
    return folder


def _prompt_answer_split(folder: str, fname: str, read: Callable[[str], Any], limit: int | None) -> list[Example]:
    """One split file of {"prompt", "answer"} records."""
    path = os.path.join(folder, fname)
    return _cap([Example(p, a) for p, a in _pairs(read(path), path, "prompt", "answer")], limit)


def load_jsonl(root: str, name: str, max_train: int | None = None, max_test: int | None = None) -> Task:
    """Generic JSONL: `<root>/<TASK>/{train,test}.jsonl`, one {"prompt","answer"} per line; an
    optional `<root>/<TASK>/options.json` lists the closed answer set for likelihood scoring."""
    folder = _task_folder(root, name, "JSONL")
    options = None
    opt_path = os.path.join(folder, "options.json")
    if os.path.exists(opt_path):
        options = _read_json(opt_path)
        if not isinstance(options, list) or not all(isinstance(x, str) for x in options):
            raise DataError(f"{opt_path}: expected a JSON list of answer strings")
    task = Task(name=name, train=_prompt_answer_split(folder, "train.jsonl", _read_jsonl, max_train),
                test=_prompt_answer_split(folder, "test.jsonl", _read_jsonl, max_test), options=options)
    if options is not None:
        for i, ex in enumerate(task.train + task.test):
            if ex.answer not in options:
                raise DataError(f"{folder}: example {i}: answer {ex.answer!r} is not in {opt_path}")
    return task


def load_task_list(cfg, names: list[str]) -> list[Task]:
    """Tasks by name from the configured source, each scored by `evaluation.metrics` where it names one,
    else by its layout's metric (cfg: agcl_ds.config.ExperimentConfig)."""
    d = cfg.data
    if d.source == "synthetic":
        tasks = [Task(t.name, _cap(t.train, d.max_train), _cap(t.test, d.max_test), t.options, t.meta)
                 for t in synthetic.make_tasks(names, d.synthetic)]
    elif d.source == "cl_benchmark":
        tasks = [load_cl_benchmark(d.path, name, d.max_train, d.max_test, d.max_input_chars) for name in names]
    elif d.source == "hf":
        tasks = [load_hf_task(name, d.hf[name], d.max_train, d.max_test) for name in names]
    else:
        loader = {"trace": load_trace, "jsonl": load_jsonl}[d.source]
        tasks = [loader(d.path, name, d.max_train, d.max_test) for name in names]
    for task in tasks:
        task.metric = cfg.evaluation.metrics.get(task.name, task.metric)
    return tasks


def load_tasks(cfg) -> list[Task]:
    """The configured task sequence, in order."""
    return load_task_list(cfg, cfg.data.tasks)


def load_general(cfg) -> list[Task]:
    """`evaluation.general`: tasks never trained on, from the same source, scored for retention."""
    return load_task_list(cfg, cfg.evaluation.general)
