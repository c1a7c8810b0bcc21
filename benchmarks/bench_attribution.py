"""Attribution cost: the `attribute(...)` pass vs a plain forward + backward on the same samples.

ZeRO-3 on 2 CPU ranks (gloo, spawned here; on CUDA one rank per GPU), a tiny Llama and two of ~50M parameters
(random weights, AdamW engine as in ds_configs/zero3.json; --models 0.5B for the GPU check). One *pass* covers
`--samples` examples (over all ranks) in micro-batches of `--micro-batch` per rank, exactly the batches
`attribute` builds (`pick_samples`, rank slices, `collate`):

- plain:  `engine(**batch).loss` + `engine.backward(loss)` per micro-batch, no optimizer step (the grads
          are zeroed outside the timed region), i.e. what a training step costs minus `engine.step()`;
- topk:   `attribute(..., only_correct=False)` with the default options (top-K mean, K=8, top-20% masks);
- power:  the same with `aggregate="power"` (sum-reducible power mean, reduce-scatter-sized traffic).

Each repetition runs plain, top-K, plain, power: every attribution pass follows a plain pass, as it follows
training in a job. (ZeRO-3 prefetches parameters in the order it traced; the first pass in a new module order
pays for re-tracing with unprefetched gathers, about 1-2 s here, so a pass placed after another attribution
pass would look faster than it is.) A row is the median over repetitions (plain: over twice as many). The stage
breakdown comes from timers wrapped around agcl_ds's own methods in this process (nothing in agcl_ds
changes); the exchange includes waiting for the other rank. Peak RSS per rank is the kernel's high-water
mark (VmHWM), reset before each pass through /proc/self/clear_refs. The last line is the top-K ratio of
the last model: 50M-4k, whose embeddings and head are 8% of its parameters as in a 7-70B Llama (on the
50M model they are 64%, and being row-sparse they cost the attribution almost nothing, which flatters it).

    python benchmarks/bench_attribution.py --quick      # < 2 minutes
    python benchmarks/bench_attribution.py              # tiny, 50M and 50M-4k at the default attribution settings
    python benchmarks/bench_attribution.py --lora 8     # the same for LoRA adapters (r = 8) on a frozen base
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import random
import statistics
import sys
import time
from dataclasses import replace

import torch
import torch.multiprocessing as mp
from _zero3 import MODELS, ranks, sync, where, zero3_llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANSWER_TOKENS = 8
STAGES = ("run", "backward_hook", "emit", "route", "flush", "log_scale", "all_to_all", "counts", "kept", "topk_update",
          "power_partial", "normalize")


class IdTokenizer:
    """Token ids written as text ("17 2033 5"): samples of an exact length spread over the whole vocab."""

    pad_id, bos_id, eos_id = 0, 1, 2

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def encode(self, text: str, prompt: bool) -> list[int]:
        ids = [int(w) for w in text.split()]
        return [self.bos_id, *ids] if prompt else ids


def make_examples(n: int, seq: int, vocab: int, seed: int = 0) -> list:
    """n random examples of exactly `seq` tokens (bos + prompt + answer + eos), answer = last 8 + eos."""
    from agcl_ds.data.types import Example

    rng = random.Random(seed)
    words = lambda k: " ".join(str(rng.randrange(3, vocab)) for _ in range(k))
    return [Example(words(seq - ANSWER_TOKENS - 2), words(ANSWER_TOKENS)) for _ in range(n)]


class Clock:
    """Exclusive seconds spent inside wrapped methods, by stage: time inside a nested wrapped call counts
    for the inner stage only, so the stages add up to the time spent in the outermost ones."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self._inner: list[float] = []  # per active call: seconds taken by the wrapped calls nested in it

    def wrap(self, owner: type, attr: str, stage: str) -> None:
        fn = getattr(owner, attr)

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            self._inner.append(0.0)
            try:
                return fn(*args, **kwargs)
            finally:
                took = time.perf_counter() - t0
                self.seconds[stage] += took - self._inner.pop()
                if self._inner:
                    self._inner[-1] += took

        setattr(owner, attr, timed)

    def take(self) -> dict[str, float]:
        out, self.seconds = dict(self.seconds), collections.defaultdict(float)
        return out


