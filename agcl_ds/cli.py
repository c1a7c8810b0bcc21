"""`agcl` command line: the parser and the dispatch; each sub-command is a module of agcl_ds.commands.

User errors (config, data, model, DeepSpeed JSON, checkpoint) end the process with one line on
stderr and exit code 2, before any rank has loaded a model or written output.

`train`, `eval` and `attribute` run under a launcher (`deepspeed`, `torchrun`) or as one process;
`export`, `report` and `overlap` are offline, one process, no DeepSpeed ranks.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from agcl_ds.commands.common import USER_ERRORS, fail

COMMANDS = {  # sub-command -> module of agcl_ds.commands, in the order `agcl -h` lists them
    "train": "train",
    "eval": "evaluate",
    "attribute": "attribute",
    "export": "export",
    "report": "report",
    "overlap": "overlap",
}


class _Parser(argparse.ArgumentParser):
    """Usage errors follow the same contract as every other user error: one line, exit 2."""

    def error(self, message: str) -> None:
        fail(f"{message} (see {self.prog} -h)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="agcl", description="Continual fine-tuning with attribution-guided gates")
    # `deepspeed --module agcl_ds.cli` passes --local_rank before the subcommand
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        command = importlib.import_module(f"agcl_ds.commands.{module}")
        cmd = sub.add_parser(name, help=command.HELP)
        command.add_arguments(cmd)
        cmd.set_defaults(fn=command.run)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also follow an option (`... --checkpoint DIR data.tasks=[dec]`)
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.fn(args)
    except USER_ERRORS as e:
        fail(str(e))
    dist_helpers = sys.modules.get("agcl_ds.distributed")
    if dist_helpers is not None:  # every rank leaves the group together: gloo can abort a lone exit
        dist_helpers.shutdown_distributed()


def entry(argv: list[str] | None = None) -> None:
    """The `agcl` command and `launch/train.py`: main(), then a rank of a distributed job ends without
    interpreter teardown (agcl_ds.distributed.end_rank says why). In-process callers use main()."""
    main(argv)
    dist_helpers = sys.modules.get("agcl_ds.distributed")
    if dist_helpers is not None and dist_helpers.joined:
        dist_helpers.end_rank()


if __name__ == "__main__":
    entry()
