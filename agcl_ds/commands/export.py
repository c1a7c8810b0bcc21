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
    cmd.add_argument("--overwrite", action="store_true", help="replace --out (and --base-out) if it exists")
    cmd.add_argument("--adapter", action="store_true",
                     help="LoRA runs: a PEFT adapter folder (PeftModel.from_pretrained), not the merged model")
    cmd.add_argument("--base-out", help="with --adapter: also write the frozen base model here")


def run(args: argparse.Namespace) -> None:
    if args.base_out and not args.adapter:
        raise CheckpointError("--base-out: only with --adapter (the merged export already holds the base)")
    for flag, path in (("--out", args.out), ("--base-out", args.base_out)):
        if path is None:
            continue
        if os.path.exists(path) and not args.overwrite:
            raise CheckpointError(f"{flag} {path}: exists; pass --overwrite to replace it")
        check_writable(path, flag)
    export_checkpoint(args.checkpoint, args.out, args.dtype, adapter=args.adapter, base_out=args.base_out)
    extra = f" (base in {args.base_out})" if args.base_out else ""
    print(f"exported {os.path.normpath(args.checkpoint)} to {args.out}{extra}")