def instrument(clock: Clock) -> None:
    from agcl_ds.attribution.router import Router
    from agcl_ds.importance.aggregate import LogScale, PowerMean
    from agcl_ds.lrp.relevance import PerSampleRelevance

    for owner, attr, stage in [
        (PerSampleRelevance, "run", "run"),  # model forward + LRP backward incl. ZeRO gathers
        (PerSampleRelevance, "_backward", "backward_hook"),  # per-module hook: G_b's factors
        (PerSampleRelevance, "_emit", "emit"),  # per-sample G_b, |W ⊙ G_b|
        (Router, "__call__", "route"),  # cut a block into the ranks' pieces and stage it
        (Router, "flush", "flush"),  # exchange and merge the staged blocks
        (LogScale, "inplace", "log_scale"),  # power: φ per sample (top-K applies φ to its K survivors at the end)
        (Router, "_exchange", "all_to_all"),  # pad, copy, post the sends and receives
        (Router, "_finish", "all_to_all"),  # wait for them
        (Router, "begin", "kept"),  # kept counts, one all-gather per micro-batch (inside run)
        (Router, "_touched", "counts"),  # a row-sparse block's touched rows, one all-reduce
        (Router, "_update", "topk_update"),
        (PowerMean, "partial", "power_partial"),
        (Router, "result", "normalize"),
    ]:
        clock.wrap(owner, attr, stage)


def reset_peak() -> None:
    if torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
        return
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mib() -> float:
    """The kernel's high-water mark of this process; on CUDA the GPU's peak allocated memory instead."""
    if torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def plain_batches(tok: IdTokenizer, examples: list, opts, seq: int) -> list[dict[str, torch.Tensor]]:
    """This rank's micro-batches of an attribution pass, as `attribute` builds them."""
    from agcl_ds import distributed as D
    from agcl_ds.attribution import pick_samples
    from agcl_ds.data.collate import collate

    mine = pick_samples(examples, opts.n_samples, seed=0)[D.rank()::D.world_size()]
    mb = opts.micro_batch_size
    return [{k: v.to(D.device()) for k, v in collate(tok, mine[i:i + mb], seq).items()}
            for i in range(0, len(mine), mb)]


def timed_pass(fn, clock: Clock) -> tuple[float, float, dict[str, float]]:
    """(seconds, peak MiB, stage seconds) of one pass, started together on every rank."""
    sync()
    torch.distributed.barrier()
    clock.take()
    reset_peak()
    t0 = time.perf_counter()
    fn()
    sync()
    dt = time.perf_counter() - t0
    return dt, peak_rss_mib(), clock.take()


def measure(model: str, args: argparse.Namespace, clock: Clock) -> dict:
    """This rank's timings of `args.reps` alternating plain / top-K / power passes on one model."""
    from agcl_ds.attribution import AttributionOptions, attribute
    from agcl_ds.importance.partition import local_shards

    vocab = MODELS[model][5]
    seq = args.seq or MODELS[model][6]
    reset_peak()
    engine = zero3_llama(model, args.micro_batch, args.dtype, lora=args.lora)
    built_mib = peak_rss_mib()
    specs = local_shards(engine)
    tok = IdTokenizer(vocab)
    examples = make_examples(max(4 * args.samples, 64), seq, vocab)
    topk = AttributionOptions(only_correct=False, n_samples=args.samples, micro_batch_size=args.micro_batch)
    power = replace(topk, aggregate="power")
    batches = plain_batches(tok, examples, topk, seq)

    def plain() -> None:
        for batch in batches:
            engine.backward(engine(**batch).loss)

    passes = {"plain": plain,
              "topk": lambda: attribute(engine, tok, examples, topk, seq),
              "power": lambda: attribute(engine, tok, examples, power, seq)}
    engine.backward(engine(**batches[0]).loss)  # warm-up: ZeRO-3 traces its gather order on the first pass
    engine.optimizer.zero_grad()
    runs: dict[str, list] = {k: [] for k in passes}
    for _ in range(args.reps):
        for name in ("plain", "topk", "plain", "power"):  # each attribution pass right after training-like work
            runs[name].append(timed_pass(passes[name], clock))
            engine.optimizer.zero_grad()
    engine.destroy()
    return {"model": model, "params": sum(s.full_numel for s in specs.values()),
            "owned": sum(s.numel for s in specs.values()), "seq": seq, "built_mib": built_mib, "runs": runs,
            "k": topk.k, "samples": args.samples, "micro_batch": args.micro_batch}


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, queue) -> None:
    sys.path.insert(0, ROOT)
    from agcl_ds.distributed import join_local_group

    join_local_group(rank, world, port)

    clock = Clock()
    instrument(clock)
    rows = [measure(model, args, clock) for model in args.models]
    queue.put((rank, rows))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def summarise(per_rank: list[list[dict]]) -> list[dict]:
    """Medians over repetitions; times are the max over ranks (a pass ends when the slower rank ends),
    stages the mean over ranks, peak RSS the max over ranks."""
    out = []
    for rows in zip(*per_rank, strict=True):
        row = dict(rows[0])
        row["time"], row["peak"], row["stages"] = {}, {}, {}
        for name in rows[0]["runs"]:
            reps = list(zip(*(r["runs"][name] for r in rows), strict=True))  # per repetition: every rank
            row["time"][name] = statistics.median(max(t for t, _, _ in rep) for rep in reps)
            row["peak"][name] = max(p for rep in reps for _, p, _ in rep)
            row["stages"][name] = {s: statistics.median(statistics.fmean(st.get(s, 0.0) for _, _, st in rep)
                                                        for rep in reps) for s in STAGES}
        row["built_mib"] = max(r["built_mib"] for r in rows)
        out.append(row)
    return out


