"""What every command shares: the one-line error contract, the output-folder probe, and the checks and
engine that `eval` and `attribute` build exactly as training does."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from typing import Any

from agcl_ds import checkpoint
from agcl_ds.checkpoint import CheckpointError, Position
from agcl_ds.config import ConfigError, ExperimentConfig, load_config, load_ds_config, resolve_ds_config
from agcl_ds.data.types import DataError, Task
from agcl_ds.models import ModelError

USER_ERRORS = (ConfigError, DataError, ModelError, CheckpointError)
CKPT_HELP = "<run_dir>/checkpoints/<tag>, or <run_dir> for its latest checkpoint"


def add_launch_arguments(cmd: argparse.ArgumentParser) -> None:
    """The arguments of the commands that run under a launcher (train, eval, attribute)."""
    cmd.add_argument("--config", required=True, help="experiment YAML")
    cmd.add_argument("--ds", required=True, help="DeepSpeed JSON (\"auto\" fields filled from the YAML)")
    cmd.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher


def fail(message: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(f"agcl: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_writable(run_dir: str, what: str = "output.dir") -> None:
    """The output folder must be creatable and writable before any rank spends time on a model;
    probed with a temporary folder in its nearest existing ancestor (permission bits alone do not
    tell: root ignores them, read-only mounts and pseudo file systems refuse anyway)."""
    parent = os.path.abspath(run_dir)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"{what}: cannot create {run_dir!r}: {parent!r} is not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".agcl-probe-", dir=parent))
    except OSError as e:
        raise ConfigError(f"{what}: cannot write to {run_dir!r} ({parent}: {e.strerror})") from None


@dataclasses.dataclass
class Prepared:
    cfg: ExperimentConfig
    ds_config: dict[str, Any]
    tasks: list[Task]
    folder: str | None
    pos: Position | None


def prepare(args: argparse.Namespace) -> Prepared:
    """Everything a user can get wrong, checked on every rank before distributed start-up."""
    from agcl_ds.data.tasks import load_tasks
    from agcl_ds.models import check_source

    cfg = load_config(args.config, args.overrides)
    ds_config = resolve_ds_config(load_ds_config(args.ds), cfg, _world(), path=args.ds)
    check_source(cfg.model)
    tasks = load_tasks(cfg)
    folder = pos = None
    if getattr(args, "checkpoint", None):  # eval and attribute; train resumes on its own
        folder, pos = checkpoint.resolve(args.checkpoint)
        checkpoint.check_compatible(folder, pos, cfg, ds_config)
    return Prepared(cfg, ds_config, tasks, folder, pos)


def engine_for(p: Prepared, out_dir: str):
    """The DeepSpeed engine as the loop builds it, holding the checkpoint's weights (or the configured
    model, pretrained base included, when there is no checkpoint); returns (engine, tokenizer)."""
    from agcl_ds.distributed import init_distributed
    from agcl_ds.engine import build_engine
    from agcl_ds.loop import ensure_pretrained_base
    from agcl_ds.methods.base import Method, NoOptions
    from agcl_ds.models import load_model
    from agcl_ds.runlog import RunLog

    init_distributed()
    base_dir = None
    if p.folder is None and p.cfg.model.pretrain:
        quiet = dataclasses.replace(p.cfg.logging, jsonl=False, wandb=False, tensorboard=False)
        log = RunLog(out_dir, dataclasses.replace(p.cfg, logging=quiet))  # progress and prints only
        base_dir = ensure_pretrained_base(p.cfg, p.ds_config, log)
    loaded = load_model(p.cfg, p.ds_config, path_override=base_dir)
    engine = build_engine(loaded, p.ds_config)
    if p.folder is not None:
        checkpoint.require_valid(p.folder)
        # a base Method loads no method state: only the weights (and RNG) are needed here, so no
        # importance store or gate has to be built for the checkpoint's method
        checkpoint.load(p.folder, engine, Method(NoOptions()))
    return engine, loaded.tokenizer
