"""`agcl attribute`: the LRP attribution pass for one task on a checkpoint's model, saved as an
importance store (with `importance/consolidated.safetensors` for tools outside this package)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from agcl_ds import checkpoint
from agcl_ds.commands.common import CKPT_HELP, add_launch_arguments, check_writable, engine_for, prepare
from agcl_ds.config import ConfigError

HELP = "LRP importance of one task on a checkpoint's model, saved as an importance store"


def add_arguments(cmd: argparse.ArgumentParser) -> None:
    add_launch_arguments(cmd)
    cmd.add_argument("--checkpoint", required=True, help=CKPT_HELP)
    cmd.add_argument("--task", required=True, help="a task name from data.tasks")
    cmd.add_argument("--out", help="folder for importance/ (default: <run_dir>/attribution/<tag>-<task>)")
    cmd.add_argument("overrides", nargs="*", help="key=value overrides, e.g. method.options.attribution.k=4")


def run(args: argparse.Namespace) -> None:
    from agcl_ds.attribution import AttributionOptions, attribute
    from agcl_ds.distributed import barrier, is_main
    from agcl_ds.importance.store import ImportanceStore, consolidate
    from agcl_ds.methods import build_method

    p = prepare(args)
    names = [t.name for t in p.tasks]
    if args.task not in names:
        raise ConfigError(f"--task {args.task!r}: not among data.tasks ({', '.join(names)})")
    task = p.tasks[names.index(args.task)]
    # the method's own attribution settings (method agcl), else the defaults
    opts = getattr(build_method(p.cfg.method).options, "attribution", AttributionOptions())
    tag = os.path.basename(p.folder)
    out = args.out or os.path.join(checkpoint.run_dir_of(p.folder), "attribution",
                                   f"{tag}-{task.name.replace('/', '_')}")
    check_writable(out, "--out")
    engine, tok = engine_for(p, out)
    importance, n = attribute(engine, tok, task.train, opts, p.cfg.data.max_seq_len, seed=p.cfg.seed)
    meta = {"rules": opts.variant, "attribution": dataclasses.asdict(opts), "checkpoint": p.folder, "task": task.name}
    store = ImportanceStore.for_engine(engine, keep_tasks=True, meta=meta)
    store.add_task(task.name, importance)
    store.save(out)
    if is_main():
        consolidate(out)
        print(f"importance of {task.name}: {n} samples explained; store in {os.path.join(out, 'importance')} "
              f"(consolidated.safetensors: full tensors)", flush=True)
        if n == 0:
            print(f"agcl: warning: no sample of {task.name} was answered correctly; its importance is zero",
                  file=sys.stderr, flush=True)
    barrier()
