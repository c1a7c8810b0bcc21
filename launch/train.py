"""Entry point for launchers: `deepspeed launch/train.py --ds ... --config ...` or
`torchrun --nproc_per_node N launch/train.py --ds ... --config ...`."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from agcl_ds.cli import entry  # noqa: E402

if __name__ == "__main__":
    entry(["train", *sys.argv[1:]])
