"""`agcl` command line: train, report.

User errors (config, data, model, DeepSpeed JSON) end the process with one line on stderr and
exit code 2, before any rank has loaded a model or written output.
"""

from __future__ import annotations

import argparse
import os
import sys

from agcl_ds.checkpoint import CheckpointError
from agcl_ds.config import ConfigError, load_config, load_ds_config, resolve_ds_config
from agcl_ds.data.tasks import DataError
from agcl_ds.models import ModelError

USER_ERRORS = (ConfigError, DataError, ModelError, CheckpointError)
EXIT_REQUEUE = 3  # checkpointed after SIGTERM/SIGUSR1: the job wants to be requeued


def _fail(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(f"agcl: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def cmd_train(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.overrides)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ds_config = resolve_ds_config(load_ds_config(args.ds), cfg, world, path=args.ds)
    from agcl_ds.data.tasks import load_tasks
    from agcl_ds.models import check_source

    check_source(cfg.model)  # model and data problems surface here, before distributed start-up
    load_tasks(cfg)
    from agcl_ds.distributed import init_distributed
    from agcl_ds.loop import Preempted, run

    init_distributed()
    try:
        run(cfg, ds_config, resume=args.resume)
    except Preempted as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"agcl: preempted: {e}; exit {EXIT_REQUEUE} asks for a requeue", file=sys.stderr, flush=True)
        sys.exit(EXIT_REQUEUE)


def cmd_report(args: argparse.Namespace) -> None:
    from agcl_ds.report import load_results, side_by_side, summary_table

    try:
        results = load_results(args.results)
    except ValueError as e:
        _fail(str(e))
    print(side_by_side(results))
    print()
    print(summary_table(results))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agcl", description="Continual fine-tuning with attribution-guided gates")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run a continual task sequence (under deepspeed or torchrun)")
    train.add_argument("--config", required=True, help="experiment YAML")
    train.add_argument("--ds", required=True, help="DeepSpeed JSON (\"auto\" fields filled from the YAML)")
    train.add_argument("--resume", choices=["auto", "never", "force"], default="auto",
                       help="auto: continue from the newest valid checkpoint (default); never: refuse to start "
                            "over existing checkpoints; force: resume although the config changed")
    train.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. training.lr=1e-4")
    train.set_defaults(fn=cmd_train)
    report = sub.add_parser("report", help="print matrices and OP/BWT/FWT of one or more results.json")
    report.add_argument("results", nargs="+")
    report.set_defaults(fn=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except USER_ERRORS as e:
        _fail(str(e))


if __name__ == "__main__":
    main()
