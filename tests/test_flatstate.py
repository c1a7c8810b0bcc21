"""Flat state on disk: 2-rank save, load under the same layout and re-partitioned onto 1 rank, checksums."""

from __future__ import annotations

import json

import pytest
import torch
from _dist import run_ranks
from test_partition import build_engine

from agcl_ds.importance import flatstate
from agcl_ds.importance.partition import flat_layout, full_specs, shard_of

STATE = flatstate.Format("test.flat/1", "test state")


def _full(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Deterministic fp32 values (not representable in bf16, so a lossy round trip would show)."""
    return {n: torch.randn(s, generator=torch.Generator().manual_seed(seed + i)) for i, (n, s) in
            enumerate(sorted(shapes.items()))}


def _save_body(tmp: str, stage: int) -> dict:
    """Each rank saves its shards of two known full tensor sets, then loads them back in its own layout."""
    layout = flat_layout(build_engine(stage))
    shapes = {n: s.full_shape for n, s in layout.specs.items()}
    flats = {}
    for key, seed in (("a", 1), ("b", 2)):
        flats[key] = torch.zeros(layout.numel)  # the layout's padding stays 0
        for n, full in _full(shapes, seed).items():
            spec = layout.specs[n]
            flats[key].narrow(0, spec.flat_offset, spec.numel).copy_(shard_of(full, spec))
    flatstate.save(f"{tmp}/s{stage}", STATE, layout.specs, stage, flats, {"tasks": ["x"]})
    back, info = flatstate.load(f"{tmp}/s{stage}", STATE, layout.specs, layout.numel, torch.float32)
    return {"shapes": shapes, "info": info, "same": all(torch.equal(back[k], flats[k]) for k in flats),
            "partial": all(s.numel < s.full_numel for s in layout.specs.values())}


@pytest.mark.slow
@pytest.mark.parametrize("stage", [3, 0])  # ZeRO-3 splits every parameter; ZeRO-0 repeats them on every rank
def test_two_ranks_to_one_and_corruption(tmp_path, stage):
    res = run_ranks(_save_body, stage, tmp=str(tmp_path))
    assert all(r["same"] and r["info"] == {"tasks": ["x"]} for r in res)
    assert res[0]["partial"] == (stage == 3)
    folder = tmp_path / f"s{stage}"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["zero_stage"] == stage and meta["tensors"] == ["a", "b"]
    assert sorted(meta["files"]) == ["rank0.safetensors", "rank1.safetensors"]
    shapes = res[0]["shapes"]
    specs = full_specs(shapes)
    one, info = flatstate.load(folder, STATE, specs, sum(s.numel for s in specs.values()), torch.float32)
    full = flatstate.consolidate(folder, STATE, torch.float32)
    assert info == {"tasks": ["x"]}
    for key, seed in (("a", 1), ("b", 2)):
        for n, want in _full(shapes, seed).items():
            s = specs[n]
            assert torch.equal(one[key].narrow(0, s.flat_offset, s.numel).view(s.full_shape), want), (key, n)
            assert torch.equal(full[key][n], want), (key, n)
    with pytest.raises(ValueError, match="different model"):
        flatstate.load(folder, STATE, full_specs({"w": (3, 4)}), 12, torch.float32)
    path = folder / "rank1.safetensors"
    if stage == 0:  # rank 1 repeats rank 0's shards: re-partitioning never reads its file
        path.unlink()
        assert torch.equal(flatstate.consolidate(folder, STATE, torch.float32)["a"][n], full["a"][n])
        return
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"checksum mismatch for .*rank1\.safetensors"):
        flatstate.load(folder, STATE, specs, sum(s.numel for s in specs.values()), torch.float32)
    with pytest.raises(ValueError, match=r"checksum mismatch for .*rank1\.safetensors"):
        flatstate.consolidate(folder, STATE, torch.float32)

def test_meta_is_checked_before_any_tensor(tmp_path):
    specs = full_specs({"w": (3, 4)})
    with pytest.raises(FileNotFoundError, match="no test state at"):
        flatstate.load(tmp_path, STATE, specs, 12, torch.float32)
    with pytest.raises(ValueError, match="'files' is reserved"):
        flatstate.save(tmp_path, STATE, specs, 0, {"w": torch.zeros(12)}, {"files": []})
    flatstate.save(tmp_path, STATE, specs, 0, {"w": torch.ones(12)}, {})
    with pytest.raises(ValueError, match="expected format 'other/1', got 'test.flat/1'"):
        flatstate.read_meta(tmp_path, flatstate.Format("other/1", "other state"))
