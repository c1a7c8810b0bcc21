"""ZeRO layout: local shards concatenate to the full parameter, for every ZeRO stage.

Also holds the tiny-engine helpers that test_gate.py and test_store.py import.
"""

from __future__ import annotations

import pytest
import torch
from _dist import run_ranks

from agcl_ds.importance.partition import ShardSpec, flat_layout, full_specs, gather_full, shard_of

VOCAB, SEQ, MICRO = 128, 16, 2


def ds_config(stage: int, dtype: str = "fp32", optimizer: str = "SGD", lr: float = 0.1, wd: float = 0.0,
              gas: int = 1, clip: float = 0.0, offload: bool = False) -> dict:
    params = {"lr": lr, "weight_decay": wd}
    if optimizer == "AdamW":
        params["torch_adam"] = True
    cfg = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": clip,
        "steps_per_print": 10**9,
        "zero_allow_untested_optimizer": True,
        "optimizer": {"type": optimizer, "params": params},
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0,
                              "reduce_bucket_size": 20000, "allgather_bucket_size": 20000},
    }
    if offload:  # a torch optimizer on the CPU-offloaded partition (DeepSpeedCPUAdam needs a JIT build)
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        cfg["zero_force_ds_cpu_optimizer"] = False
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    return cfg


def build_engine(stage: int, dtype: str = "fp32", seed: int = 1234, **kw):
    """A 2-layer hidden-64 Llama under DeepSpeed; ZeRO-3 partitions it at construction."""
    import deepspeed
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.integrations import HfDeepSpeedConfig

    cfg = ds_config(stage, dtype, **kw)
    keep = HfDeepSpeedConfig(cfg)
    torch.manual_seed(seed)
    mcfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=False, use_cache=False)
    model = AutoModelForCausalLM.from_config(mcfg)
    engine, *_ = deepspeed.initialize(model=model, config=cfg, model_parameters=model.parameters())
    engine._hf_ds_config = keep  # keeps HfDeepSpeedConfig alive as long as the engine
    return engine


def batch(k: int) -> torch.Tensor:
    """Micro-batch k of this rank (different per rank and per k, same across runs)."""
    rank = torch.distributed.get_rank()
    g = torch.Generator().manual_seed(1000 * k + rank)
    return torch.randint(0, VOCAB, (MICRO, SEQ), generator=g)


def micro_step(engine, k: int) -> float:
    x = batch(k).to(engine.device)
    loss = engine(input_ids=x, labels=x).loss
    engine.backward(loss)
    engine.step()
    return loss.item()


def full_fp32(engine) -> dict[str, torch.Tensor]:
    """Collective: every trained parameter's full fp32 master, straight from DeepSpeed."""
    from deepspeed.utils import safe_get_full_fp32_param

    layout = flat_layout(engine)
    named = dict(engine.module.named_parameters())
    if layout.stage > 0:
        return {n: safe_get_full_fp32_param(named[n]).detach().float().clone() for n in layout.specs}
    return {n: m.detach().float().clone().view(layout.specs[n].full_shape)
            for n, m in zip(layout.specs, layout.masters, strict=True)}


def local_masters(engine) -> dict[str, torch.Tensor]:
    """This rank's shards read from the optimizer's fp32 master tensors through the flat layout."""
    layout = flat_layout(engine)
    flat = torch.cat([m.detach().reshape(-1).float() for m in layout.masters])
    return {n: flat.narrow(0, s.flat_offset, s.numel).clone() for n, s in layout.specs.items()}


def pattern(spec: ShardSpec, seed: int = 0) -> torch.Tensor:
    """Deterministic full R̄ with each element 0, 0.5 or 1 (a third each), the same on every rank."""
    g = torch.Generator().manual_seed(seed + sum(map(ord, spec.name)))
    return (torch.randint(0, 3, spec.full_shape, generator=g) / 2).to(torch.bfloat16)


def _partition_body(tmp: str, configs: list[tuple[int, str]]) -> list:
    from deepspeed.utils import safe_get_local_fp32_param

    out = []
    for stage, dtype in configs:
        engine = build_engine(stage, dtype)
        micro_step(engine, 0)  # one step so masters differ from init and ZeRO-1/2 grads are linked
        layout = flat_layout(engine)
        ref = full_fp32(engine)
        local = local_masters(engine)
        gathered = gather_full(local, layout.specs)
        named = dict(engine.module.named_parameters())
        z3_aligned = all(torch.equal(safe_get_local_fp32_param(named[n]).reshape(-1)[: s.numel], local[n])
                         for n, s in layout.specs.items()) if stage == 3 else True
        out.append({
            "config": (stage, dtype),
            "names": sorted(layout.specs) == sorted(n for n, p in named.items() if p.requires_grad),
            "gather_equal": all(torch.equal(gathered[n], ref[n]) for n in ref),
            "shard_of_equal": all(torch.equal(shard_of(ref[n], s), local[n])
                                  for n, s in layout.specs.items()),
            "z3_aligned": z3_aligned,
            "ranges": {n: (s.start, s.numel, s.full_numel) for n, s in layout.specs.items()},
            "local_elems": sum(s.numel for s in layout.specs.values()),
        })
    return out


@pytest.mark.slow
def test_local_shards_concatenate_to_full_param():
    configs = [(3, "fp32"), (2, "bf16"), (1, "fp32"), (0, "bf16")]
    per_rank = run_ranks(_partition_body, configs)
    for i, (stage, dtype) in enumerate(configs):
        r0, r1 = per_rank[0][i], per_rank[1][i]
        for r in (r0, r1):
            ok = r["names"] and r["gather_equal"] and r["shard_of_equal"] and r["z3_aligned"]
            assert ok, (stage, dtype, r)
        total = sum(v[2] for v in r0["ranges"].values())
        if stage == 0:
            assert r0["ranges"] == r1["ranges"] and r0["local_elems"] == total
            continue
        assert r0["local_elems"] + r1["local_elems"] == total, (stage, dtype)  # every element exactly once
        for n, (s0, k0, full) in r0["ranges"].items():
            s1, k1, _ = r1["ranges"][n]
            covered = sorted([(s0, s0 + k0), (s1, s1 + k1)])
            covered = [c for c in covered if c[1] > c[0]]
            assert covered[0][0] == 0 and covered[-1][1] == full, n
            assert all(a[1] == b[0] for a, b in zip(covered, covered[1:], strict=False)), n
        if stage == 3:  # ds_tensor-aligned: rank r starts at r * partition_numel
            assert all(s == 0 for s, _, _ in r0["ranges"].values())


def test_shard_of_and_full_specs():
    specs = full_specs({"a": (2, 3), "b": (4,)})
    assert specs["b"] == ShardSpec("b", (4,), 0, 4, 6)
    spec = ShardSpec("a", (2, 3), 2, 3, 0)
    assert shard_of(torch.arange(6).view(2, 3), spec).tolist() == [2, 3, 4]
    with pytest.raises(ValueError, match="expected a full tensor of shape"):
        shard_of(torch.zeros(6), spec)
    full = gather_full({"a": torch.arange(6.0), "b": torch.ones(4)}, specs)  # 1 process: no collective
    assert full["a"].shape == (2, 3) and full["b"].sum() == 4
