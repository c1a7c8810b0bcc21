"""LoRA adapters on a frozen base (`model.peft`), built with `peft`, part of the model stage.

`add_lora` wraps the loaded causal LM with `peft.get_peft_model`: the base weights are frozen, each
targeted Linear gains A [r, in] and B [out, r], and the only trainable parameters are the adapters.
Everything downstream (optimizer, ZeRO partitions, importance store, gate, the methods) sees just
the trainable parameters, as it does for `model.train_top_layers`. Under ZeRO-3 the base is already
partitioned by `zero.Init` when the adapters are added; `deepspeed.initialize` partitions the new
adapter parameters like any other, so base and adapter are both sharded.

The adapter is initialised from a seed, not from the global RNG, so every rank builds the same one
(ZeRO-0/1/2 replicate it) and a resumed run rebuilds it before its checkpoint overwrites it.
"""

from __future__ import annotations

from typing import Any

import torch

# the attention and MLP projections of each architecture (leaf module names, as peft matches them)
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


class AdapterError(ValueError):
    """A `model.peft` setting this model cannot take, phrased for the user in one line."""


def _linear_leaves(model: torch.nn.Module) -> set[str]:
    """Leaf names of the modules LoRA can wrap (Linear, GPT-2's Conv1D), the output head excluded."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
            if m is not head and (isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D")}


def lora_config(spec: Any, model: torch.nn.Module):
    """The `peft.LoraConfig` for `spec` (agcl_ds.config.PeftSpec) on `model`; checks the targets."""
    from peft import LoraConfig

    kind = getattr(model.config, "model_type", None)
    targets = spec.target_modules or DEFAULT_TARGETS.get(kind)
    if targets is None:
        raise AdapterError(f"model.peft.target_modules: no default for model_type {kind!r}; "
                           f"name the modules to adapt (Linear leaves: {', '.join(sorted(_linear_leaves(model)))})")
    leaves = _linear_leaves(model)
    unknown = [t for t in targets if t not in leaves]
    if unknown:
        raise AdapterError(f"model.peft.target_modules: {unknown[0]!r} is not a Linear module of this "
                           f"{kind} model (known: {', '.join(sorted(leaves))})")
    return LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=list(targets),
                      task_type="CAUSAL_LM", fan_in_fan_out=kind == "gpt2", bias="none")


def adapter_names(spec: Any, n_tasks: int) -> list[str]:
    """The adapters `spec` asks for: peft's "default" when shared, "task0".."task{T-1}" per task."""
    return [f"task{i}" for i in range(n_tasks)] if spec.adapter == "per_task" else ["default"]


def add_lora(model: torch.nn.Module, spec: Any, seed: int, n_tasks: int = 1) -> torch.nn.Module:
    """The model wrapped by peft with fresh LoRA adapters (A: peft's Kaiming init, B = 0).

    Per-task adapters are all active (their outputs summed) and all trainable: which one a task may
    move is the method's to decide (olora gates the others' updates to exactly zero), because the
    optimizer's parameter set cannot change after the engine is built."""
    from peft import get_peft_model

    config = lora_config(spec, model)
    names = adapter_names(spec, n_tasks)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(model, config, adapter_name=names[0])
        for name in names[1:]:
            model.add_adapter(name, config)
    if len(names) > 1:
        model.base_model.set_adapter(names)  # every adapter in the forward, every one trainable
    return model


def is_adapted(model: torch.nn.Module) -> bool:
    """Whether `model` (or a DeepSpeed engine's module) carries peft adapters."""
    return hasattr(model, "peft_config")
