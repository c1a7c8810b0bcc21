"""`agcl` command line: train, eval, attribute, export, report.

User errors (config, data, model, DeepSpeed JSON, checkpoint) end the process with one line on
stderr and exit code 2, before any rank has loaded a model or written output.

`train`, `eval` and `attribute` run under a launcher (`deepspeed`, `torchrun`) or as one process;
`export` and `report` are offline, one process, no DeepSpeed ranks.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import io
import json
import os
import shutil
import sys
import tempfile
from typing import Any

from agcl_ds import checkpoint
from agcl_ds.checkpoint import CheckpointError, Position
from agcl_ds.config import ConfigError, ExperimentConfig, load_config, load_ds_config, resolve_ds_config
from agcl_ds.data.tasks import DataError, Task
from agcl_ds.models import ModelError

USER_ERRORS = (ConfigError, DataError, ModelError, CheckpointError)
EXIT_REQUEUE = 3  # checkpointed after SIGTERM/SIGUSR1: the job wants to be requeued
CKPT_HELP = "<run_dir>/checkpoints/<tag>, or <run_dir> for its latest checkpoint"
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _fail(message: str) -> None:
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


def cmd_train(args: argparse.Namespace) -> None:
    from agcl_ds.methods import build_method

    # model, method, data and output problems surface here, before distributed start-up
    p = _prepare(args)
    try:
        build_method(p.cfg.method).check(p.cfg)
    except ConfigError as e:
        raise ConfigError(f"{args.config}: {e}") from None
    check_writable(p.cfg.run_dir())  # on every rank: each writes its checkpoint shards there
    from agcl_ds.distributed import init_distributed, shutdown_distributed
    from agcl_ds.loop import Preempted, run

    init_distributed()
    try:
        run(p.cfg, p.ds_config, resume=args.resume)
    except Preempted as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"agcl: preempted: {e}; exit {EXIT_REQUEUE} asks for a requeue", file=sys.stderr, flush=True)
        shutdown_distributed()
        sys.exit(EXIT_REQUEUE)


# --------------------------------------------------------------------------- checkpoints


def _resolve_checkpoint(path: str) -> tuple[str, Position]:
    """`<run_dir>/checkpoints/<tag>`, or `<run_dir>/checkpoints` or `<run_dir>` (then the tag in
    latest.json: the newest checkpoint)."""
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    latest = os.path.join(path, "latest.json")
    if os.path.isfile(latest):
        try:
            with open(latest) as f:
                path = os.path.join(path, json.load(f)["tag"])
        except (OSError, ValueError, KeyError, TypeError):
            raise CheckpointError(f"{latest}: unreadable; pass a checkpoint folder <run_dir>/checkpoints/<tag>") \
                from None
    if not os.path.isfile(os.path.join(path, "position.json")):
        raise CheckpointError(f"{path}: not a checkpoint folder (no position.json); expected "
                              f"<run_dir>/checkpoints/<tag>")
    try:
        return os.path.normpath(path), checkpoint.read_position(path)
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}/position.json: unreadable ({str(e).splitlines()[0]})") from None


def _run_dir_of(folder: str) -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(folder)))


def _check_compatible(folder: str, pos: Position, cfg: ExperimentConfig, ds_config: dict[str, Any]) -> None:
    """The engine must be built like the one that saved the checkpoint: same model and ZeRO stage
    (another number of ranks is fine: checkpoint.load re-partitions). Checked before any rank starts."""
    saved = {k: v for k, v in pos.config.get("model", {}).items() if k != "pretrain"}
    now = {k: v for k, v in cfg.resume_view()["model"].items() if k != "pretrain"}
    for key in sorted(set(saved) | set(now)):
        if saved.get(key) != now.get(key):
            raise CheckpointError(f"{folder}: trained with model.{key} = {saved.get(key)!r}, the config has "
                                  f"{now.get(key)!r}")
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    if stage != pos.zero_stage:
        raise CheckpointError(f"{folder}: saved under ZeRO stage {pos.zero_stage}, --ds has stage {stage}; use a "
                              f"DeepSpeed JSON with stage {pos.zero_stage}, or `agcl export` it and evaluate "
                              f"the exported folder")


def _config_of(folder: str, pos: Position) -> ExperimentConfig:
    """The run's config as saved in position.json (everything that shapes the model)."""
    from agcl_ds.config import from_dict

    try:
        return from_dict(ExperimentConfig, pos.config, "config")
    except ConfigError as e:
        raise CheckpointError(f"{folder}/position.json: {e}") from None


