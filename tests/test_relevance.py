"""Per-sample parameter relevance from batched hooks == a batch-size-1 loop of ordinary backward passes."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from _dist import run_ranks
from test_lrp_rules import V, build

from agcl_ds.lrp.relevance import (
    PerSampleRelevance,
    answered_correctly,
    explained_logit,
    relevance_maps,
)
from agcl_ds.lrp.rules import lrp_rules


def make_batch(lengths: list[int], answer: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """right-padded batch; the last `answer` real tokens of each row are the answer"""
    g = torch.Generator().manual_seed(seed)
    b, t = len(lengths), max(lengths)
    ids = torch.randint(1, V, (b, t), generator=g)
    mask = torch.zeros(b, t, dtype=torch.long)
    labels = torch.full((b, t), -100)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        ids[i, n:] = 0
        labels[i, n - answer:n] = ids[i, n - answer:n]
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def loop_reference(model, batch, variant="attnlrp", **kw) -> dict[str, torch.Tensor]:
    """|W ⊙ ∂̃f_b/∂W| one unpadded sample at a time, through autograd's own weight gradients"""
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in flags:
        p.requires_grad_(True)
    out: dict[str, list[torch.Tensor]] = {}
    try:
        with lrp_rules(model, variant):
            for i, n in enumerate(batch["attention_mask"].sum(1).tolist()):
                model.zero_grad(set_to_none=True)
                ids, labels = batch["input_ids"][i:i + 1, :n], batch["labels"][i:i + 1, :n]
                explained_logit(model(input_ids=ids).logits, labels, **kw).sum().backward()
                for name, p in model.named_parameters():
                    g = torch.zeros_like(p) if p.grad is None else p.grad
                    out.setdefault(name, []).append((p.detach() * g).abs())
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
        model.zero_grad(set_to_none=True)
    return {k: torch.stack(v) for k, v in out.items()}


def max_rel_err(got: dict, ref: dict) -> float:
    assert got.keys() == ref.keys()
    return max(((got[n] - ref[n]).abs().max() / ref[n].abs().max().clamp_min(1e-300)).item() for n in got)


@pytest.mark.parametrize("family,tied", [("llama", False), ("llama", True), ("qwen3", False), ("gpt2", True)])
def test_per_sample_hooks_equal_batch_size_one_loop(family, tied):
    extra = {} if family == "gpt2" else dict(tie_word_embeddings=tied)
    model = build(family, "sdpa", **extra)
    batch = make_batch([9, 7, 11, 6])
    maps, keep = relevance_maps(model, batch, only_correct=False)
    assert keep.all()
    assert max_rel_err(maps, loop_reference(model, batch)) < 1e-6
    assert not any(p.grad is not None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_first_position_gold_target_and_cplrp():
    model = build("qwen2", "eager")
    batch = make_batch([8, 10, 7])
    kw = dict(target="gold", positions="first")
    maps, _ = relevance_maps(model, batch, "cplrp", only_correct=False, **kw)
    assert max_rel_err(maps, loop_reference(model, batch, "cplrp", **kw)) < 1e-6
    assert maps["model.layers.0.self_attn.q_proj.weight"].abs().max() == 0  # CP-LRP: q, k are constants


def test_chunked_blocks_and_sum_match():
    model = build("gpt2")
    batch = make_batch([9, 7, 11])
    full, _ = relevance_maps(model, batch, only_correct=False)
    small, _ = relevance_maps(model, batch, only_correct=False, max_chunk_elems=100)
    summed, _ = relevance_maps(model, batch, only_correct=False, reduce="sum", max_chunk_elems=100)
    assert max_rel_err(small, full) < 1e-12
    assert max_rel_err(summed, {n: r.sum(0) for n, r in full.items()}) < 1e-12


def test_consumer_gets_row_blocks_of_bounded_size():
    """Blocks are cut by the parameter's shape alone; embedding and head blocks carry only touched rows."""
    model = build("llama")
    batch = make_batch([9, 7])
    seen: dict[str, list[tuple[int, int]]] = {}
    sparse: dict[str, list[int]] = {}

    def consumer(name, param, r, block, rows):
        assert block.stop <= param.shape[0] and r.shape[0] == 2
        if rows is None:
            assert r.shape[1:] == (block.stop - block.start, *param.shape[1:])
        else:
            assert r.shape[1] == rows.numel() and bool(((rows >= block.start) & (rows < block.stop)).all())
            sparse.setdefault(name, []).extend(rows.tolist())
        assert r.shape[1] * param[0].numel() <= max(500, param[0].numel())
        seen.setdefault(name, []).append((block.start, block.stop))

    with lrp_rules(model), PerSampleRelevance(model, consumer, max_chunk_elems=500) as hooks:
        hooks.run(batch, only_correct=False)
    params = dict(model.named_parameters())
    assert seen.keys() == params.keys()
    for name, blocks in seen.items():  # each param once per pass, rows covered exactly once, in order
        step = max(1, 500 // params[name][0].numel())
        assert blocks == [(r, min(r + step, params[name].shape[0])) for r in range(0, params[name].shape[0], step)]
    # tokens up to the last explained logit (position n - 2) of each sample
    ids = torch.cat([batch["input_ids"][0, :8], batch["input_ids"][1, :6]]).unique().tolist()
    assert sparse.keys() == {"model.embed_tokens.weight", "lm_head.weight"}
    assert sparse["model.embed_tokens.weight"] == ids  # the samples' own tokens, nothing else
    assert 0 < len(sparse["lm_head.weight"]) <= 2 * 3  # the explained (predicted) tokens at 3 answer positions


def test_only_correct_samples_are_explained():
    model = build("llama")
    batch = make_batch([9, 8, 10, 7])
    for i in (0, 2):  # make samples 0 and 2 correct: answers become the model's greedy continuation
        for t in (batch["labels"][i] != -100).nonzero().flatten().tolist():
            with torch.no_grad():
                tok = model(input_ids=batch["input_ids"][i:i + 1, :t]).logits[0, -1].argmax()
            batch["input_ids"][i, t] = batch["labels"][i, t] = tok
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expect = answered_correctly(logits, batch["labels"])
    maps, keep = relevance_maps(model, batch)
    assert keep.tolist() == expect.tolist() and keep[0] and keep[2]
    ref = loop_reference(model, batch)
    assert max_rel_err(maps, {n: r[keep] for n, r in ref.items()}) < 1e-6


def test_answered_correctly_and_explained_logit():
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, -100, -100], [-100] * 5])
    logits = torch.zeros(3, 5, 6)
    logits[0, 1, 3] = logits[0, 2, 4] = 5.0  # row 0 correct at both answer positions
    logits[1, 0, 1] = 5.0
    logits[1, 1, 0] = 7.0  # row 1 wrong at its second position
    assert answered_correctly(logits, labels).tolist() == [True, False, False]
    assert explained_logit(logits, labels).tolist() == [10.0, 12.0, 0.0]
    assert explained_logit(logits, labels, positions="first").tolist() == [5.0, 5.0, 0.0]
    assert explained_logit(logits, labels, target="gold").tolist() == [10.0, 5.0, 0.0]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")
    assert torch.allclose(explained_logit(logits, labels, target="loss"), -nll.sum(1))
    with pytest.raises(ValueError, match="target"):
        explained_logit(logits, labels, target="argmax")


