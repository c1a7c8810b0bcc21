"""The continual loop: one DeepSpeed engine trained on task after task, evaluated on all of them.

    config → tasks → model/engine → for each task: train (method hooks) → evaluate every task
    → method.after_task → ... → metrics → results.json, matrix.png

The data order is a pure function of (seed, task, step), so any rank can rebuild exactly the
batch it would have seen at any step: the basis for resuming mid-task.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from agcl_ds import checkpoint
from agcl_ds import distributed as D
from agcl_ds.config import ExperimentConfig
from agcl_ds.data.collate import Tokenizer, collate
from agcl_ds.data.tasks import Example, Task, load_tasks
from agcl_ds.evaluation import Evaluator
from agcl_ds.fileio import write_json
from agcl_ds.methods import build_method
from agcl_ds.methods.base import Method
from agcl_ds.metrics import summary
from agcl_ds.models import LoadedModel, load_model, save_consolidated
from agcl_ds.report import heatmap, matrix_table
from agcl_ds.runlog import RunLog


@dataclass
class RunContext:
    """What a method may use: never the engine's internals, only its public calls."""

    cfg: ExperimentConfig
    engine: Any
    tokenizer: Tokenizer
    tasks: list[Task]
    run_dir: str
    log: RunLog
    evaluator: Evaluator
    ds_config: dict[str, Any]  # the resolved DeepSpeed config (a method may build a second engine)
    base_dir: str | None  # the cached pretrained base, when the model is pretrained here


