"""A sharded checkpoint → an ordinary Hugging Face model folder (`agcl export`), offline, one process.

Beside the resume contract (agcl_ds.checkpoint): it reads what `checkpoint.save` wrote, after the
manifest's checksums match, and writes the folder atomically.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

from agcl_ds import checkpoint
from agcl_ds.checkpoint import CheckpointError
from agcl_ds.data.collate import HFTokenizer

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


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


def export_checkpoint(folder: str, out: str, dtype: str = "fp32", adapter: bool = False,
                      base_out: str | None = None) -> None:
    """Write a Hugging Face folder (config.json, model.safetensors — sharded past 50 GB —, tokenizer
    files when the model has a Hugging Face tokenizer, agcl_export.json) from a sharded checkpoint.

    A LoRA run (`model.peft`) exports the merged model (peft's `merge_and_unload`) by default; with
    `adapter` it writes a standard PEFT adapter folder instead (adapter_config.json,
    adapter_model.safetensors) that `PeftModel.from_pretrained(base, out)` loads, and with `base_out`
    also the frozen base it adapts (required where the base was built from `model.from_config`).

    One process, no DeepSpeed ranks; the model is built on the meta device and takes the loaded
    tensors as they are, so memory peaks at one copy of the weights. Atomic: each folder is written
    to a temporary folder next to it, renamed at the end."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from agcl_ds.adapters import OSF_STATE, add_osf, load_osf_factors, lora_config
    from agcl_ds.models import build_tokenizer, check_source, config_from, local_source

    folder, pos = checkpoint.resolve(folder)
    cfg = checkpoint.config_of(folder, pos)
    lora = cfg.model.peft is not None
    osf = lora and cfg.model.peft.type == "osf"
    if (not lora or osf) and (adapter or base_out):
        raise CheckpointError(f"{folder}: --adapter/--base-out apply to LoRA runs (model.peft.type lora); this run "
                              f"trained {'peft OSF factors: export the merged model' if osf else 'the model itself'}")
    if adapter and cfg.model.from_config is not None and base_out is None:
        raise CheckpointError(f"{folder}: the base was built from model.from_config, so no folder holds it; "
                              "pass --base-out DIR to write it beside the adapter")
    check_source(cfg.model)
    checkpoint.require_valid(folder)
    m = local_source(cfg.model)
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
    if osf:  # peft decomposes real weights while it builds OSF layers: a CPU model (fp32) whose tensors the
        # checkpoint then replaces, buffers included (the frozen factors of the last re-sculpting)
        model = add_osf(AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32), m.peft,
                        n_tasks=len(cfg.data.tasks))
    else:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config, dtype=torch_dtype,
                                                     trust_remote_code=m.trust_remote_code)
            if lora:
                from peft import get_peft_model

                model = get_peft_model(model, lora_config(m.peft, model))
    state = {}
    for k, lazy in _fp32_state_dict(folder).items():  # one fp32 tensor at a time on top of the result
        t = lazy.contiguous()
        state[k] = t.to(torch_dtype) if t.is_floating_point() else t
    result = model.load_state_dict(state, strict=False, assign=True)
    if osf:
        from safetensors.torch import load_file

        load_osf_factors(model, load_file(os.path.join(folder, OSF_STATE)))
    model.tie_weights()
    missing = [k for k, v in model.state_dict().items() if v.is_meta]
    if result.unexpected_keys or missing:
        what = f"unexpected {result.unexpected_keys[0]!r}" if result.unexpected_keys else f"no {missing[0]!r}"
        raise CheckpointError(f"{folder}: the weights do not fit the run's model config ({what})")
    info = {"checkpoint": os.path.abspath(folder), "task": pos.task, "step": pos.step, "method": pos.method,
            "dtype": dtype, "tokenizer": "hf" if isinstance(tok, HFTokenizer) else "byte (agcl_ds.data.collate)"}
    if adapter:
        base_ref = os.path.abspath(base_out) if base_out else os.path.abspath(m.path)
        model.peft_config["default"].base_model_name_or_path = base_ref
        with _atomic_folder(out) as tmp:
            model.save_pretrained(tmp, save_embedding_layers=False)  # adapters never touch the embeddings
            _write_extras(tmp, tok, {**info, "adapter": True, "base": base_ref})
        if base_out is None:
            return
        model, out, info = model.unload(), base_out, {**info, "adapter": False, "base_of": os.path.abspath(out)}
    elif lora:
        model = model.merge_and_unload()
        info["merged_lora"] = True
    with _atomic_folder(out) as tmp:
        model.save_pretrained(tmp)
        _write_extras(tmp, tok, info)


def _write_extras(folder: str, tok, info: dict[str, Any]) -> None:
    """The tokenizer files (a Hugging Face tokenizer) and agcl_export.json: where the folder came from."""
    if isinstance(tok, HFTokenizer):
        tok.tok.save_pretrained(folder)
    with open(os.path.join(folder, "agcl_export.json"), "w") as f:
        json.dump(info, f, indent=1)


@contextlib.contextmanager
def _atomic_folder(out: str) -> Iterator[str]:
    """A temporary folder beside `out`, renamed to `out` when the block succeeds, removed when it fails."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-export-")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the export is an ordinary folder
    try:
        yield tmp
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
