"""The benchmark models: a Llama of a named size as a ZeRO-3 engine (stage 3, every tensor partitioned),
and what the benchmarks share about where their ranks run (2 CPU ranks, or one per GPU under
DS_ACCELERATOR=cuda)."""

from __future__ import annotations

import torch

MODELS = {  # name: (hidden, layers, heads, kv heads, intermediate, vocab, seq)
    "tiny": (64, 2, 4, 2, 128, 1000, 32),
    "50M": (512, 8, 8, 4, 1024, 32000, 128),  # 64% embedding + head, like a small LM with a 32k vocabulary
    "50M-4k": (512, 20, 8, 4, 1024, 4096, 128),  # 8% embedding + head: the Transformer blocks' share of a 7-70B
    "0.5B": (896, 24, 14, 2, 4864, 151936, 256),  # Qwen2.5-0.5B's shape as a Llama (494M): the GPU check's model
}


def ranks() -> int:
    """Ranks to spawn: 2 on CPU (gloo), one per GPU on CUDA (NCCL cannot put two ranks on one GPU)."""
    from agcl_ds.distributed import local_world

    return local_world(2)


def where(world: int) -> str:
    """The ranks, in words, for a report's first line."""
    from agcl_ds.distributed import local_accelerator

    if local_accelerator() == "cuda":
        return f"{world} x {torch.cuda.get_device_name(0)} (NCCL)"
    return f"{world} CPU ranks (gloo, 1 thread each)"


def sync() -> None:
    """Wait for queued GPU work before reading a clock (nothing to wait for on CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def zero3_llama(model: str, micro_batch: int, dtype: str, lora: int = 0):
    """A seeded Llama of size `model`, partitioned from construction, with DeepSpeed's torch AdamW; with
    `lora` = r, frozen and adapted by LoRA of rank r (alpha 2r) on every attention and MLP projection."""
    import deepspeed
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.integrations import HfDeepSpeedConfig

    hidden, layers, heads, kv, inter, vocab, seq = MODELS[model]
    cfg = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
           "steps_per_print": 10**9, "gradient_clipping": 1.0,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01, "torch_adam": True}},
           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    keep = HfDeepSpeedConfig(cfg)  # must outlive the model: it makes from_config partition
    torch.manual_seed(0)
    mcfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=max(256, seq),
                       tie_word_embeddings=False, use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    module = AutoModelForCausalLM.from_config(mcfg)
    if lora:
        from agcl_ds.adapters import add_lora
        from agcl_ds.config import PeftSpec

        module = add_lora(module, PeftSpec(r=lora, alpha=2.0 * lora), seed=0)
    params = [p for p in module.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=module, config=cfg, model_parameters=params)
    engine._hf_ds_config = keep
    return engine