class BatchOrder:
    """Which train examples each rank sees at each step of a task.

    Sample position s = ((step * accumulation + micro) * world + rank) * micro_batch + i walks
    through a fresh seeded permutation of the task's examples every epoch.
    """

    def __init__(self, n: int, seed: int, task_index: int) -> None:
        self.n, self.seed, self.task_index = n, seed, task_index
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            order = list(range(self.n))
            random.Random(f"{self.seed}:{self.task_index}:{epoch}").shuffle(order)
            self._perms = {epoch: order}  # one epoch alive at a time
        return self._perms[epoch]

    def indices(self, step: int, micro: int, accumulation: int, rank: int, world: int, mbs: int) -> list[int]:
        first = ((step * accumulation + micro) * world + rank) * mbs
        return [self._perm(s // self.n)[s % self.n] for s in range(first, first + mbs)]


def lr_at(step: int, total: int, base: float, warmup: int, schedule: str) -> float:
    """Per-task schedule: linear warm-up, then constant or cosine to zero."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return base * 0.5 * (1.0 + math.cos(math.pi * progress))
    return base


def build_engine(loaded: LoadedModel, ds_config: dict[str, Any]):
    import deepspeed

    params = [p for p in loaded.model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=loaded.model, model_parameters=params, config=ds_config)
    engine.agcl_zero3_handle = loaded.zero3_handle  # keep HfDeepSpeedConfig alive with the engine
    return engine


@torch.no_grad()
def reset_optimizer_state(engine) -> None:
    """Zero the inner optimizer's moments and step counts in place (every rank, its own partition).

    Adam's second moment from a converged task is tiny, so carrying it into a new task turns the
    first updates into several times the learning rate; each task is treated as a fresh fine-tune.
    The state keeps its structure, so DeepSpeed's checkpoints and offload see the same tensors.
    """
    from agcl_ds.importance.partition import inner_optimizers

    for opt in inner_optimizers(engine):
        for state in opt.state.values():
            for value in state.values():
                if torch.is_tensor(value):
                    value.zero_()


def _to_device(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    dev = D.device()
    return {k: v.to(dev) for k, v in batch.items()}


def train_task(engine, tok: Tokenizer, examples: list[Example], task_index: int, *, steps: int, lr: float,
               cfg: ExperimentConfig, log: RunLog, desc: str, method: Method | None = None,
               ctx: RunContext | None = None, micro_batch: int | None = None, start: int = 0,
               after_step: Callable[[int], None] | None = None, schedule: tuple[str, int] | None = None
               ) -> list[float]:
    """Train optimizer steps `start`..`steps`-1 on `examples`; return the rank-averaged losses.

    `after_step(done)` runs after each optimizer step on every rank (checkpoints, preemption);
    `schedule` = (lr_schedule, warmup_steps) overrides the training section's (pretraining)."""
    t = cfg.training
    kind, warmup = schedule or (t.lr_schedule, t.warmup_steps)
    mbs = micro_batch or t.micro_batch_size
    rank, world = D.rank(), D.world_size()
    order = BatchOrder(len(examples), cfg.seed, task_index)
    engine.train()
    log.progress(steps - start, desc)
    losses: list[float] = []
    window: list[float] = []
    for step in range(start, steps):
        step_lr = lr_at(step, steps, lr, warmup, kind)
        for group in engine.optimizer.param_groups:
            group["lr"] = step_lr
        step_loss = 0.0
        for micro in range(t.gradient_accumulation):
            idx = order.indices(step, micro, t.gradient_accumulation, rank, world, mbs)
            batch = _to_device(collate(tok, [examples[i] for i in idx], cfg.data.max_seq_len))
            out = engine(**batch)
            loss = out.loss
            if method is not None:
                extra = method.loss_term(ctx, batch, out)
                if extra is not None:
                    loss = loss + extra
            engine.backward(loss)
            if method is not None and engine.is_gradient_accumulation_boundary():
                method.before_step(ctx)
            engine.step()
            step_loss += loss.detach().float().item() / t.gradient_accumulation
        window.append(step_loss)
        if len(window) == cfg.logging.every or step == steps - 1:
            mean = D.all_sum([sum(window)])[0] / (len(window) * world)
            losses.extend([mean] * len(window))
            log.event("train", task=desc, step=step + 1, loss=round(mean, 6), lr=step_lr)
            log.scalars(engine.global_steps, loss=mean, lr=step_lr)
            window = []
        log.advance(loss=f"{step_loss:.4f}", lr=f"{step_lr:.2e}")
        if after_step is not None:
            after_step(step + 1)
    log.close_progress()
    return losses


def _base_cache_key(cfg: ExperimentConfig) -> str:
    pre = asdict(cfg.model.pretrain)
    pre.pop("cache_dir")
    key = {"model": asdict(cfg.model.from_config), "tokenizer": cfg.model.tokenizer, "pretrain": pre,
           "synthetic": asdict(cfg.data.synthetic), "max_seq_len": cfg.data.max_seq_len, "seed": cfg.seed,
           "precision": cfg.training.precision}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def ensure_pretrained_base(cfg: ExperimentConfig, ds_config: dict[str, Any], log: RunLog) -> str:
    """Pretrain the from-config model on the synthetic base mixture once; return the cached folder.

    Continual tasks then fine-tune a model that already holds broad knowledge (the regime the
    method targets); a model trained from scratch simply overwrites itself task after task.
    """
    from agcl_ds.data.synthetic import make_mixture

    pre = cfg.model.pretrain
    folder = os.path.join(pre.cache_dir, f"base-{_base_cache_key(cfg)}")
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        log.print(f"pretrained base: cached at {folder}")
        return folder
    mixture = make_mixture(cfg.data.synthetic)
    loaded = load_model(cfg, ds_config)
    engine = build_engine(loaded, ds_config)
    log.print(f"pretraining the base on {len(mixture.train)} mixture examples for {pre.steps} steps "
              f"(cached afterwards in {folder})")
    train_task(engine, loaded.tokenizer, mixture.train, -1, steps=pre.steps, lr=pre.lr, cfg=cfg, log=log,
               desc="pretrain base", micro_batch=pre.micro_batch_size, schedule=("cosine", pre.warmup_steps))
    evaluator = Evaluator(engine, loaded.tokenizer, cfg.data.max_seq_len, cfg.evaluation.batch_size, "generate")
    acc = evaluator.evaluate(mixture)
    log.print(f"pretrained base: exact match {acc:.3f} on the held-out base mixture")
    log.event("pretrain", accuracy=acc, steps=pre.steps)
    save_consolidated(engine, folder)
    engine.destroy()
    return folder


class Preempted(Exception):
    """Raised after a checkpoint was written in answer to SIGTERM/SIGUSR1 (exit code 3: requeue)."""


class StopSignal:
    """Turns SIGTERM/SIGUSR1 into a flag that all ranks agree on at the next optimizer step."""

    def __init__(self) -> None:
        self.raised = False
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.raised = True

    def agreed(self) -> bool:
        """True on every rank as soon as any rank got a signal (one tiny all-reduce)."""
        return D.all_sum([1.0 if self.raised else 0.0])[0] > 0

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _diff(saved: dict[str, Any], now: dict[str, Any], prefix: str = "") -> str | None:
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            hit = _diff(a, b, f"{prefix}{key}.")
            if hit:
                return hit
        elif a != b:
            return f"{prefix}{key}: {a!r} -> {b!r}"
    return None


def _resume_point(cfg: ExperimentConfig, root: str, mode: str) -> tuple[str, checkpoint.Position] | None:
    """The checkpoint to continue from, or None; refuses one whose results this config would change.

    The world size may change (checkpoint.load re-partitions). What must stay is the global batch,
    micro_batch_size x gradient_accumulation x world size: `BatchOrder` gives each optimizer step
    the same examples for any split of that product, so e.g. 2 ranks x 8 resume as 1 rank x 16 or
    1 rank x 8 x 2 accumulation steps."""
    if mode == "never":
        if checkpoint.candidates(root):
            raise checkpoint.CheckpointError(f"{root} holds checkpoints; resume with --resume auto, or move "
                                             f"that folder away to start over")
        return None
    found = checkpoint.find_valid(root)
    if found is None:
        return None
    folder, pos = found

    def global_batch(view: dict[str, Any], world: int) -> dict[str, Any]:
        t = dict(view.get("training", {}))
        if "micro_batch_size" in t and "gradient_accumulation" in t:
            t["micro_batch_size x gradient_accumulation x world size"] = (
                t.pop("micro_batch_size") * t.pop("gradient_accumulation") * world)
        return {**view, "training": t}

    changed = _diff(global_batch(pos.config, pos.world_size), global_batch(cfg.resume_view(), D.world_size()))
    if changed and mode != "force":
        hint = ""
        if "world size" in changed:
            hint = (f" (saved by {pos.world_size} rank(s), this run has {D.world_size()}: keep the product by "
                    f"setting training.micro_batch_size or training.gradient_accumulation)")
        raise checkpoint.CheckpointError(f"{folder}: the config changed since this checkpoint ({changed}){hint}; "
                                         f"restore it, or pass --resume force")
    return found


def run(cfg: ExperimentConfig, ds_config: dict[str, Any], resume: str = "auto") -> dict[str, Any]:
    """Train the configured task sequence with the configured method; return results (all ranks).

    resume: "auto" continues from the newest valid checkpoint in <run_dir>/checkpoints, "never"
    refuses to start over existing checkpoints, "force" resumes despite a changed config.
    """
    stop = StopSignal()  # from the start: a preemption during start-up is answered at the first step
    try:
        return _run(cfg, ds_config, resume, stop)
    finally:
        stop.restore()


def _run(cfg: ExperimentConfig, ds_config: dict[str, Any], resume: str, stop: StopSignal) -> dict[str, Any]:
    run_dir = cfg.run_dir()
    ckpt_root = os.path.join(run_dir, "checkpoints")
    tasks = load_tasks(cfg)
    method = build_method(cfg.method)
    found = _resume_point(cfg, ckpt_root, resume)
    results_path = os.path.join(run_dir, "results.json")
    if found is not None and found[1].task == len(tasks) and os.path.isfile(results_path):
        with open(results_path) as f:
            results = json.load(f)
        if D.is_main():
            print(f"{run_dir}: the sequence is already finished; nothing to do\n{matrix_table(results)}")
        return results
    torch.manual_seed(cfg.seed)
    log = RunLog(run_dir, cfg)
    zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    log.event("start", config=cfg.to_dict(), world_size=D.world_size(), zero_stage=zero_stage,
              resume_from=found[0] if found else None)
    base_dir = ensure_pretrained_base(cfg, ds_config, log) if cfg.model.pretrain else None
    loaded = load_model(cfg, ds_config, path_override=base_dir)
    engine = build_engine(loaded, ds_config)
    tok = loaded.tokenizer
    evaluator = Evaluator(engine, tok, cfg.data.max_seq_len, cfg.evaluation.batch_size, cfg.evaluation.mode)
    ctx = RunContext(cfg, engine, tok, tasks, run_dir, log, evaluator, ds_config, base_dir)
    method.setup(ctx)
    started = time.time()
    if found is not None:
        folder, pos = found
        checkpoint.load(folder, engine, method)
        log.print(f"resumed from {folder}: task {pos.task + 1}/{len(tasks)}, step {pos.step}")
        base, matrix = pos.base, [list(r) for r in pos.matrix]
        first_task, first_step = pos.task, pos.step
    else:
        base = evaluator.evaluate_all(tasks)
        log.event("eval", after="base", accuracies=base)
        matrix, first_task, first_step = [], 0, 0

    def position(task: int, step: int) -> checkpoint.Position:
        return checkpoint.Position(task=task, step=step, matrix=matrix, base=base, config=cfg.resume_view(),
                                   world_size=D.world_size(), zero_stage=zero_stage, method=cfg.method.name)

    try:
        for i in range(first_task, len(tasks)):
            task = tasks[i]
            resuming_mid_task = i == first_task and first_step > 0
            if cfg.training.reset_optimizer and not resuming_mid_task:
                reset_optimizer_state(engine)
            method.before_task(ctx, i, task)

            def after_step(done: int, i: int = i) -> None:
                if stop.agreed():
                    checkpoint.save(ckpt_root, engine, method, position(i, done), cfg.checkpoint.keep)
                    raise Preempted(f"checkpointed at task {i + 1}, step {done}")
                every = cfg.checkpoint.every_steps
                if every and done % every == 0 and done < cfg.training.steps_per_task:
                    checkpoint.save(ckpt_root, engine, method, position(i, done), cfg.checkpoint.keep)

            examples = method.training_examples(ctx, i, task)
            task_start = time.time()
            losses = train_task(engine, tok, examples, i, steps=cfg.training.steps_per_task, lr=cfg.training.lr,
                       cfg=cfg, log=log, desc=f"[{cfg.method.name}] task {i + 1}/{len(tasks)} {task.name}",
                       method=method, ctx=ctx, start=first_step if i == first_task else 0, after_step=after_step)
            task_seconds = time.time() - task_start
            row = evaluator.evaluate_all(tasks)
            matrix.append(row)
            log.event("eval", after=task.name, accuracies=row)
            log.task_summary(task.name, matrix, [t.name for t in tasks], task_seconds,
                             sum(losses) / len(losses) if losses else None)
            method.after_task(ctx, i, task)
            checkpoint.save(ckpt_root, engine, method, position(i + 1, 0), cfg.checkpoint.keep)
    finally:
        log.close_progress()
    names = [t.name for t in tasks]
    results = {"tasks": names, "matrix": matrix, "base": base, **summary(matrix, base),
               "method": cfg.method.name, "config": cfg.to_dict(), "world_size": D.world_size(),
               "seconds": round(time.time() - started, 1)}
    if D.is_main():
        write_json(results_path, results, indent=2)
        heatmap(results, os.path.join(run_dir, "matrix.png"))
    log.print(matrix_table(results))
    log.event("done", OP=results["OP"], BWT=results["BWT"], FWT=results["FWT"])
    log.close()
    D.barrier()
    return results
