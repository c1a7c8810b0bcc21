"""Tasks read through Hugging Face `datasets`: the TRACE layout and any dataset a user has on disk.

`data.source: hf` names, per task, a `save_to_disk` folder, a data file or a folder of them
(parquet, json, jsonl, csv: each file is the split its name says), or a hub id already in the local cache.
Nothing is downloaded: `datasets` runs offline (HF_DATASETS_OFFLINE), and an id that is not cached
is a one-line error. Rows become prompt → answer examples through `prompt_field`/`answer_field` or a
template that names fields (`"Question: {question}\\nAnswer:"`).
"""

from __future__ import annotations

import os
from typing import Any

from agcl_ds.config import HFTaskConfig, from_dict
from agcl_ds.data.types import DataError, Example, Task

TRACE_METRICS = {  # TRACE's scoring per task (its evaluations/ scripts)
    "C-STANCE": "choice", "FOMC": "choice", "ScienceQA": "choice",
    "NumGLUE-cm": "accuracy", "NumGLUE-ds": "accuracy",
    "MeetingBank": "rouge_l", "Py150": "edit_sim", "20Minuten": "sari",
}
_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def _datasets():
    """`datasets`, offline and quiet (set before it reads its config, and again if imported earlier)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    datasets.config.HF_HUB_OFFLINE = True
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def _cause(e: BaseException) -> str:
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def read_records(path: str) -> list[dict[str, Any]]:
    """The rows of one data file (a JSON list, JSON lines, parquet or csv)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    fmt = _FORMATS.get(os.path.splitext(path)[1].lower())
    if fmt is None:
        raise DataError(f"{path}: unknown data file type (expected {', '.join(sorted(_FORMATS))})")
    if os.path.getsize(path) == 0:
        return []
    ds = _datasets()
    try:
        return ds.load_dataset(fmt, data_files={"rows": path}, split="rows").to_list()
    except ValueError as e:
        if "corresponds to no data" in str(e):  # an empty JSON list
            return []
        raise DataError(f"{path}: cannot read it as {fmt} ({_cause(e)})") from None
    except ds.exceptions.DatasetGenerationError as e:
        raise DataError(f"{path}: cannot read it as {fmt} ({_cause(e)})") from None


def _splits(spec: HFTaskConfig, where: str) -> dict[str, list[dict[str, Any]]]:
    """split name -> rows, for whatever `spec.path` is."""
    path = spec.path
    if os.path.isfile(path):  # one file: one split, named by the file
        return {os.path.splitext(os.path.basename(path))[0]: read_records(path)}
    ds = _datasets()
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "dataset_dict.json")) or os.path.isfile(
                os.path.join(path, "state.json")):
            loaded = ds.load_from_disk(path)
            if isinstance(loaded, ds.Dataset):
                return {spec.train_split: loaded.to_list(), spec.test_split: loaded.to_list()}
            return {name: split.to_list() for name, split in loaded.items()}
        files = {os.path.splitext(f)[0]: os.path.join(path, f) for f in sorted(os.listdir(path))
                 if os.path.splitext(f)[1].lower() in _FORMATS}
        if not files:
            raise DataError(f"{where}.path: {path!r} holds no save_to_disk dataset and no "
                            f"{'/'.join(sorted(_FORMATS))} files")
        return {name: read_records(f) for name, f in files.items() if name in (spec.train_split, spec.test_split)}
    try:
        loaded = ds.load_dataset(path, spec.name)
    except Exception as e:  # datasets raises several types for "not on disk, not in the cache"
        raise DataError(f"{where}.path: {path!r} is neither a local path nor a dataset in the offline cache "
                        f"({_cause(e)})") from None
    return {name: split.to_list() for name, split in loaded.items()}


def examples(rows: list[dict[str, Any]], where: str, prompt_field: str, answer_field: str,
             template: str | None = None, limit: int | None = None) -> list[Example]:
    """Prompt → answer examples of dataset rows; a row without the fields is an error naming it."""
    if not rows:
        raise DataError(f"{where}: no examples (empty split)")
    fields = sorted(rows[0])
    need = [answer_field] + ([] if template else [prompt_field])
    for name in need:
        if name not in rows[0]:
            raise DataError(f"{where}: no field {name!r} (fields: {', '.join(fields)})")
    out = []
    for i, row in enumerate(rows[:limit] if limit is not None else rows):
        answer = row.get(answer_field)
        if answer is None:
            raise DataError(f"{where}: item {i}: missing field {answer_field!r}")
        if template:
            try:
                prompt = template.format(**row)
            except KeyError as e:
                raise DataError(f"{where}: template names field {e.args[0]!r}, not among {', '.join(fields)}") \
                    from None
        else:
            prompt = row.get(prompt_field)
            if not isinstance(prompt, str):
                raise DataError(f"{where}: item {i}: field {prompt_field!r} must be a string, got "
                                f"{type(prompt).__name__}")
        out.append(Example(prompt, answer if isinstance(answer, str) else str(answer)))
    return out


def load_hf_task(name: str, spec: dict[str, Any] | HFTaskConfig, max_train: int | None = None,
                 max_test: int | None = None) -> Task:
    """One task of `data.source: hf` from its `data.hf.<name>` entry."""
    where = f"data.hf.{name}"
    spec = spec if isinstance(spec, HFTaskConfig) else from_dict(HFTaskConfig, spec, where)
    splits = _splits(spec, where)
    for split in (spec.train_split, spec.test_split):
        if split not in splits:
            raise DataError(f"{where}: no split {split!r} in {spec.path} (found: {', '.join(sorted(splits))})")

    def split_examples(split: str, limit: int | None) -> list[Example]:
        return examples(splits[split], f"{spec.path} [{split}]", spec.prompt_field, spec.answer_field,
                        spec.template, limit)

    return Task(name, split_examples(spec.train_split, max_train), split_examples(spec.test_split, max_test),
                metric=spec.metric or "accuracy")


def load_trace(root: str, name: str, max_train: int | None = None, max_test: int | None = None) -> Task:
    """TRACE layout: `<root>/<TASK>/{train,eval,test}.json` of {"prompt","answer"} (eval unused), scored
    by TRACE's metric for the task (`TRACE_METRICS`; accuracy for a task TRACE does not have)."""
    folder = os.path.join(root, name)
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: TRACE task folder not found")

    def split(kind: str, limit: int | None) -> list[Example]:
        path = os.path.join(folder, f"{kind}.json")
        return examples(read_records(path), path, "prompt", "answer", limit=limit)

    return Task(name, split("train", max_train), split("test", max_test), metric=TRACE_METRICS.get(name, "accuracy"))
