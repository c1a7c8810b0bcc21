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

import math
from typing import Any

import torch

# the Linear leaves of each architecture's blocks, as peft matches them (the output head is not among them):
# the default `model.peft.target_modules`, and what a configured list is checked against before any rank starts
PROJECTIONS: dict[str, list[str]] = {
    **{k: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
       for k in ("llama", "qwen2", "qwen3", "mistral")},
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


class AdapterError(ValueError):
    """A `model.peft` setting this model cannot take, phrased for the user in one line."""


def _linear_leaves(model: torch.nn.Module) -> set[str]:
    """Leaf names of the modules LoRA can wrap (Linear, GPT-2's Conv1D), the output head excluded."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
            if m is not head and (isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D")}


def check_targets(spec: Any, kind: str | None) -> None:
    """Refuse unknown target modules for a known architecture (`kind`: its model_type, None if unknown yet)."""
    known = PROJECTIONS.get(kind or "")
    if known is None or spec.target_modules is None:
        return
    unknown = [t for t in spec.target_modules if t not in known]
    if unknown:
        raise AdapterError(f"model.peft.target_modules: {unknown[0]!r} is not a Linear module of this {kind} "
                           f"model (known: {', '.join(sorted(known))})")


def lora_config(spec: Any, model: torch.nn.Module):
    """The `peft.LoraConfig` for `spec` (agcl_ds.config.PeftSpec) on `model`; checks the targets."""
    from peft import LoraConfig

    kind = getattr(model.config, "model_type", None)
    targets = spec.target_modules or PROJECTIONS.get(kind)
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
    return [f"task{i}" for i in range(n_tasks)] if spec.adapter == "per_task" else ["default"]  # shared, merged


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


# --------------------------------------------------------------------------- per_task_merge


def lora_layers(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, peft LoRA layer) of every Linear adapted by the "default" adapter, in module order."""
    return [(n, m) for n, m in module.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]


def _full_fp32(p: torch.nn.Parameter) -> torch.Tensor:
    """Collective under ZeRO-3: the trained parameter's whole fp32 master (DeepSpeed's fragment API)."""
    from deepspeed.utils import safe_get_full_fp32_param

    full = safe_get_full_fp32_param(p)
    return (p.detach() if full is None else full).float().cpu().clone()


def _assign(p: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Collective under ZeRO-3: set a trained parameter everywhere it lives, the module's copy (re-partitioned
    from rank 0 under ZeRO-3) and the optimizer's fp32 master (DeepSpeed's fragment API; ZeRO-0 fp32 has none)."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param

    with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=hasattr(p, "ds_id")):
        with torch.no_grad():
            p.copy_(value.to(device=p.device, dtype=p.dtype))
    safe_set_full_fp32_param(p, value.to(device=p.device, dtype=torch.float32))


def merge_and_restart(module: torch.nn.Module, seed: int, task: int) -> None:
    """`model.peft.adapter: per_task_merge`, after task `task` (collective): W += scaling · B A on every adapted
    base weight (fp32 arithmetic, stored in W's dtype), then a fresh adapter for the next task (seeded Kaiming A
    as peft initialises it, B = 0). The merged base weights are frozen parameters, which DeepSpeed's
    checkpoints carry (ZeRO-2/3: their partitions; ZeRO-0/1: the module state), so a resumed run needs
    nothing more. The optimizer's moments belong to the old adapter: the caller resets them."""
    import deepspeed

    gen = torch.Generator().manual_seed(seed * 1_000_003 + task + 1)
    for _, layer in lora_layers(module):
        a_param, b_param = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        a, b = _full_fp32(a_param), _full_fp32(b_param)
        delta = layer.scaling["default"] * (b @ a)
        w = layer.get_base_layer().weight
        with deepspeed.zero.GatheredParameters([w], modifier_rank=0, enabled=hasattr(w, "ds_id")):
            with torch.no_grad():
                w.copy_((w.float() + (delta.t() if layer.fan_in_fan_out else delta).to(w.device)).to(w.dtype))
        fresh = torch.empty(a.shape)
        torch.nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=gen)
        _assign(a_param, fresh)
        _assign(b_param, torch.zeros(b.shape))


