"""The attribution pass on a partitioned engine equals the single-process importance."""

import pytest
import torch
from _dist import run_ranks

from agcl_ds.attribution import AttributionOptions, attribute
from agcl_ds.config import load_config, load_ds_config, resolve_ds_config
from agcl_ds.data import synthetic

TINY = ["model.from_config.hidden_size=32", "model.from_config.intermediate_size=64", "model.from_config.num_layers=2",
        "model.from_config.num_kv_heads=2", "model.pretrain=null", "data.synthetic.n_train=64",
        "data.synthetic.n_digits=4", "data.max_seq_len=16"]


def _body(tmp, ds_name, folder, aggregate, source="lrp", n_samples=12, block_elems=1 << 23, samples_per_step=6,
          exchange="auto"):
    from agcl_ds.engine import build_engine
    from agcl_ds.importance.partition import gather_full, local_shards
    from agcl_ds.models import load_model

    cfg = load_config("configs/demo_synthetic.yaml", [*TINY, "model.from_config=null", f"model.path={folder}",
                                            "model.tokenizer=byte"])
    ds = resolve_ds_config(load_ds_config(f"ds_configs/{ds_name}.json"), cfg, torch.distributed.get_world_size())
    loaded = load_model(cfg, ds)
    engine = build_engine(loaded, ds)
    task = synthetic.make_tasks(["dec"], cfg.data.synthetic)[0]
    world = torch.distributed.get_world_size()
    opts = AttributionOptions(only_correct=False, n_samples=n_samples, micro_batch_size=samples_per_step // world,
                              aggregate=aggregate, normalize="minmax" if source != "random" else "topk", k=4,
                              source=source, block_elems=block_elems, exchange=exchange)
    local, n = attribute(engine, loaded.tokenizer, task.train, opts, cfg.data.max_seq_len)
    specs = local_shards(engine)
    assert local.keys() == specs.keys()
    assert all(local[k].numel() == specs[k].numel for k in local)  # exactly this rank's shard
    return {"n": n, "full": gather_full(local, specs)}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from agcl_ds.models import load_model

    path = tmp_path_factory.mktemp("model")
    cfg = load_config("configs/demo_synthetic.yaml", TINY)
    loaded = load_model(cfg, {"zero_optimization": {"stage": 0}})
    loaded.model.config.architectures = ["LlamaForCausalLM"]
    loaded.model.save_pretrained(path)
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("aggregate,n_samples,block_elems,exchange", [
    ("topk", 12, 1 << 23, "auto"), ("power", 12, 1 << 23, "auto"), ("topk", 7, 1 << 23, "auto"),
    ("topk", 7, 100, "auto"), ("topk", 12, 1 << 23, "factors"), ("topk", 7, 100, "factors")])
def test_zero3_shards_equal_single_process(folder, tmp_path, aggregate, n_samples, block_elems, exchange):
    """7 samples on 2 ranks × 3: the last micro-batch keeps 1 sample on rank 0 and none on rank 1; with
    100-element blocks the ranks must still cut every parameter into the same row blocks. At 16 tokens
    "auto" sends every Linear weight's maps (its factors would be more bytes); "factors" sends the factors."""
    ref = run_ranks(_body, "zero0", folder, aggregate, "lrp", n_samples, block_elems, world=1,
                    tmp=str(tmp_path / "one"))[0]
    two = run_ranks(_body, "zero3", folder, aggregate, "lrp", n_samples, block_elems, 6, exchange, world=2,
                    tmp=str(tmp_path / "two"))
    assert ref["n"] == two[0]["n"] == n_samples
    full = two[0]["full"]
    assert full.keys() == ref["full"].keys()
    for name, want in ref["full"].items():
        got = full[name]
        assert got.shape == want.shape
        assert 0.0 <= float(got.min()) and float(got.max()) <= 1.0
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=name)
    assert sum(float(v.sum()) for v in full.values()) > 0


@pytest.mark.slow
def test_topk_importance_does_not_depend_on_the_split(folder, tmp_path):
    """The same samples in 6 micro-batches of 2 on one rank or 2 of 3 on each of two ranks: the same
    top-K importance (its log scale is the mean |R| of the whole pass, not of the first micro-batch)."""
    one = run_ranks(_body, "zero0", folder, "topk", "lrp", 12, 1 << 23, 2, world=1, tmp=str(tmp_path / "one"))[0]
    two = run_ranks(_body, "zero3", folder, "topk", "lrp", 12, 1 << 23, 6, world=2, tmp=str(tmp_path / "two"))[0]
    for name, want in one["full"].items():
        torch.testing.assert_close(two["full"][name], want, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.slow
def test_ablation_sources(folder, tmp_path):
    """grad x weight (no LRP rules) ranks elements differently; random gives exactly the top fraction."""
    lrp = run_ranks(_body, "zero0", folder, "topk", "lrp", world=1, tmp=str(tmp_path / "a"))[0]["full"]
    gxw = run_ranks(_body, "zero0", folder, "topk", "grad_x_weight", world=1, tmp=str(tmp_path / "b"))[0]["full"]
    rnd = run_ranks(_body, "zero0", folder, "topk", "random", world=1, tmp=str(tmp_path / "c"))[0]["full"]
    name = "model.layers.0.self_attn.q_proj.weight"  # the attention rule changes q's relevance
    assert not torch.allclose(lrp[name], gxw[name])
    for t in rnd.values():
        assert set(t.unique().tolist()) <= {0.0, 1.0} and abs(float(t.mean()) - 0.2) < 0.02
