"""`agcl train`: the continual task sequence, under `deepspeed` / `torchrun` or as one process."""

from __future__ import annotations

import argparse
import os
import sys

from agcl_ds.commands.common import add_launch_arguments, check_writable, prepare
from agcl_ds.config import ConfigError

HELP = "run a continual task sequence (under deepspeed or torchrun)"
EXIT_REQUEUE = 3  # checkpointed after SIGTERM/SIGUSR1: the job wants to be requeued


def add_arguments(cmd: argparse.ArgumentParser) -> None:
    add_launch_arguments(cmd)
    cmd.add_argument("--resume", choices=["auto", "never", "force"], default="auto",
                     help="auto: continue from the newest valid checkpoint (default); never: refuse to start "
                          "over existing checkpoints; force: resume although the config changed")
    cmd.add_argument("overrides", nargs="*", help="key=value overrides, e.g. training.lr=1e-4")


def run(args: argparse.Namespace) -> None:
    from agcl_ds.methods import build_method

    # model, method, data and output problems surface here, before distributed start-up
    p = prepare(args)
    try:
        build_method(p.cfg.method).check(p.cfg)
    except ConfigError as e:
        raise ConfigError(f"{args.config}: {e}") from None
    check_writable(p.cfg.run_dir())  # on every rank: each writes its checkpoint shards there
    from agcl_ds.distributed import init_distributed, shutdown_distributed
    from agcl_ds.loop import Preempted
    from agcl_ds.loop import run as run_sequence

    init_distributed()
    try:
        run_sequence(p.cfg, p.ds_config, resume=args.resume)
    except Preempted as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"agcl: preempted: {e}; exit {EXIT_REQUEUE} asks for a requeue", file=sys.stderr, flush=True)
        shutdown_distributed()
        sys.exit(EXIT_REQUEUE)