# --------------------------------------------------------------------------- osf (peft's OSF tuner)


def osf_rank(min_dim: int, first: float, task: int, n_tasks: int) -> int:
    """Preserved rank while task `task` trains: the share `first` of min_dim, growing linearly so that every
    task preserves more of what the earlier ones left (task T-1: first + (T-1)/T · (1 - first))."""
    return int(min_dim * (first + task * (1.0 - first) / max(1, n_tasks)))


def osf_layers(module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, peft OSF layer) of every adapted Linear."""
    return [(n, m) for n, m in module.named_modules() if hasattr(m, "osf_svd_params") and "default" in m.osf_svd_params]


def add_osf(model: torch.nn.Module, spec: Any, n_tasks: int) -> torch.nn.Module:
    """The model wrapped by peft's OSF tuner: each targeted weight split by SVD into a preserved top
    subspace and a trainable rest whose gradients peft projects orthogonal to it.

    ZeRO 0-2 only (`config.resolve_ds_config` refuses stage 3: peft's OSF layer multiplies its factors
    outside any module's own ops, and ZeRO-3 releases them before that product's backward). The frozen
    factors (U_low_init..., U_high, V_high) are buffers, replicated on every rank: about the size of the
    targeted weights again. The preserved factors U_high / V_high, which peft stores only for a non-square
    weight, are zero-padded to the last task's preserved rank, so that re-sculpting between tasks
    (`osf_resculpt`) keeps every shape, and with it the optimizer's partitions and the checkpoints."""
    from peft import OSFConfig, get_peft_model

    kind = getattr(model.config, "model_type", None)
    targets = list(spec.target_modules or PROJECTIONS.get(kind) or [])
    if not targets:
        raise AdapterError(f"model.peft.target_modules: no default for model_type {kind!r}; name the modules")
    linear = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    unknown = [t for t in targets if not any(n.rsplit(".", 1)[-1] == t for n in linear)]
    if unknown:
        raise AdapterError(f"model.peft.target_modules: {unknown[0]!r} is not a Linear module of this {kind} model "
                           "(osf adapts torch Linear layers only)")
    model = get_peft_model(model, OSFConfig(target_modules=targets, effective_rank=spec.effective_rank))
    for _, layer in osf_layers(model):
        k_max = osf_rank(min(layer.in_features, layer.out_features), spec.effective_rank, n_tasks - 1, n_tasks)
        if "default" in layer._osf_U_high:
            u = layer._osf_U_high["default"]
            layer._osf_U_high["default"] = torch.cat([u, u.new_zeros(u.shape[0], k_max - u.shape[1])], 1)
        if "default" in layer._osf_V_high:
            v = layer._osf_V_high["default"]
            layer._osf_V_high["default"] = torch.cat([v, v.new_zeros(k_max - v.shape[0], v.shape[1])], 0)
    return model


def _broadcast(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's tensor on every rank (an SVD's signs may differ between processes)."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dev = t.device
        from agcl_ds.distributed import device

        t = t.to(device())
        dist.broadcast(t, 0)
        t = t.to(dev)
    return t


