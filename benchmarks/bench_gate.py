"""Gate overhead: the time the gate adds to a training step, against an ungated step, in the same run.

ZeRO-3 on 2 CPU ranks (gloo, spawned here; on CUDA one rank per GPU), a tiny and a ~50M-parameter Llama (0.5B
on a GPU), AdamW with a random R̄ in [0, 1], 8 sequences per rank per step by default (1024 tokens for the 50M
model, as many per rank as the 70B recipe; the gate's share falls as tokens per step grow: --micro-batch 2
shows a smaller workload).
Variants: `none` (no gate), `grad` (gradient gate), `snapshot` and `fused` (the update gate's two
implementations; `fused` is what `auto` picks under torch AdamW). They run interleaved, in rounds of a few
steps each (the first step of each block untimed), so that drift of a shared machine hits them alike.
Per step we record the iteration (forward + backward + engine.step) and the inner optimizer's `step`
(hooks included, timed by torch's global optimizer hooks). A gate's cost = its optimizer-step median +
its time outside the optimizer step (the grad gate) - the ungated optimizer-step median.

    python benchmarks/bench_gate.py --quick          # a few minutes
    python benchmarks/bench_gate.py --models 50M --rounds 5 --steps 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.multiprocessing as mp
from _zero3 import MODELS, ranks, sync, where, zero3_llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEEP = {"auto": None, "on": True, "off": False}
VARIANTS = ("none", "grad", "snapshot", "fused")


class _OptTimer:
    """Wall time of every inner optimizer `step` call, this gate's hooks included (global hooks wrap them)."""

    def __init__(self) -> None:
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self.seconds, self._t0 = 0.0, 0.0
        self._handles = [register_optimizer_step_pre_hook(self._pre), register_optimizer_step_post_hook(self._post)]

    def _pre(self, *_) -> None:
        sync()
        self._t0 = time.perf_counter()

    def _post(self, *_) -> None:
        sync()
        self.seconds += time.perf_counter() - self._t0


def _attach(engine, variant: str, args: argparse.Namespace):
    from agcl_ds.gate import Gate

    if variant == "none":
        return None
    if variant == "grad":
        return Gate(engine, gate_on="grad")
    return Gate(engine, gate_on="update", update_impl=variant, chunk=args.chunk,
                keep_snapshot=KEEP[args.keep_snapshot])


def _measure(engine, gate, timer: _OptTimer, batch: int, seq: int, vocab: int, steps: int, seed: int) -> list:
    """(iteration, optimizer step, gate outside the optimizer step) seconds per timed step."""
    rank = torch.distributed.get_rank()
    out = []
    for k in range(1 + steps):
        x = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed + 100 * k + rank))
        x = x.to(engine.device)
        sync()
        torch.distributed.barrier()
        g0 = gate.elapsed_s if gate is not None and gate.mode == "grad" else 0.0
        o0, t0 = timer.seconds, time.perf_counter()
        engine.backward(engine(input_ids=x, labels=x).loss)
        engine.step()
        sync()
        if k:
            g = gate.elapsed_s - g0 if gate is not None and gate.mode == "grad" else 0.0
            out.append((time.perf_counter() - t0, timer.seconds - o0, g))
    return out


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, queue) -> None:
    sys.path.insert(0, ROOT)
    from agcl_ds.distributed import join_local_group

    join_local_group(rank, world, port)
    from agcl_ds.importance.partition import local_shards

    timer = _OptTimer()
    rows = []
    for model in args.models:
        engine = zero3_llama(model, args.micro_batch, args.dtype)
        g = torch.Generator().manual_seed(rank)
        specs = local_shards(engine)
        rbar = {n: torch.rand(s.numel, generator=g).to(torch.bfloat16) for n, s in specs.items()}
        n_params = sum(s.full_numel for s in specs.values())
        hidden, _, _, _, _, vocab, seq = MODELS[model]
        samples: dict[str, list] = {v: [] for v in args.variants}
        for r in range(args.rounds):
            for variant in args.variants:
                gate = _attach(engine, variant, args)
                if gate is not None:
                    gate.set_importance(rbar)
                samples[variant] += _measure(engine, gate, timer, args.micro_batch, seq, vocab, args.steps,
                                             seed=1000 * r)
                if gate is not None:
                    gate.detach()
        base_opt = statistics.median(o for _, o, _ in samples["none"]) if "none" in samples else float("nan")
        for variant, got in samples.items():
            it = statistics.median(i for i, _, _ in got)
            opt = statistics.median(o for _, o, _ in got)
            outside = statistics.median(x for _, _, x in got)
            rows.append((model, n_params, variant, it, opt, opt + outside - base_opt, len(got)))
        del engine
    if rank == 0:
        queue.put(rows)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 rounds of 2 steps per variant")
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds over the variants")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--micro-batch", type=int, default=8,
                   help="sequences per rank per step: the gate's cost is per step, the step's grows with it; "
                        "8 x 128 = 1024 tokens per rank, the 70B recipe's 2 x 512 (configs/llama70b.yaml)")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=["tiny", "50M"])
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--chunk", type=int, default=1 << 22, help="elements of R̄ turned into s at a time")
    p.add_argument("--keep-snapshot", choices=["auto", "on", "off"], default="auto",
                   help="snapshot variant: keep its buffer between steps (auto: on for CPU masters)")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.steps = 2, 2
    if "none" not in args.variants:
        p.error("--variants must include none: every cost is measured against it")
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    from agcl_ds.distributed import free_port

    t0, world = time.perf_counter(), ranks()
    mp.spawn(_worker, args=(world, free_port(), args, queue), nprocs=world, join=True)
    rows = queue.get()
    print(f"ZeRO-3, {where(world)}, AdamW, {args.dtype}, micro-batch {args.micro_batch}, "
          f"chunk {args.chunk}, keep_snapshot={args.keep_snapshot}; medians over {args.rounds} interleaved rounds "
          f"x {args.steps} steps; wall {time.perf_counter() - t0:.0f} s")
    print(f"{'model':>6} {'params':>11} {'variant':>9} {'steps':>5} {'step ms':>9} {'opt ms':>8} {'gate ms':>8} "
          f"{'gate/step':>9}")
    for model, n, variant, it, opt, cost, steps in rows:
        print(f"{model:>6} {n:>11,} {variant:>9} {steps:>5} {it * 1e3:>9.1f} {opt * 1e3:>8.1f} {cost * 1e3:>8.2f} "
              f"{cost / it:>9.2%}")
    by = {(m, v): (it, cost) for m, _, v, it, _, cost, _ in rows}
    model = args.models[-1]
    for variant in ("snapshot", "fused"):
        if (model, variant) in by:
            it, cost = by[(model, variant)]
            print(f"{model} update gate, {variant}: gate/step = {100 * cost / it:.2f}%")


if __name__ == "__main__":
    main()
