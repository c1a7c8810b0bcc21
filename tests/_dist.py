"""Run a test body on N CPU ranks (gloo) from inside one pytest process.

Bodies are module-level functions `body(tmp: str, *args) -> object`; each rank's return value comes
back as a list indexed by rank, so assertions can be made in the parent as well as in the ranks.
"""

from __future__ import annotations

import importlib
import os
import pickle
import sys
import tempfile

import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _worker(rank: int, world: int, port: int, module: str, name: str, tmp: str, args: tuple) -> None:
    sys.path.insert(0, ROOT)
    from agcl_ds.distributed import end_rank, join_local_group

    join_local_group(rank, world, port)
    fn = getattr(importlib.import_module(module), name)
    out = fn(tmp, *args)
    with open(os.path.join(tmp, f".result{rank}.pkl"), "wb") as f:  # written by us, read by us
        pickle.dump(out, f)
    end_rank()  # as a launched rank ends (the result is on disk)


def run_ranks(fn, *args, world: int = 2, tmp: str | None = None) -> list:
    """Run `fn(tmp, *args)` on `world` spawned CPU ranks; return each rank's result.

    Without `tmp`, the ranks share a fresh temporary folder that is removed afterwards.
    """
    if tmp is None:
        with tempfile.TemporaryDirectory(prefix="agcl_dist_") as own:
            return run_ranks(fn, *args, world=world, tmp=own)
    os.makedirs(tmp, exist_ok=True)
    from agcl_ds.distributed import free_port

    mp.spawn(_worker, args=(world, free_port(), fn.__module__, fn.__name__, tmp, args),
             nprocs=world, join=True)
    results = []
    for r in range(world):
        with open(os.path.join(tmp, f".result{r}.pkl"), "rb") as f:
            results.append(pickle.load(f))
    return results