# --------------------------------------------------------------------------- eval, attribute


@dataclasses.dataclass
class _Prepared:
    cfg: ExperimentConfig
    ds_config: dict[str, Any]
    tasks: list[Task]
    folder: str | None
    pos: Position | None


def _prepare(args: argparse.Namespace) -> _Prepared:
    """Everything a user can get wrong, checked on every rank before distributed start-up."""
    from agcl_ds.data.tasks import load_tasks
    from agcl_ds.models import check_source

    cfg = load_config(args.config, args.overrides)
    ds_config = resolve_ds_config(load_ds_config(args.ds), cfg, _world(), path=args.ds)
    check_source(cfg.model)
    tasks = load_tasks(cfg)
    folder = pos = None
    if getattr(args, "checkpoint", None):  # eval and attribute; train resumes on its own
        folder, pos = _resolve_checkpoint(args.checkpoint)
        _check_compatible(folder, pos, cfg, ds_config)
    return _Prepared(cfg, ds_config, tasks, folder, pos)


def _engine(p: _Prepared, out_dir: str):
    """The DeepSpeed engine as the loop builds it, holding the checkpoint's weights (or the configured
    model, pretrained base included, when there is no checkpoint); returns (engine, tokenizer)."""
    from agcl_ds.distributed import init_distributed
    from agcl_ds.loop import build_engine, ensure_pretrained_base
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


def cmd_eval(args: argparse.Namespace) -> None:
    from agcl_ds.distributed import barrier, is_main, world_size
    from agcl_ds.evaluation import Evaluator
    from agcl_ds.fileio import write_json

    p = _prepare(args)
    out_dir = args.out or (_run_dir_of(p.folder) if p.folder else p.cfg.run_dir())
    check_writable(out_dir, "--out")
    engine, tok = _engine(p, out_dir)
    ev = p.cfg.evaluation
    row = Evaluator(engine, tok, p.cfg.data.max_seq_len, ev.batch_size, ev.mode).evaluate_all(p.tasks)
    names = [t.name for t in p.tasks]
    if is_main():
        source = p.folder or "the configured model"
        width = max(8, *(len(n) for n in names)) + 1
        print(f"eval of {source}:\n" + "".join(f"{n:>{width}}" for n in names) + "\n"
              + "".join(f"{a:>{width}.3f}" for a in row), flush=True)
        result = {"tasks": names, "row": row, "checkpoint": p.folder,
                  "position": {"task": p.pos.task, "step": p.pos.step} if p.pos else None,
                  "method": p.cfg.method.name, "mode": ev.mode, "world_size": world_size(),
                  "config": p.cfg.to_dict()}
        write_json(os.path.join(out_dir, "eval.json"), result, indent=2)
        print(f"wrote {os.path.join(out_dir, 'eval.json')}", flush=True)
    barrier()


def cmd_attribute(args: argparse.Namespace) -> None:
    from agcl_ds.attribution import AttributionOptions, attribute
    from agcl_ds.distributed import barrier, is_main
    from agcl_ds.importance.store import ImportanceStore, consolidate
    from agcl_ds.methods import build_method

    p = _prepare(args)
    names = [t.name for t in p.tasks]
    if args.task not in names:
        raise ConfigError(f"--task {args.task!r}: not among data.tasks ({', '.join(names)})")
    task = p.tasks[names.index(args.task)]
    # the method's own attribution settings (method agcl), else the defaults
    opts = getattr(build_method(p.cfg.method).options, "attribution", AttributionOptions())
    tag = os.path.basename(p.folder)
    out = args.out or os.path.join(_run_dir_of(p.folder), "attribution", f"{tag}-{task.name.replace('/', '_')}")
    check_writable(out, "--out")
    engine, tok = _engine(p, out)
    importance, n = attribute(engine, tok, task.train, opts, p.cfg.data.max_seq_len, seed=p.cfg.seed)
    meta = {"rules": opts.variant, "attribution": dataclasses.asdict(opts), "checkpoint": p.folder, "task": task.name}
    store = ImportanceStore.for_engine(engine, keep_tasks=True, meta=meta)
    store.add_task(task.name, importance)
    store.save(out)
    if is_main():
        consolidate(out)
        print(f"importance of {task.name}: {n} samples explained; store in {os.path.join(out, 'importance')} "
              f"(consolidated.safetensors: full tensors)", flush=True)
        if n == 0:
            print(f"agcl: warning: no sample of {task.name} was answered correctly; its importance is zero",
                  file=sys.stderr, flush=True)
    barrier()