@torch.no_grad()
def osf_resculpt(module: torch.nn.Module, first: float, task: int, n_tasks: int) -> None:
    """Before task `task` (collective): fold each layer's learned change into its base weight and decompose
    the result again, preserving the top `osf_rank(...)` directions, more than the task before had. The
    model computes the same function afterwards (the new trainable factors start equal to their frozen
    copies); slots the smaller trainable subspace no longer uses are zero and stay zero (their gradients
    vanish with S)."""
    import deepspeed

    for _, layer in osf_layers(module):
        params = layer.osf_svd_params["default"]
        u, s, v = (_full_fp32(params[k]) for k in ("U_low", "S_low", "V_low"))
        u0, s0, v0 = (layer._osf_U_low_init["default"], layer._osf_S_low_init["default"],
                      layer._osf_V_low_init["default"])
        delta = (u * s) @ v - (u0.float().cpu() * s0.float().cpu()) @ v0.float().cpu()
        w = layer.get_base_layer().weight
        with deepspeed.zero.GatheredParameters([w], modifier_rank=0, enabled=hasattr(w, "ds_id")):
            merged = w.detach().float().cpu() + delta
            U, S, Vt = (_broadcast(x.contiguous()) for x in torch.linalg.svd(merged, full_matrices=False))
            w.copy_(merged.to(w.device, w.dtype))
        k = osf_rank(S.numel(), first, task, n_tasks)
        c = S.numel() - k  # the trainable slots used now (of u.shape[1], the first task's)
        new_u, new_s, new_v = u.new_zeros(u.shape), s.new_zeros(s.shape), v.new_zeros(v.shape)
        new_u[:, :c], new_s[:c], new_v[:c] = U[:, k:], S[k:], Vt[k:]
        dtype = layer._osf_U_low_init["default"].dtype  # masters and frozen copies hold the same rounded values
        new_u, new_s, new_v = (x.to(dtype).float() for x in (new_u, new_s, new_v))
        for key, value in (("U_low", new_u), ("S_low", new_s), ("V_low", new_v)):
            _assign(params[key], value)
        for store, value in ((layer._osf_U_low_init, new_u), (layer._osf_S_low_init, new_s),
                             (layer._osf_V_low_init, new_v)):
            store["default"] = value.to(store["default"])
        if "default" in layer._osf_U_high:
            high = layer._osf_U_high["default"]
            high.zero_()[:, :k] = U[:, :k].to(high)
        if "default" in layer._osf_V_high:
            high = layer._osf_V_high["default"]
            high.zero_()[:k] = Vt[:k].to(high)


OSF_STATE = "osf/factors.safetensors"  # in a checkpoint folder: the frozen factors of the last re-sculpting
_OSF_BUFFERS = ("_osf_U_low_init", "_osf_S_low_init", "_osf_V_low_init", "_osf_U_high", "_osf_V_high")


def osf_compute_dtype(module: torch.nn.Module) -> None:
    """Collective: put the frozen OSF factors in the dtype the engine computes in (that of the trainable
    factors) and start the trainable factors' fp32 masters at exactly those rounded values. DeepSpeed's
    bf16/fp16 casts parameters, not these buffers, and peft's gradient projection then multiplies a bf16
    gradient by an fp32 factor and fails. With masters equal to the rounded frozen copies, the learned
    change that re-sculpting folds into the weight starts at exactly 0 instead of at a rounding error.
    The projection is as exact as the rest of the half-precision backward (about 3 significant digits)."""
    for _, layer in osf_layers(module):
        params = layer.osf_svd_params["default"]
        dtype = params["U_low"].dtype
        for b in _OSF_BUFFERS:
            store = getattr(layer, b)
            if "default" in store:
                store["default"] = store["default"].to(dtype)
        for key in ("U_low", "S_low", "V_low"):
            _assign(params[key], getattr(layer, f"_osf_{key}_init")["default"].float())


def osf_factors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The frozen OSF factors, `<layer>.<buffer>` -> tensor. peft keeps them as non-persistent buffers, out of
    every state dict (so out of DeepSpeed's checkpoints too): after a re-sculpting only these say what the
    trainable factors are measured against."""
    return {f"{name}.{b}": getattr(layer, b)["default"].detach().cpu().contiguous()
            for name, layer in osf_layers(module) for b in _OSF_BUFFERS if "default" in getattr(layer, b)}


def load_osf_factors(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put back what `osf_factors` returned (same layers and shapes, or a one-line ValueError)."""
    expected = osf_factors(module)
    if expected.keys() != tensors.keys():
        raise ValueError("the saved OSF factors name other layers than this model's")
    for name, layer in osf_layers(module):
        for b in _OSF_BUFFERS:
            store = getattr(layer, b)
            if "default" in store:
                t = tensors[f"{name}.{b}"]
                if t.shape != store["default"].shape:
                    raise ValueError(f"saved OSF factor {name}.{b} has shape {tuple(t.shape)}, this model "
                                     f"{tuple(store['default'].shape)}")
                store["default"] = t.to(store["default"])
