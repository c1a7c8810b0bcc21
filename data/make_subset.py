"""Draw the project's copy of the Standard-CL tasks from a CL_Benchmark folder (the O-LoRA layout).

    python data/make_subset.py SOURCE [--out data/CL_Benchmark] [--train 500] [--test 250] [--shuffle-seed S]

SOURCE is a folder in the layout `<TYPE>/<TASK>/{train,test,labels}.json` + `instruction_config.json`:
the public benchmark or the seed-0 subsample this project was given. Each split keeps its first N rows
in file order (loaders take the first `max_train` / `max_test` rows, so a run on the subset sees what it
saw on the source); `--shuffle-seed` shuffles first, for a full public copy in its original order.
Rows whose label is not in labels.json (MNLI's "-", no gold label) are dropped; the rest are copied
unchanged, one JSON object per line inside a JSON list (readable by `json` and `datasets`' json builder).
The output folder is written beside and renamed into place.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys

TASKS = ["TC/agnews", "TC/dbpedia", "SC/yelp", "SC/SST-2", "SC/amazon", "NLI/MNLI", "QQP/QQP", "BoolQA/BoolQA"]


def _rows(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        rows = json.load(f)
    if not isinstance(rows, list) or not all(isinstance(r, dict) and {"sentence", "label"} <= set(r) for r in rows):
        raise SystemExit(f"make_subset: {path}: expected a JSON list of {{\"sentence\", \"label\"}} objects")
    return rows


def _write_rows(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n]\n")


def make_subset(source: str, out: str, n_train: int, n_test: int, shuffle_seed: int | None) -> None:
    tmp = f"{out}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    types = sorted({t.split("/")[0] for t in TASKS})
    with open(os.path.join(source, "instruction_config.json"), encoding="utf-8") as f:
        instructions = json.load(f)
    with open(os.path.join(tmp, "instruction_config.json"), "w", encoding="utf-8") as f:
        json.dump({k: instructions[k] for k in types}, f, indent=2, ensure_ascii=False)
        f.write("\n")
    for task in TASKS:
        src, dst = os.path.join(source, task), os.path.join(tmp, task)
        os.makedirs(dst)
        shutil.copyfile(os.path.join(src, "labels.json"), os.path.join(dst, "labels.json"))
        with open(os.path.join(src, "labels.json"), encoding="utf-8") as f:
            labels = set(json.load(f))
        for split, n in (("train", n_train), ("test", n_test)):
            # rows without a gold label (MNLI's "-": annotators disagreed) cannot be scored
            rows = [r for r in _rows(os.path.join(src, f"{split}.json")) if r["label"] in labels]
            if shuffle_seed is not None:
                random.Random(shuffle_seed).shuffle(rows)
            _write_rows(os.path.join(dst, f"{split}.json"), rows[:n])
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "CL_Benchmark"))
    p.add_argument("--train", type=int, default=500)
    p.add_argument("--test", type=int, default=250)
    p.add_argument("--shuffle-seed", type=int, default=None)
    a = p.parse_args()
    if not os.path.isfile(os.path.join(a.source, "instruction_config.json")):
        sys.exit(f"make_subset: {a.source}: no instruction_config.json (expected a CL_Benchmark folder)")
    make_subset(a.source, a.out, a.train, a.test, a.shuffle_seed)


if __name__ == "__main__":
    main()