# --------------------------------------------------------------------------- export


def _fp32_state_dict(folder: str) -> dict[str, Any]:
    """Full fp32 weights from the sharded files, lazily (a tensor is materialised when read).

    ZeRO 1-3 keep the fp32 master in the optimizer shards; stage 0 keeps the whole module in the
    model-states file."""
    import torch

    root, tag = os.path.split(folder)
    if glob.glob(os.path.join(folder, "*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()):  # its progress prints are not ours to show
            return get_fp32_state_dict_from_zero_checkpoint(root, tag, lazy_mode=True)
    # the manifest matched (our own save wrote this file); tensors only all the same
    return torch.load(os.path.join(folder, "mp_rank_00_model_states.pt"), map_location="cpu",
                      weights_only=True)["module"]


def export_checkpoint(folder: str, out: str, dtype: str = "fp32") -> None:
    """Write a Hugging Face folder (config.json, model.safetensors — sharded past 50 GB —, tokenizer
    files when the model has a Hugging Face tokenizer, agcl_export.json) from a sharded checkpoint.

    One process, no DeepSpeed ranks; the model is built on the meta device and takes the loaded
    tensors as they are, so memory peaks at one copy of the weights. Atomic: written to a temporary
    folder next to `out`, renamed at the end."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from agcl_ds.data.collate import HFTokenizer
    from agcl_ds.models import build_tokenizer, check_source, config_from

    folder, pos = _resolve_checkpoint(folder)
    cfg = _config_of(folder, pos)
    m = cfg.model
    check_source(m)
    checkpoint.require_valid(folder)
    tok = build_tokenizer(m)
    if m.from_config is not None:
        hf_config = config_from(m.from_config, tok)
    else:
        hf_config = AutoConfig.from_pretrained(m.path, gguf_file=m.gguf_file, local_files_only=True,
                                               trust_remote_code=m.trust_remote_code)
    hf_config.use_cache = True  # training switches the KV cache off; generation wants it
    torch_dtype = getattr(torch, DTYPES[dtype])
    # export builds one plain model: a ZeRO-3 config left registered in this process (an engine
    # built earlier) would make transformers partition it through zero.Init
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch_dtype, trust_remote_code=m.trust_remote_code)
    state = {}
    for k, lazy in _fp32_state_dict(folder).items():  # one fp32 tensor at a time on top of the result
        t = lazy.contiguous()
        state[k] = t.to(torch_dtype) if t.is_floating_point() else t
    result = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [k for k, v in model.state_dict().items() if v.is_meta]
    if result.unexpected_keys or missing:
        what = f"unexpected {result.unexpected_keys[0]!r}" if result.unexpected_keys else f"no {missing[0]!r}"
        raise CheckpointError(f"{folder}: the weights do not fit the run's model config ({what})")
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-export-")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the export is an ordinary folder
    try:
        model.save_pretrained(tmp)
        if isinstance(tok, HFTokenizer):
            tok.tok.save_pretrained(tmp)
        with open(os.path.join(tmp, "agcl_export.json"), "w") as f:
            json.dump({"checkpoint": os.path.abspath(folder), "task": pos.task, "step": pos.step,
                       "method": pos.method, "dtype": dtype,
                       "tokenizer": "hf" if isinstance(tok, HFTokenizer) else "byte (agcl_ds.data.collate)"},
                      f, indent=1)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cmd_export(args: argparse.Namespace) -> None:
    if os.path.exists(args.out) and not args.overwrite:
        raise CheckpointError(f"--out {args.out}: exists; pass --overwrite to replace it")
    check_writable(args.out, "--out")
    export_checkpoint(args.checkpoint, args.out, args.dtype)
    print(f"exported {os.path.normpath(args.checkpoint)} to {args.out}")


# --------------------------------------------------------------------------- report


def cmd_report(args: argparse.Namespace) -> None:
    from agcl_ds.report import load_results, metric_bars, side_by_side, summary_table

    try:
        results = load_results(args.results)
    except ValueError as e:
        _fail(str(e))
    for path, r in zip(args.results, results, strict=True):
        missing = [k for k in ("tasks", "matrix", "base", "method", "OP", "BWT", "FWT", "config")
                   if not isinstance(r, dict) or k not in r]
        if missing:
            _fail(f"{path}: not a results.json (no {missing[0]!r})")
    print(side_by_side(results))
    print()
    print(summary_table(results))
    if args.png:
        metric_bars(results, args.png)
        print(f"wrote {args.png}")


class _Parser(argparse.ArgumentParser):
    """Usage errors follow the same contract as every other user error: one line, exit 2."""

    def error(self, message: str) -> None:
        _fail(f"{message} (see {self.prog} -h)")


def cmd_overlap(args: argparse.Namespace) -> None:
    from agcl_ds.analysis import cmd_overlap as run_overlap

    try:
        run_overlap(args)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="agcl", description="Continual fine-tuning with attribution-guided gates")
    # `deepspeed --module agcl_ds.cli` passes --local_rank before the subcommand
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    def launched(name: str, help_text: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("--config", required=True, help="experiment YAML")
        cmd.add_argument("--ds", required=True, help="DeepSpeed JSON (\"auto\" fields filled from the YAML)")
        cmd.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
        return cmd

    train = launched("train", "run a continual task sequence (under deepspeed or torchrun)")
    train.add_argument("--resume", choices=["auto", "never", "force"], default="auto",
                       help="auto: continue from the newest valid checkpoint (default); never: refuse to start "
                            "over existing checkpoints; force: resume although the config changed")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. training.lr=1e-4")
    train.set_defaults(fn=cmd_train)

    ev = launched("eval", "evaluate every configured task with a checkpoint's (or the configured) model")
    ev.add_argument("--checkpoint", help=CKPT_HELP)
    ev.add_argument("--out", help="folder for eval.json (default: the checkpoint's run dir, else the config's)")
    ev.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.tasks=[dec]")
    ev.set_defaults(fn=cmd_eval)

    attr = launched("attribute", "LRP importance of one task on a checkpoint's model, saved as an importance store")
    attr.add_argument("--checkpoint", required=True, help=CKPT_HELP)
    attr.add_argument("--task", required=True, help="a task name from data.tasks")
    attr.add_argument("--out", help="folder for importance/ (default: <run_dir>/attribution/<tag>-<task>)")
    attr.add_argument("overrides", nargs="*", help="key=value overrides, e.g. method.options.attribution.k=4")
    attr.set_defaults(fn=cmd_attribute)

    export = sub.add_parser("export", help="a consolidated Hugging Face model folder from a sharded checkpoint "
                                           "(offline, one process)")
    export.add_argument("--checkpoint", required=True, help=CKPT_HELP)
    export.add_argument("--out", required=True, help="the Hugging Face folder to write")
    export.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights dtype (default fp32)")
    export.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    export.set_defaults(fn=cmd_export)

    report = sub.add_parser("report", help="print matrices and OP/BWT/FWT of one or more results.json")
    report.add_argument("results", nargs="+")
    report.add_argument("--png", help="also write a bar chart of OP/BWT/FWT per run to this file")
    report.set_defaults(fn=cmd_report)

    from agcl_ds import analysis

    overlap = sub.add_parser("overlap", help="overlap of the tasks' top-k%% important parameters per layer")
    analysis.add_arguments(overlap)
    overlap.set_defaults(fn=cmd_overlap)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also follow an option (`... --checkpoint DIR data.tasks=[dec]`)
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.fn(args)
    except USER_ERRORS as e:
        _fail(str(e))
    dist_helpers = sys.modules.get("agcl_ds.distributed")
    if dist_helpers is not None:  # every rank leaves the group together: gloo can abort a lone exit
        dist_helpers.shutdown_distributed()


def entry(argv: list[str] | None = None) -> None:
    """The `agcl` command and `launch/train.py`: main(), then a rank of a distributed job ends without
    interpreter teardown (agcl_ds.distributed.end_rank says why). In-process callers use main()."""
    main(argv)
    dist_helpers = sys.modules.get("agcl_ds.distributed")
    if dist_helpers is not None and dist_helpers.joined:
        dist_helpers.end_rank()


if __name__ == "__main__":
    entry()
