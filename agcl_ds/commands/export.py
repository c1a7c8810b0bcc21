"""`agcl export`: a checkpoint taken after any task → an ordinary Hugging Face folder (offline)."""

from __future__ import annotations

import argparse
import os

from agcl_ds.checkpoint import CheckpointError
from agcl_ds.commands.common import CKPT_HELP, check_writable
from agcl_ds.export import DTYPES, export_checkpoint

HELP = "a consolidated Hugging Face model folder from a sharded checkpoint (offline, one process)"


def add_arguments(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--checkpoint", required=True, help=CKPT_HELP)
    cmd.add_argument("--out", required=True, help="the Hugging Face folder to write")
    cmd.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights dtype (default fp32)")
    cmd.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def run(args: argparse.Namespace) -> None:
    if os.path.exists(args.out) and not args.overwrite:
        raise CheckpointError(f"--out {args.out}: exists; pass --overwrite to replace it")
    check_writable(args.out, "--out")
    export_checkpoint(args.checkpoint, args.out, args.dtype)
    print(f"exported {os.path.normpath(args.checkpoint)} to {args.out}")
