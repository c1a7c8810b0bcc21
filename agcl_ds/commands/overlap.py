"""`agcl overlap`: overlap of the tasks' top-k% important parameters per layer (agcl_ds.analysis)."""

from __future__ import annotations

import argparse

from agcl_ds import analysis
from agcl_ds.commands.common import fail

HELP = "overlap of the tasks' top-k%% important parameters per layer"
add_arguments = analysis.add_arguments


def run(args: argparse.Namespace) -> None:
    try:
        analysis.cmd_overlap(args)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
