"""Process-group set-up and the few collective helpers every stage shares.

One code path serves a 2-rank CPU test (gloo) and a multi-node GPU job (NCCL): the backend follows
DeepSpeed's accelerator, and a single process without launcher variables still gets a 1-rank group,
so every stage can call collectives unconditionally.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import warnings
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist

joined = False  # this process has created or joined a process group (entry points then end through end_rank)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: int = 1800) -> None:
    """Join (or create) the default process group through DeepSpeed.

    On the CPU accelerator DeepSpeed would JIT-compile its shared-memory all-reduce op on first
    use (25-100 s, needs g++); that op serves inference only, so it is switched off here.
    """
    import deepspeed
    import deepspeed.ops

    # DeepSpeed calls the collectives torch 2.13 deprecates; the warning repeats on every step
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*",
                            category=FutureWarning)
    if dist.is_available() and dist.is_initialized():
        return
    if "RANK" not in os.environ:  # plain `python launch/train.py`: a 1-rank group
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    accel = deepspeed.get_accelerator()
    if accel.device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        backend = "gloo"
    else:
        backend = accel.communication_backend_name()
        accel.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))
    global joined
    joined = True


def local_accelerator() -> str:
    """`cpu` or `cuda`: what spawned local ranks (tests, benchmarks) run on; DS_ACCELERATOR decides, cpu if unset."""
    return "cuda" if os.environ.get("DS_ACCELERATOR", "cpu") == "cuda" else "cpu"


def local_world(wanted: int) -> int:
    """Ranks a local group can have: `wanted` CPU ranks, or one per GPU (NCCL refuses two ranks on one GPU)."""
    if local_accelerator() == "cpu":
        return wanted
    return max(1, min(wanted, torch.cuda.device_count()))


def join_local_group(rank: int, world: int, port: int) -> None:
    """Make this process rank `rank` of a `world`-rank group on this machine, as a launcher would
    (tests and benchmarks spawn their own ranks): env:// variables, one thread per CPU rank, then init.
    The accelerator is `local_accelerator()`: gloo on CPU, NCCL with one GPU per rank on CUDA."""
    accel = local_accelerator()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR=accel)
    if accel == "cpu":
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    init_distributed()


def shutdown_distributed() -> None:
    """Leave the process group together: a rank that exits while gloo's threads still run can
    abort ("terminate called without an active exception")."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def end_rank() -> NoReturn:
    """Leave the group and end this process with exit status 0, skipping interpreter teardown.

    Only for entry points, once a rank's work is done and its files are closed. Even after
    destroy_process_group, a C++ thread (gloo's or DeepSpeed's) can still be joinable while the
    interpreter is being torn down; that rarely aborts a rank of a finished job with SIGABRT ("terminate
    called without an active exception"), and the launcher then reports the job as failed.
    """
    shutdown_distributed()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def device() -> torch.device:
    """The device this rank computes on (cpu, or cuda:LOCAL_RANK)."""
    import deepspeed

    accel = deepspeed.get_accelerator()
    if accel.device_name() == "cpu":
        return torch.device("cpu")
    return torch.device(accel.device_name(int(os.environ.get("LOCAL_RANK", "0"))))


def all_sum(values: list[float]) -> list[float]:
    """Sum a short list of numbers over ranks (counts, losses) in float64."""
    t = torch.tensor(values, dtype=torch.float64, device=device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def all_gather_object(obj) -> list:
    """Every rank's picklable object, indexed by rank (in-memory only, never from disk)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from `src` to every rank (in-memory only, never from disk)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
