"""Gate overhead: time spent in the gate vs the whole training step, measured in the same run.

ZeRO-3 on 2 CPU ranks (gloo, spawned here), a tiny and a ~50M-parameter Llama, AdamW with a random R̄ in
[0, 1], 8 sequences per rank per step by default (1024 tokens for the 50M model, as many per rank as the
70B recipe; the gate's share falls as tokens per step grow: --micro-batch 2 shows a smaller workload).
For each step we record the iteration time (forward + backward + engine.step) and the gate's own
time (`Gate.elapsed_s`); a row reports the medians over N steps. The last line is the 50M model under
the default gate (`auto` -> `update` for AdamW).

    python benchmarks/bench_gate.py --quick          # < 2 minutes
    python benchmarks/bench_gate.py --steps 20 --dtype bf16
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.multiprocessing as mp
from _zero3 import MODELS, zero3_llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEEP = {"auto": None, "on": True, "off": False}


def _measure(engine, gate, batch: int, seq: int, vocab: int, warmup: int, steps: int) -> tuple[float, float]:
    """Median iteration and median gate seconds per step."""
    rank = torch.distributed.get_rank()
    it, gt = [], []
    for k in range(warmup + steps):
        x = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(100 * k + rank))
        torch.distributed.barrier()
        g0, t0 = gate.elapsed_s, time.perf_counter()
        engine.backward(engine(input_ids=x, labels=x).loss)
        engine.step()
        if k >= warmup:
            it.append(time.perf_counter() - t0)
            gt.append(gate.elapsed_s - g0)
    return statistics.median(it), statistics.median(gt)


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, queue) -> None:
    sys.path.insert(0, ROOT)
    from agcl_ds.distributed import join_local_group

    join_local_group(rank, world, port)
    from agcl_ds.gate import Gate
    from agcl_ds.importance.partition import local_shards

    rows = []
    for model in args.models:
        engine = zero3_llama(model, args.micro_batch, args.dtype)
        g = torch.Generator().manual_seed(rank)
        specs = local_shards(engine)
        rbar = {n: torch.rand(s.numel, generator=g).to(torch.bfloat16) for n, s in specs.items()}
        n_params = sum(s.full_numel for s in specs.values())
        steps = args.steps if model != "tiny" else max(args.steps, 10)
        for mode in args.modes:
            gate = Gate(engine, gate_on=mode, keep_snapshot=KEEP[args.keep_snapshot])
            gate.set_importance(rbar)
            it, gt = _measure(engine, gate, args.micro_batch, MODELS[model][6], MODELS[model][5], args.warmup, steps)
            rows.append((model, n_params, mode, gate.mode, it, gt, steps))
            gate.detach()
        del engine
    if rank == 0:
        queue.put(rows)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="few steps, both models (under 2 minutes)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per row (median)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--micro-batch", type=int, default=8,
                   help="sequences per rank per step: the gate's cost is per step, the step's grows with it; "
                        "8 x 128 = 1024 tokens per rank, the 70B recipe's 2 x 512 (configs/llama70b.yaml)")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--modes", nargs="+", choices=["grad", "update", "auto"], default=["grad", "auto"])
    p.add_argument("--keep-snapshot", choices=["auto", "on", "off"], default="auto",
                   help="update gate: keep its snapshot buffer between steps (auto: on for CPU masters)")
    args = p.parse_args()
    if args.quick:
        args.steps, args.warmup = 5, 1
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    from agcl_ds.distributed import free_port

    t0 = time.perf_counter()
    mp.spawn(_worker, args=(2, free_port(), args, queue), nprocs=2, join=True)
    rows = queue.get()
    print(f"ZeRO-3, 2 CPU ranks (gloo, 1 thread each), AdamW, {args.dtype}, micro-batch {args.micro_batch}, "
          f"keep_snapshot={args.keep_snapshot}; medians; "
          f"wall {time.perf_counter() - t0:.0f} s")
    print(f"{'model':>6} {'params':>11} {'gate_on':>12} {'steps':>5} {'step ms':>9} {'gate ms':>8} "
          f"{'gate/step':>9}")
    for model, n, asked, mode, it, gt, steps in rows:
        label = f"{asked}->{mode}" if asked == "auto" else mode
        print(f"{model:>6} {n:>11,} {label:>12} {steps:>5} {it * 1e3:>9.1f} {gt * 1e3:>8.2f} {gt / it:>9.2%}")
    last = rows[-1]
    print(f"gate/step = {100 * last[5] / last[4]:.2f}%")


if __name__ == "__main__":
    main()
