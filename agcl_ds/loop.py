"""The continual loop: one DeepSpeed engine trained on task after task, evaluated on all of them.

    config → tasks → model/engine → for each task: train (method hooks) → evaluate every task
    → method.after_task → ... → metrics → results.json, matrix.png

The steps themselves (data order, schedule, the engine) are agcl_ds.engine's; this module owns the
sequence around them: the pretrained base, resume and preemption, evaluation rows, results.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from dataclasses import asdict
from typing import Any

import torch

from agcl_ds import checkpoint
from agcl_ds import distributed as D
from agcl_ds.adapters import merge_and_restart
from agcl_ds.config import ExperimentConfig
from agcl_ds.data.tasks import load_general, load_tasks
from agcl_ds.device import native_precision
from agcl_ds.engine import build_engine, reset_optimizer_state, train_task
from agcl_ds.evaluation import Evaluator
from agcl_ds.fileio import write_json
from agcl_ds.methods import build_method
from agcl_ds.methods.base import RunContext
from agcl_ds.metrics import general_delta, summary
from agcl_ds.models import load_model, save_consolidated
from agcl_ds.report import heatmap, matrix_table
from agcl_ds.runlog import RunLog


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
    general = load_general(cfg)
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
    native, why = native_precision()
    log.print(f"precision {cfg.training.precision} (native here: {native}, as {why})")
    base_dir = ensure_pretrained_base(cfg, ds_config, log) if cfg.model.pretrain else None
    loaded = load_model(cfg, ds_config, path_override=base_dir)
    engine = build_engine(loaded, ds_config)
    tok = loaded.tokenizer
    evaluator = Evaluator.for_run(engine, tok, cfg)
    ctx = RunContext(cfg, engine, tok, tasks, run_dir, log, evaluator, ds_config, base_dir)
    method.setup(ctx)
    merging = cfg.model.peft is not None and cfg.model.peft.adapter == "per_task_merge"
    started = time.time()
    if found is not None:
        folder, pos = found
        checkpoint.load(folder, engine, method)
        log.print(f"resumed from {folder}: task {pos.task + 1}/{len(tasks)}, step {pos.step}")
        base, matrix = pos.base, [list(r) for r in pos.matrix]
        general_rows = [list(r) for r in pos.general]
        first_task, first_step = pos.task, pos.step
    else:
        base = evaluator.evaluate_all(tasks)
        log.event("eval", after="base", accuracies=base)
        general_rows = [evaluator.evaluate_all(general)] if general else []
        if general:
            log.event("eval_general", after="base", scores=general_rows[0])
        matrix, first_task, first_step = [], 0, 0

    def position(task: int, step: int) -> checkpoint.Position:
        return checkpoint.Position(task=task, step=step, matrix=matrix, base=base, config=cfg.resume_view(),
                                   world_size=D.world_size(), zero_stage=zero_stage, method=cfg.method.name,
                                   general=general_rows)

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
            if general:
                general_rows.append(evaluator.evaluate_all(general))
                log.event("eval_general", after=task.name, scores=general_rows[-1])
            log.task_summary(task.name, matrix, [t.name for t in tasks], task_seconds,
                             sum(losses) / len(losses) if losses else None)
            method.after_task(ctx, i, task)
            if merging and i < len(tasks) - 1:
                merge_and_restart(engine.module, cfg.seed, i)
                reset_optimizer_state(engine)  # the moments belonged to the merged adapter
            checkpoint.save(ckpt_root, engine, method, position(i + 1, 0), cfg.checkpoint.keep)
    finally:
        log.close_progress()
    names = [t.name for t in tasks]
    results = {"tasks": names, "metrics": [t.metric for t in tasks], "matrix": matrix, "base": base,
               **summary(matrix, base, cfg.evaluation.bwt_over), "bwt_over": cfg.evaluation.bwt_over,
               "method": cfg.method.name, "config": cfg.to_dict(), "world_size": D.world_size(),
               "seconds": round(time.time() - started, 3), "evaluation_seconds": round(evaluator.seconds, 3)}
    tokens, seconds = D.all_sum([evaluator.generator.tokens, evaluator.generator.seconds])  # ranks in lock-step
    if tokens:  # decoding throughput over all ranks, when anything was generated
        results["generation"] = {"tokens": int(tokens), "seconds": round(seconds / D.world_size(), 2),
                                 "tokens_per_s": round(tokens * D.world_size() / seconds, 1)}
    if general:
        results["general"] = {"tasks": [t.name for t in general], "metrics": [t.metric for t in general],
                              "base": general_rows[0], "rows": general_rows[1:],
                              "delta": general_delta(general_rows[1:], general_rows[0])}
    if D.is_main():
        write_json(results_path, results, indent=2)
        heatmap(results, os.path.join(run_dir, "matrix.png"))
    log.print(matrix_table(results))
    log.event("done", OP=results["OP"], BWT=results["BWT"], FWT=results["FWT"],
              general_delta=results.get("general", {}).get("delta"))
    log.close()
    D.barrier()
    return results