def test_lora_a_and_b_relevance_on_peft_model():
    peft = pytest.importorskip("peft")
    model = build("llama")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                          init_lora_weights=False, lora_dropout=0.1)
    model = peft.get_peft_model(model, cfg).double()
    batch = make_batch([9, 7, 8])
    maps, _ = relevance_maps(model, batch, only_correct=False)
    lora = [n for n in maps if "lora_A" in n or "lora_B" in n]
    assert len(lora) == 2 * 3 * 2 and all(maps[n].abs().max() > 0 for n in lora)
    assert max_rel_err(maps, loop_reference(model, batch)) < 1e-6
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(lora)  # flags restored


def test_uncovered_parameter_is_refused_in_one_line():
    model = build("llama")
    model.model.extra = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError) as e:
        PerSampleRelevance(model, lambda *a: None)
    assert "model.extra" in str(e.value) and "\n" not in str(e.value)


def _zero3_pass(tmp: str) -> tuple:
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from test_partition import build_engine, full_fp32, micro_step

    engine = build_engine(3)
    rank = torch.distributed.get_rank()
    maps, live = {}, []

    def consumer(name, p, r, block, rows):
        full = maps.setdefault(name, r.new_zeros(r.shape[0], *p.shape))
        full[:, block if rows is None else rows] = r
        live.append(sum(q.ds_status == ZeroParamStatus.AVAILABLE for q in engine.module.parameters()))

    with lrp_rules(engine.module), PerSampleRelevance(engine.module, consumer) as hooks:
        hooks.run(make_batch([12, 10], seed=rank), only_correct=False, forward=engine)
    full = full_fp32(engine)
    after = [micro_step(engine, k) for k in range(2)]
    twin = build_engine(3)
    return maps, max(live), full, after, [micro_step(twin, k) for k in range(2)]


@pytest.mark.slow
def test_zero3_hooks_see_full_weights_and_match_single_process():
    """Under ZeRO-3 each consumer call gets the full per-sample map while only its own weight is gathered."""
    from test_partition import VOCAB

    out = run_ranks(_zero3_pass)
    cfg = T.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        tie_word_embeddings=False)  # build_engine's model
    ref_model = T.LlamaForCausalLM(cfg)
    ref_model.load_state_dict(out[0][2], strict=False)
    for rank, (maps, live, _, after, twin) in enumerate(out):
        ref, _ = relevance_maps(ref_model, make_batch([12, 10], seed=rank), only_correct=False)
        assert max_rel_err(maps, ref) < 1e-6
        assert live == 1
        assert after == twin  # the engine trains exactly as a never-explained twin afterwards


def test_wanted_params_only_skip_frozen_modules_without_changing_the_rest():
    """With only the top block trained, frozen modules pass relevance through and emit nothing; the
    trained block's maps equal those of the full pass."""
    model = build("llama", "sdpa")
    batch = make_batch([9, 7, 11, 6])
    full, _ = relevance_maps(model, batch, only_correct=False)
    last = f"model.layers.{model.config.num_hidden_layers - 1}."
    top = {n for n, _ in model.named_parameters() if n.startswith(last)}
    got: dict[str, torch.Tensor] = {}

    def collect(name, p, r, block, rows):
        got.setdefault(name, torch.zeros(r.shape[0], *p.shape, dtype=r.dtype))[:, block if rows is None else rows] += r

    with lrp_rules(model, "attnlrp"), PerSampleRelevance(model, collect, wanted=top) as hooks:
        hooks.run(batch, only_correct=False)
    assert set(got) == top
    assert max_rel_err(got, {n: full[n] for n in top}) < 1e-12
