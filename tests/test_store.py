"""Importance store: fold by max, save/load round trip, corruption and model mismatch, re-partitioning."""

from __future__ import annotations

import os

import pytest
import torch
from _dist import run_ranks
from safetensors.torch import load_file
from test_partition import build_engine, pattern

from agcl_ds.importance.partition import ShardSpec, full_specs, gather_full, local_shards, shard_of
from agcl_ds.importance.store import ImportanceStore, consolidate

SHAPES = {"w": (3, 4), "b": (5,)}


def _imp(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(s, generator=g).reshape(-1) for n, s in SHAPES.items()}


def test_add_task_folds_by_max_and_keeps_tasks(tmp_path):
    store = ImportanceStore(full_specs(SHAPES), keep_tasks=True, meta={"aggregation": "topk_mean", "K": 8})
    a, b = _imp(0), _imp(1)
    store.add_task("a", a)
    store.add_task("b", b)
    for n in SHAPES:
        assert torch.equal(store.rbar[n], torch.maximum(a[n], b[n]).to(torch.bfloat16))
        assert torch.equal(store.task("a")[n], a[n].to(torch.bfloat16))
    store.save(tmp_path)
    assert sorted(os.listdir(tmp_path / "importance")) == ["meta.json", "rank0.safetensors"]  # no temp left
    back = ImportanceStore.load(tmp_path, full_specs(SHAPES))
    assert back.tasks == ["a", "b"] and back.meta == {"aggregation": "topk_mean", "K": 8}
    assert all(torch.equal(back.rbar[n], store.rbar[n]) and torch.equal(back.task("b")[n], store.task("b")[n])
               for n in SHAPES)


@pytest.mark.parametrize("combine", ["sum", "decay"])
def test_add_task_sum_and_decay(combine):
    store = ImportanceStore(full_specs(SHAPES))
    a, b = _imp(0), _imp(1)
    store.add_task("a", a, combine, decay=0.5)
    store.add_task("b", b, combine, decay=0.5)
    for n in SHAPES:
        bf = lambda t: t.to(torch.bfloat16)  # noqa: E731 (R̄ is held in bf16)
        want = ((bf(a[n]) + bf(b[n])).clamp(max=1) if combine == "sum"
                else torch.maximum(bf(a[n]) * 0.5, bf(b[n])))
        assert torch.equal(store.rbar[n], want), n
    with pytest.raises(ValueError, match="combine must be"):
        store.add_task("c", a, "mean")


def test_bad_input_is_rejected(tmp_path):
    store = ImportanceStore(full_specs(SHAPES))
    with pytest.raises(ValueError, match="missing 'w'"):
        store.add_task("a", {"b": torch.zeros(5)})
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        store.add_task("a", {"w": torch.full((12,), 1.5), "b": torch.zeros(5)})
    with pytest.raises(ValueError, match="has 4 elements"):
        store.add_task("a", {"w": torch.zeros(4), "b": torch.zeros(5)})
    store.add_task("a", _imp(0))
    with pytest.raises(ValueError, match="already in the store"):
        store.add_task("a", _imp(0))
    with pytest.raises(KeyError, match="no kept importance"):
        store.task("a")
    with pytest.raises(FileNotFoundError, match="no importance store"):
        ImportanceStore.load(tmp_path, full_specs(SHAPES))


def test_checksum_corruption_and_fingerprint_mismatch_are_detected(tmp_path):
    store = ImportanceStore(full_specs(SHAPES))
    store.add_task("a", _imp(0))
    store.save(tmp_path)
    with pytest.raises(ValueError, match="different model"):
        ImportanceStore.load(tmp_path, full_specs({"w": (4, 3), "b": (5,)}))
    path = tmp_path / "importance" / "rank0.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # flip one bit of the last stored value
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        ImportanceStore.load(tmp_path, full_specs(SHAPES))
    with pytest.raises(ValueError, match="checksum mismatch"):
        consolidate(tmp_path)


def _save_body(tmp: str) -> dict:
    """2 ranks, ZeRO-3: two tasks with known full maps, saved sharded; returns the gathered R̄."""
    engine = build_engine(3)
    specs = local_shards(engine)
    store = ImportanceStore.for_engine(engine, keep_tasks=True, meta={"rules": "attnlrp"})
    for seed in (1, 2):
        store.add_task(f"t{seed}", {n: shard_of(pattern(s, seed), s) for n, s in specs.items()})
    store.save(tmp)
    full = gather_full(store.rbar, specs)
    return {"full": full, "shapes": {n: s.full_shape for n, s in specs.items()},
            "partial": all(s.numel < s.full_numel for s in specs.values())}


@pytest.mark.slow
def test_repartition_two_ranks_to_one(tmp_path):
    res = run_ranks(_save_body, tmp=str(tmp_path))
    assert res[0]["partial"], "ZeRO-3 should split every parameter over the 2 ranks"
    shapes = res[0]["shapes"]
    full = consolidate(tmp_path)
    one = ImportanceStore.load(tmp_path, full_specs(shapes))  # 1 process: re-partitioned
    on_disk = load_file(str(tmp_path / "importance" / "consolidated.safetensors"))
    assert one.tasks == ["t1", "t2"] and one.meta == {"rules": "attnlrp"}
    for n, shape in shapes.items():
        spec = ShardSpec(n, shape, 0, 0)
        expected = torch.maximum(pattern(spec, 1), pattern(spec, 2))
        assert torch.equal(full[n], expected) and torch.equal(res[1]["full"][n], expected), n
        assert torch.equal(one.rbar[n].view(shape), expected) and torch.equal(on_disk[n], expected), n
        assert torch.equal(one.task("t2")[n].view(shape), pattern(spec, 2)), n
        assert torch.equal(on_disk[f"task.0/{n}"], pattern(spec, 1)), n
