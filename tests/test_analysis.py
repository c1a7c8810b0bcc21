"""Top-set overlap between tasks (Figure 1): known answers, grouping, table/PNG, and a saved store end to end."""

from __future__ import annotations

import pytest
import torch

from agcl_ds.analysis import format_table, layer_group, load_task_maps, main, module_group, overlap, plot, top_set
from agcl_ds.importance.partition import full_specs
from agcl_ds.importance.store import ImportanceStore, consolidate

SHAPES = {
    "model.embed_tokens.weight": (10, 4),
    "model.layers.0.self_attn.q_proj.weight": (4, 4),
    "model.layers.0.mlp.up_proj.weight": (8, 4),
    "model.layers.1.self_attn.q_proj.weight": (4, 4),
    "model.layers.1.mlp.up_proj.weight": (8, 4),
    "model.norm.weight": (4,),
    "lm_head.weight": (10, 4),
}


def _random_maps(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(s, generator=g) for n, s in SHAPES.items()}


def _by(rows, group):
    return [r for r in rows if r.group == group]


def test_identical_maps_overlap_fully():
    m = _random_maps(0)
    rows = overlap({"a": m, "b": {n: t.clone() for n, t in m.items()}}, top_frac=0.25)
    assert [r.group for r in rows] == ["embed", "layer 0", "layer 1", "final norm", "lm_head", "all"]
    for r in rows:
        assert r.jaccard == 1.0 and r.overlap == 1.0 and r.size_a == r.size_b == r.inter > 0
    assert _by(rows, "all")[0].numel == sum(t.numel() for t in m.values())


def test_disjoint_top_sets_give_zero():
    ramp = {n: torch.arange(1, 1 + torch.Size(s).numel(), dtype=torch.float32).view(s) for n, s in SHAPES.items()}
    rows = overlap({"up": ramp, "down": {n: -t for n, t in ramp.items()}}, top_frac=0.25)
    for r in rows:
        assert r.inter == 0 and r.jaccard == 0.0 and r.overlap == 0.0 and r.size_a > 0


def test_partial_overlap_counts():
    a = torch.tensor([8.0, 7, 6, 5, 1, 1, 1, 0])  # top half: elements 0..3
    b = torch.tensor([0.0, 1, 6, 7, 8, 9, 1, 1])  # top half: elements 2..5
    c = torch.tensor([0.0, 0, 0, 0, 0, 0, 0, 0])  # constant: no element above the minimum, empty set
    rows = overlap({"a": {"w": a}, "b": {"w": b}, "c": {"w": c}}, top_frac=0.5)
    ab, ac, bc = _by(rows, "other")
    assert (ab.task_a, ab.task_b, ac.task_b, bc.task_a) == ("a", "b", "c", "b")
    assert (ab.size_a, ab.size_b, ab.inter, ab.union) == (4, 4, 2, 6)
    assert ab.jaccard == pytest.approx(1 / 3) and ab.overlap == pytest.approx(0.5)
    assert ab.chance("jaccard") == pytest.approx(0.25 / 0.75) and ab.chance("overlap") == 0.5
    assert ac.size_b == 0 and ac.jaccard == 0.0 and ac.overlap == 0.0
    assert _by(rows, "all")[0].inter == 2


def test_top_set_keeps_ties_and_skips_the_minimum():
    mask = torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 0, 0, 0])  # a stored binary top-20% mask
    assert top_set(mask, 0.05).tolist() == [True, False, False, True] + [False] * 6
    assert top_set(torch.full((5,), 0.5), 0.4).sum() == 0
    assert top_set(torch.tensor([3.0, 1, 2, 0]), 0.5).tolist() == [True, False, True, False]
    with pytest.raises(ValueError, match="top_frac"):
        top_set(mask, 0.0)


