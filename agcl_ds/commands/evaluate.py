"""`agcl eval`: one score row for every configured task with a checkpoint's (or the configured) model."""

from __future__ import annotations

import argparse
import os

from agcl_ds import checkpoint
from agcl_ds.commands.common import CKPT_HELP, add_launch_arguments, check_writable, engine_for, prepare

HELP = "evaluate every configured task with a checkpoint's (or the configured) model"


def add_arguments(cmd: argparse.ArgumentParser) -> None:
    add_launch_arguments(cmd)
    cmd.add_argument("--checkpoint", help=CKPT_HELP)
    cmd.add_argument("--out", help="folder for eval.json (default: the checkpoint's run dir, else the config's)")
    cmd.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.tasks=[dec]")


def run(args: argparse.Namespace) -> None:
    from agcl_ds.distributed import barrier, is_main, world_size
    from agcl_ds.evaluation import Evaluator
    from agcl_ds.fileio import write_json

    p = prepare(args)
    out_dir = args.out or (checkpoint.run_dir_of(p.folder) if p.folder else p.cfg.run_dir())
    check_writable(out_dir, "--out")
    engine, tok = engine_for(p, out_dir)
    ev = p.cfg.evaluation
    row = Evaluator.for_run(engine, tok, p.cfg).evaluate_all(p.tasks)
    names = [t.name for t in p.tasks]
    if is_main():
        source = p.folder or "the configured model"
        width = max(8, *(len(n) for n in names)) + 1
        print(f"eval of {source}:\n" + "".join(f"{n:>{width}}" for n in names) + "\n"
              + "".join(f"{a:>{width}.3f}" for a in row), flush=True)
        result = {"tasks": names, "metrics": [t.metric for t in p.tasks], "row": row, "checkpoint": p.folder,
                  "position": {"task": p.pos.task, "step": p.pos.step} if p.pos else None,
                  "method": p.cfg.method.name, "mode": ev.mode, "world_size": world_size(),
                  "config": p.cfg.to_dict()}
        write_json(os.path.join(out_dir, "eval.json"), result, indent=2)
        print(f"wrote {os.path.join(out_dir, 'eval.json')}", flush=True)
    barrier()