def breakdown(st: dict[str, float]) -> dict[str, float]:
    """The exclusive stage seconds, grouped."""
    return {
        "LRP fwd+bwd": st["run"],
        "hooks: G_b, |W⊙G_b|": st["backward_hook"] + st["emit"],
        "log-scale": st["log_scale"],
        "exchange": st["all_to_all"] + st["counts"] + st["kept"],
        "top-K update": st["topk_update"],
        "power partial": st["power_partial"],
        "route other": st["route"] + st["flush"],
        "normalise": st["normalize"],
    }


def print_report(rows: list[dict], args: argparse.Namespace, wall: float, world: int) -> None:
    lora = f", LoRA r={args.lora} on a frozen base" if args.lora else ""
    print(f"ZeRO-3, {where(world)}, {args.dtype}{lora}, {args.samples} samples per pass "
          f"({args.micro_batch} per rank per micro-batch), attribution only_correct=False, K=8, top-20% masks; "
          f"median of {args.reps}; wall {wall:.0f} s")
    print(f"{'model':>6} {'params':>11} {'seq':>4} {'pass':>6} {'s/pass':>8} {'x plain':>8} "
          f"{'peak MiB/rank':>17}")
    for r in rows:
        for name, t in r["time"].items():
            print(f"{r['model']:>6} {r['params']:>11,} {r['seq']:>4} {name:>6} {t:>8.2f} "
                  f"{t / r['time']['plain']:>7.2f}x {r['peak'][name]:>17.0f}")
    print("\nwhere the attribution time goes (s per pass, mean over ranks; exchange includes waiting):")
    for r in rows:
        for name in ("topk", "power"):
            parts = breakdown(r["stages"][name])
            share = ", ".join(f"{k} {v:.2f}" for k, v in parts.items() if abs(v) >= 0.005)
            print(f"  {r['model']:>5} {name:>5}: {share}")
    print("\npeak RSS per rank (MiB): the attribution's extra over plain is its top-K buffer plus the blocks staged")
    print("for one exchange (|R| values, or a weight's factors) and the exchange's send and receive buffers:")
    for r in rows:
        topk_buf = r["k"] * r["owned"] * 4
        staged = 2 * r["micro_batch"] * (1 << 23) * 4  # what `flush` may hold: 2 x block_elems per kept sample
        pk = r["peak"]
        print(f"  {r['model']:>5}: engine built {r['built_mib']:.0f}; plain {pk['plain']:.0f}; topk {pk['topk']:.0f} "
              f"(+{pk['topk'] - pk['plain']:.0f}); power {pk['power']:.0f} (+{pk['power'] - pk['plain']:.0f}); "
              f"top-K buffer (K x owned x fp32) {topk_buf / 2**20:.0f}; staged blocks at most {staged / 2**20:.0f}")
    last = rows[-1]
    which = f"reduced {last['model']} (--quick)" if args.quick else last["model"]
    print(f"\nlast line: ZeRO-3 {which} model, top-K attribution pass over plain forward+backward")
    print(f"attribution/fwd+bwd = {last['time']['topk'] / last['time']['plain']:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="both models, fewer and shorter samples (< 2 minutes)")
    p.add_argument("--samples", type=int, default=64, help="samples per pass over both ranks (attribution default)")
    p.add_argument("--micro-batch", type=int, default=8, help="per rank (attribution default)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sample (default: tiny 32, 50M 128)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions of each pass (median)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--lora", type=int, default=0, metavar="R",
                   help="freeze the model and attribute LoRA adapters of rank R on every projection (plain: LoRA "
                        "forward+backward)")
    args = p.parse_args()
    if args.quick:
        args.samples, args.micro_batch, args.seq, args.reps = 8, 4, 32, 1
    world = ranks()
    if args.samples % (world * args.micro_batch):
        p.error(f"--samples must be a multiple of {world} ranks x --micro-batch ({world * args.micro_batch})")
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    from agcl_ds.distributed import free_port

    t0 = time.perf_counter()
    mp.spawn(_worker, args=(world, free_port(), args, queue), nprocs=world, join=True)
    per_rank = dict(queue.get() for _ in range(world))
    print_report(summarise([per_rank[r] for r in range(world)]), args, time.perf_counter() - t0, world)


if __name__ == "__main__":
    main()