def test_grouping_by_layer_and_module():
    assert layer_group("model.layers.3.mlp.up_proj.weight") == "layer 3"
    assert layer_group("transformer.h.10.attn.c_attn.weight") == "layer 10"
    assert layer_group("base_model.model.model.layers.2.self_attn.q_proj.lora_A.default.weight") == "layer 2"
    assert layer_group("model.embed_tokens.weight") == "embed"
    assert layer_group("transformer.wte.weight") == layer_group("transformer.wpe.weight") == "embed"
    assert layer_group("model.norm.weight") == layer_group("transformer.ln_f.bias") == "final norm"
    assert layer_group("lm_head.weight") == "lm_head"
    assert module_group("model.layers.3.mlp.up_proj.weight") == "mlp.up_proj.weight"
    assert module_group("lm_head.weight") == "lm_head"
    maps = {n: torch.rand(2) for n in ["model.layers.10.w", "model.layers.2.w", "lm_head.weight",
                                        "model.embed_tokens.weight"]}
    rows = overlap({"a": maps, "b": maps}, 0.5)
    assert [r.group for r in rows] == ["embed", "layer 2", "layer 10", "lm_head", "all"]  # model order
    rows = overlap({"a": _random_maps(1), "b": _random_maps(2)}, 0.25, group_by=module_group)
    assert {r.group for r in rows} == {"embed", "self_attn.q_proj.weight", "mlp.up_proj.weight", "final norm",
                                       "lm_head", "all"}
    assert _by(rows, "mlp.up_proj.weight")[0].numel == 64


def test_mismatched_tasks_are_rejected():
    with pytest.raises(ValueError, match="at least two"):
        overlap({"a": _random_maps(0)}, 0.1)
    other = _random_maps(1)
    del other["lm_head.weight"]
    with pytest.raises(ValueError, match="different parameters"):
        overlap({"a": _random_maps(0), "b": other}, 0.1)


def test_table_and_png(tmp_path):
    rows = overlap({"t1": _random_maps(0), "t2": _random_maps(1), "t3": _random_maps(2)}, 0.25)
    text = format_table(rows, "overlap")
    lines = text.splitlines()
    assert "t1|t2" in lines[1] and "t1|t3" in lines[1] and "t2|t3" in lines[1]
    assert [line.split()[0] for line in lines[2:8]] == ["embed", "layer", "layer", "final", "lm_head", "all"]
    assert lines[-2].startswith("chance") and lines[-1].startswith("top sets")
    path = tmp_path / "overlap.png"
    plot(rows, path, "jaccard")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp.png"))


def _saved_store(folder, keep_tasks: bool, tasks: dict[str, dict[str, torch.Tensor]]) -> None:
    store = ImportanceStore(full_specs(SHAPES), keep_tasks=keep_tasks)
    for name, maps in tasks.items():
        store.add_task(name, {n: t.reshape(-1) for n, t in maps.items()})
    store.save(folder)


def test_end_to_end_from_a_saved_store(tmp_path, capsys):
    tasks = {t: {n: (x * 8).floor() / 8 for n, x in _random_maps(i).items()}  # exact in bf16
             for i, t in enumerate(["dec", "rot2inc", "swap"])}
    _saved_store(tmp_path / "run", True, tasks)
    per_task = load_task_maps([tmp_path / "run"])
    assert list(per_task) == ["dec", "rot2inc", "swap"]
    for t, maps in tasks.items():
        for n, x in maps.items():
            assert torch.equal(per_task[t][n].float(), x), (t, n)
    consolidate(tmp_path / "run", tmp_path / "all.safetensors")
    from_file = load_task_maps([tmp_path / "all.safetensors"])
    assert all(torch.equal(from_file[t][n], per_task[t][n]) for t in tasks for n in SHAPES)
    assert overlap(from_file, 0.25) == overlap(per_task, 0.25) == overlap(tasks, 0.25)

    png = tmp_path / "fig1.png"
    main([str(tmp_path / "run" / "importance"), "--top", "0.25", "--png", str(png)])
    out = capsys.readouterr().out
    assert "dec|rot2inc" in out and "rot2inc|swap" in out and "layer 1" in out and png.is_file()


def test_one_store_per_task_and_errors(tmp_path, capsys):
    _saved_store(tmp_path / "a", False, {"dec": _random_maps(0)})
    _saved_store(tmp_path / "b", False, {"dec": _random_maps(1)})
    per_task = load_task_maps([tmp_path / "a", tmp_path / "b"])
    assert list(per_task) == ["a:dec", "b:dec"]  # same task name from two runs: labelled by folder
    _saved_store(tmp_path / "max", False, {"dec": _random_maps(0), "swap": _random_maps(1)})
    with pytest.raises(ValueError, match="keep_tasks"):
        load_task_maps([tmp_path / "max"])
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "nowhere")])
    assert e.value.code == 2 and "no importance store" in capsys.readouterr().err
