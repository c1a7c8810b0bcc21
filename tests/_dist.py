"""Run a test body on N local ranks from inside one pytest process.

Bodies are module-level functions `body(tmp: str, *args) -> object`; each rank's return value comes
back as a list indexed by rank (tensors moved to the CPU), so assertions can be made in the parent as
well as in the ranks. CPU ranks use gloo. With DS_ACCELERATOR=cuda (benchmarks/gpu_check.sh) the same
bodies run with NCCL, one rank per GPU: on a one-GPU machine a 2-rank body runs as 1 rank.
"""

from __future__ import annotations

import importlib
import os
import pickle
import sys
import tempfile

import torch
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _worker(rank: int, world: int, port: int, module: str, name: str, tmp: str, args: tuple) -> None:
    sys.path.insert(0, ROOT)
    from agcl_ds.distributed import end_rank, join_local_group

    join_local_group(rank, world, port)
    fn = getattr(importlib.import_module(module), name)
    out = _to_cpu(fn(tmp, *args))
    with open(os.path.join(tmp, f".result{rank}.pkl"), "wb") as f:  # written by us, read by us
        pickle.dump(out, f)
    end_rank()  # as a launched rank ends (the result is on disk)


def run_ranks(fn, *args, world: int = 2, tmp: str | None = None) -> list:
    """Run `fn(tmp, *args)` on `world` spawned ranks (fewer on CUDA: one per GPU); return each rank's result.

    Without `tmp`, the ranks share a fresh temporary folder that is removed afterwards.
    """
    if tmp is None:
        with tempfile.TemporaryDirectory(prefix="agcl_dist_") as own:
            return run_ranks(fn, *args, world=world, tmp=own)
    os.makedirs(tmp, exist_ok=True)
    from agcl_ds.distributed import free_port, local_world

    world = local_world(world)
    mp.spawn(_worker, args=(world, free_port(), fn.__module__, fn.__name__, tmp, args),
             nprocs=world, join=True)
    results = []
    for r in range(world):
        with open(os.path.join(tmp, f".result{r}.pkl"), "rb") as f:
            results.append(pickle.load(f))
    return results
