"""Baseline methods `ewc`, `mas`, `freeze` and `agcl_replay` on 2 ranks (tiny Llama, ZeRO-0/2/3).

The importance pass is checked against a plain single-process autograd reference on the same weights
and samples (so sharding, the per-rank loss weights and the batch-size factor are all covered), the
penalty against the SGD update it must produce, and each method in the continual loop.
"""

from __future__ import annotations

import json
import os
import types
from contextlib import contextmanager
from unittest import mock

import pytest
import test_partition
import torch
from _dist import run_ranks
from test_agcl import FrozenCheck
from test_loop import TINY
from test_partition import batch, build_engine, full_fp32, local_masters, micro_step

from agcl_ds import distributed as D
from agcl_ds.attribution import pick_samples
from agcl_ds.config import ConfigError, MethodConfig, load_config, load_ds_config, resolve_ds_config
from agcl_ds.data.collate import ByteTokenizer, collate
from agcl_ds.data.types import Example
from agcl_ds.importance import flatstate
from agcl_ds.importance.partition import full_specs, gather_full, inner_optimizers
from agcl_ds.methods import METHODS, build_method
from agcl_ds.methods._anchor import STATE, SUBDIR, AnchorOptions, per_sample
from agcl_ds.methods.agcl import Agcl, AgclOptions
from agcl_ds.methods.agcl_replay import AgclReplay
from agcl_ds.methods.ewc import Ewc
from agcl_ds.methods.freeze import Freeze, frozen_names
from agcl_ds.methods.hft import Hft, frozen_half
from agcl_ds.methods.magmask import Magmask
from agcl_ds.methods.mas import Mas, MasOptions

MAX_LEN = 16
EXAMPLES = [Example(f"{i}*{i % 7}+{i}=", str(i * (i % 7) + i)) for i in range(12)]  # ids < the tiny vocab


# ---------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize("name, options, key", [
    ("ewc", {"lam": -1}, "method.options.lam"),
    ("ewc", {"lamda": 1}, "method.options.lamda"),
    ("mas", {"normalize": "sum"}, "method.options.normalize"),
    ("mas", {"n_samples": 0}, "method.options.n_samples"),
    ("ewc", {"micro_batch_size": 0}, "method.options.micro_batch_size"),
    ("freeze", {"fraction": 1.5}, "method.options.fraction"),
    ("freeze", {"embeddings": "yes"}, "method.options.embeddings"),
    ("agcl_replay", {"replay": {"fraction": 1}}, "method.options.replay.fraction"),
    ("agcl_replay", {"agcl": {"gate_on": "x"}}, "method.options.agcl.gate_on"),
    ("agcl_replay", {"gate": {}}, "method.options.gate"),
    ("agcl", {"anchor": -1}, "method.options.anchor"),
    ("agcl", {"attribution": {"mass": 0}}, "attribution.mass"),
    ("agcl", {"attribution": {"top_frac": 1.5}}, "attribution.top_frac"),
    ("agcl", {"attribution": {"temperature": -1}}, "attribution.temperature"),
    ("agcl", {"attribution": {"normalize": "rank", "temperature": 1}}, "attribution.temperature"),
    ("agcl_replay", {"agcl": {"anchor": float("nan")}}, "method.options.agcl.anchor"),
])
def test_bad_options_name_their_key(name, options, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_method(MethodConfig(name, options))


def test_freeze_policy():
    llama = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"] + [
        f"model.layers.{i}.{p}.weight" for i in range(2, 7) for p in ("mlp.up_proj", "input_layernorm")]
    names, blocks = frozen_names(llama, 0.5, embeddings=False)
    assert blocks == [2, 3]  # trainable blocks 2..6: the bottom half, rounded down
    assert names == [n for n in llama if ".layers.2." in n or ".layers.3." in n]
    names, _ = frozen_names(llama, 0.5, embeddings=True)
    assert "model.embed_tokens.weight" in names and "lm_head.weight" in names and "model.norm.weight" not in names
    gpt2 = ["transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.weight"]
    assert frozen_names(gpt2, 1.0, embeddings=False)[1] == [0, 1]
    with pytest.raises(ConfigError, match="method.options.fraction"):
        frozen_names(gpt2, 0.3, embeddings=False)  # 0.3 of 2 blocks freezes none
    with pytest.raises(ConfigError, match="no Transformer blocks"):
        frozen_names(["encoder.weight"], 0.5, embeddings=False)


def test_hft_freezes_half_of_each_group_per_task():
    names = [f"model.layers.{i}.{p}.weight" for i in range(3) for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")]
    names += ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"]
    one, two = frozen_half(names, 0, 0), frozen_half(names, 0, 1)
    assert one == frozen_half(list(reversed(names)), 0, 0)  # a function of the names, not their order
    assert one != two and one != frozen_half(names, 1, 0)  # a new half per task and per seed
    for i in range(3):
        block = [n for n in one if f".layers.{i}." in n]
        assert sum(".self_attn." in n for n in block) == 2 and sum(".mlp." in n for n in block) == 1
        assert sum("layernorm" in n for n in block) == 1
    assert sum(".layers." not in n for n in one) == 1  # embeddings, norm and head: one of three


# ---------------------------------------------------------------------------------------------- helpers
@contextmanager
def _fp32_accumulation(on: bool):
    """bf16 ZeRO-1/2 with fp32 gradient accumulation: DeepSpeed then adds every backward into one
    partition buffer that only `step()` releases (the case a plain zero_grad() does not clear)."""
    if not on:
        yield
        return
    plain = test_partition.ds_config
    with mock.patch.object(test_partition, "ds_config",
                           lambda *a, **k: {**plain(*a, **k), "data_types": {"grad_accum_dtype": "fp32"}}):
        yield


def _opt_state(engine) -> list[torch.Tensor]:
    return [v.detach().clone() for opt in inner_optimizers(engine) for st in opt.state.values()
            for v in st.values() if torch.is_tensor(v)]


def _views(flat: torch.Tensor, layout) -> dict[str, torch.Tensor]:
    return {n: flat.narrow(0, s.flat_offset, s.numel) for n, s in layout.specs.items()}


def _rel_err(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    top = max(float(want[n].abs().max()) for n in want)
    return max(float((got[n].float() - want[n]).abs().max()) for n in want) / top


def _reference(weights: dict[str, torch.Tensor], engine, method) -> dict[str, torch.Tensor]:
    """Ω_τ from a plain copy of the model: autograd on each global micro-batch's mean per-sample loss."""
    plain = type(engine.module)(engine.module.config)
    plain.load_state_dict(weights)
    params = dict(plain.named_parameters())
    o = method.options
    samples = pick_samples(EXAMPLES, o.n_samples, 0)
    step = D.world_size() * o.micro_batch_size
    out = {n: torch.zeros_like(p) for n, p in params.items()}
    for first in range(0, len(samples), step):
        group = samples[first:first + step]
        b = collate(ByteTokenizer(), group, MAX_LEN)
        logits = plain(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        loss = per_sample(logits, b["labels"], method.token_objective).mean()
        for (n, _), g in zip(params.items(), torch.autograd.grad(loss, list(params.values())), strict=True):
            out[n] += method.statistic(g, len(group)) * (len(group) / len(samples))
    if isinstance(method, Ewc):  # the per-sample objective is the model's own loss on one example
        one = collate(ByteTokenizer(), samples[:1], MAX_LEN)
        own = per_sample(plain(**one).logits, one["labels"], method.token_objective)[0]
        assert torch.allclose(own, plain(**one).loss, rtol=1e-5), (own, plain(**one).loss)
    return out


# ---------------------------------------------------------------------------------------------- importance pass
def _importance_body(tmp: str, configs: list[tuple[int, str, int, bool]]) -> list[dict]:
    out = []
    for stage, dtype, gas, fp32_accum in configs:
        kw = dict(optimizer="AdamW", lr=1e-2, wd=0.1, gas=gas)
        with _fp32_accumulation(fp32_accum):
            eng, ref = build_engine(stage, dtype, **kw), build_engine(stage, dtype, **kw)
        for k in range(gas):  # one optimizer step first, so that there is optimizer state to keep
            micro_step(eng, k)
            micro_step(ref, k)
        weights, masters, state = full_fp32(eng), local_masters(eng), _opt_state(eng)
        res: dict = {"config": (stage, dtype, gas, fp32_accum),
                     "accum_dtype": getattr(eng.optimizer, "gradient_accumulation_dtype", None)}
        methods = [Ewc(AnchorOptions(n_samples=10, micro_batch_size=2)), Mas(MasOptions(n_samples=6))]
        for m in methods:
            m.setup(types.SimpleNamespace(engine=eng))
            m.save(f"{tmp}/empty")  # before the first task: no state, and loading gives none
            m.load(f"{tmp}/empty")
            res["empty_state"] = m.omega is None and m.anchor is None and m.tasks == []
            omega, n = m.importance(eng, ByteTokenizer(), EXAMPLES, MAX_LEN)
            full = gather_full(_views(omega, m.layout), m.layout.specs)
            res[m.name] = {"n": n, "numel_ok": omega.numel() == m.layout.numel,
                           "nonneg": bool((omega >= 0).all()), "nonzero": float((omega > 0).float().mean())}
            if dtype == "fp32":
                res[m.name]["err"] = _rel_err(full, _reference(weights, eng, m))
            m.consolidate("t0", omega)
            res[m.name]["round_trip"] = _round_trip(m, eng, f"{tmp}/{m.name}-{stage}{dtype}{gas}", full)
        res["untouched"] = (all(torch.equal(masters[n], v) for n, v in local_masters(eng).items())
                            and all(torch.equal(a, b) for a, b in zip(state, _opt_state(eng), strict=True)))
        for k in range(gas, 2 * gas):
            micro_step(eng, k)
            micro_step(ref, k)
        after, want = local_masters(eng), local_masters(ref)
        res["next_step_equal"] = all(torch.equal(after[n], want[n]) for n in want)
        out.append(res)
    return out


def _round_trip(method, engine, folder: str, full_omega: dict[str, torch.Tensor]) -> dict:
    """save -> load into a fresh instance; load re-partitioned for one rank holding everything."""
    method.save(folder)
    fresh = type(method)(method.options)
    fresh.setup(types.SimpleNamespace(engine=engine))
    fresh.load(folder)
    shapes = {n: s.full_shape for n, s in method.layout.specs.items()}
    specs = full_specs(shapes)
    tensors, info = flatstate.load(f"{folder}/{SUBDIR}", STATE, specs, sum(s.numel for s in specs.values()),
                                   torch.float32)
    other = Mas(MasOptions()) if isinstance(method, Ewc) else Ewc(AnchorOptions())
    other.setup(types.SimpleNamespace(engine=engine))
    try:
        other.load(folder)
        wrong_method = ""
    except ValueError as e:
        wrong_method = str(e)
    return {"equal": torch.equal(fresh.omega, method.omega) and torch.equal(fresh.anchor, method.anchor),
            "tasks": fresh.tasks, "meta": info["meta"],
            "repartitioned": all(torch.equal(tensors["omega"].narrow(0, s.flat_offset, s.numel),
                                             full_omega[n].reshape(-1)) for n, s in specs.items()),
            "wrong_method": wrong_method}


@pytest.mark.slow
def test_importance_pass_matches_reference_and_leaves_training_untouched(tmp_path):
    configs = [(3, "fp32", 1, False), (2, "fp32", 2, False), (0, "fp32", 1, False), (2, "bf16", 1, True),
               (3, "bf16", 2, False)]
    for per_rank in run_ranks(_importance_body, configs, tmp=str(tmp_path)):
        for r in per_rank:
            assert r["empty_state"], r
            if r["config"][3]:
                assert r["accum_dtype"] == torch.float32, r  # the config really accumulates in fp32
            assert r["untouched"], r  # params and AdamW moments bit-identical after both passes
            assert r["next_step_equal"], r  # the next step equals one taken without the passes
            for name, n in (("ewc", 10), ("mas", 6)):
                est = r[name]
                assert est["n"] == n and est["numel_ok"] and est["nonneg"] and est["nonzero"] > 0.3, r
                if r["config"][1] == "fp32":
                    assert est["err"] < 1e-4, r  # = the single-process estimator on the same samples
                rt = est["round_trip"]
                assert rt["equal"] and rt["tasks"] == ["t0"] and rt["meta"]["method"] == name, r
                assert rt["repartitioned"], r
                assert f"belongs to method {name!r}" in rt["wrong_method"], r


# ---------------------------------------------------------------------------------------------- penalty
def _flat_masters(layout) -> torch.Tensor:
    return torch.cat([m.detach().reshape(-1).clone() for m in layout.masters])


def _penalised_step(engine, method, x: torch.Tensor, data: float = 1.0) -> None:
    engine.backward(engine(input_ids=x, labels=x).loss * data)
    method.before_step(types.SimpleNamespace(engine=engine))
    engine.step()


def _penalty_body(tmp: str, configs: list[tuple[int, str, float]]) -> dict:
    lr, lam = 0.1, 0.5
    exact = []
    for stage, dtype, clip in configs:
        eng = build_engine(stage, dtype, optimizer="SGD", lr=lr, clip=clip)
        m = Ewc(AnchorOptions(lam=lam))
        m.setup(types.SimpleNamespace(engine=eng))
        theta = _flat_masters(m.layout)
        g = torch.Generator().manual_seed(D.rank())
        m.omega = torch.zeros_like(theta)  # padding stays 0: DeepSpeed's norm must not see it
        for s in m.layout.specs.values():
            m.omega.narrow(0, s.flat_offset, s.numel).copy_(torch.rand(s.numel, generator=g))
        m.anchor = theta - torch.randn(theta.numel(), generator=g)  # an update far above θ's rounding
        _penalised_step(eng, m, batch(0), data=0.0)  # the data gradient is exactly zero
        pen = lam * m.omega * (theta - m.anchor)
        sq = float(pen.square().sum())
        norm = (D.all_sum([sq])[0] if stage > 0 else sq) ** 0.5
        coef = min(1.0, clip / (norm + 1e-6)) if clip else 1.0
        moved = _flat_masters(m.layout) - theta
        exact.append({"config": (stage, dtype, clip), "coef": coef,
                      "err": float((moved + lr * coef * pen).abs().max() / (lr * coef * pen).abs().max())})
    # AdamW on real data: a strong penalty keeps the important elements at θ*, unpenalised they move
    drift = {}
    for lam in (0.0, 1e3):
        eng = build_engine(3, "fp32", optimizer="AdamW", lr=1e-2, wd=0.1)
        m = Ewc(AnchorOptions(lam=lam, n_samples=8, micro_batch_size=2))
        m.setup(types.SimpleNamespace(engine=eng))
        omega, _ = m.importance(eng, ByteTokenizer(), EXAMPLES, MAX_LEN)
        m._normalise(omega)
        m.consolidate("t0", omega)
        for k in range(6):
            _penalised_step(eng, m, batch(k))
        d2 = (_flat_masters(m.layout) - m.anchor).square()
        drift[lam] = D.all_sum([float(d2.sum()), float((m.omega * d2).sum())])
    return {"exact": exact, "drift": drift}


@pytest.mark.slow
def test_ewc_penalty_is_added_to_the_gradient_partition():
    configs = [(3, "fp32", 0.0), (2, "fp32", 0.0), (0, "fp32", 0.0), (3, "fp32", 40.0), (2, "fp32", 40.0),
               (3, "bf16", 0.0)]
    for r in run_ranks(_penalty_body, configs):
        for e in r["exact"]:
            # one SGD step moves θ by -lr·clip_coef·λ·Ω⊙(θ-θ*) (bf16: the gradient partition rounds it)
            assert e["err"] < (1e-5 if e["config"][1] == "fp32" else 1e-2), e
            if e["config"][2]:
                assert e["coef"] < 0.9, e  # clipping was active and saw the penalty
        free, held = r["drift"][0.0], r["drift"][1e3]
        assert held[1] < 0.05 * free[1], r  # Ω-weighted drift from θ*
        assert held[0] < 0.5 * free[0], r  # overall drift


def _agcl_anchor_body(tmp: str) -> dict:
    """agcl with alpha 0.5 (protected elements half free) and its anchor: importance fixed to a random half
    of each tensor (attribution replaced), then 6 AdamW steps on data; drift from θ* on the protected half."""
    out = {}
    for lam in (0.0, 1e3):
        eng = build_engine(2, "fp32", optimizer="AdamW", lr=1e-2, wd=0.1)
        log = types.SimpleNamespace(event=lambda *a, **k: None, print=lambda *a: None)
        ctx = types.SimpleNamespace(engine=eng, log=log, tasks=["t0", "t1"],
                                    cfg=types.SimpleNamespace(model=types.SimpleNamespace(peft=None)))
        m = Agcl(AgclOptions(alpha=0.5, anchor=lam))
        m.setup(ctx)
        g = torch.Generator().manual_seed(7)  # the same map on every rank, each rank keeps its shard
        full = {n: (torch.rand(s.full_shape, generator=g) < 0.5).float() for n, s in sorted(m.store.specs.items())}
        imp = {n: full[n].view(-1).narrow(0, s.start, s.numel).to(torch.bfloat16) for n, s in m.store.specs.items()}
        m._attribute = lambda ctx, engine, task, imp=imp: (imp, 8)
        m.after_task(ctx, 0, types.SimpleNamespace(name="t0"))
        m.before_task(ctx, 1, types.SimpleNamespace(name="t1"))
        start = _flat_masters(m.layout)
        for k in range(6):
            _penalised_step(eng, m, batch(k))
        d2 = (_flat_masters(m.layout) - start).square()
        held = m.store.rbar_flat.float()
        out[lam] = D.all_sum([float((held * d2).sum()), float(((1 - held) * d2).sum())])
        if lam:
            out["theta_star_is_start"] = torch.equal(m.theta_star, start)
            m.save(tmp)
            m.gate.detach()
            back = Agcl(AgclOptions(alpha=0.5, anchor=lam))
            back.setup(ctx)
            back.load(tmp)
            out["round_trip"] = torch.equal(back.theta_star, m.theta_star)
        else:
            out["no_state"] = m.theta_star is None
    return out


@pytest.mark.slow
def test_agcl_anchor_holds_what_the_gate_leaves_free(tmp_path):
    r = run_ranks(_agcl_anchor_body, tmp=str(tmp_path))[0]
    assert r["no_state"] and r["theta_star_is_start"] and r["round_trip"], r
    free, anchored = r[0.0], r[1e3]
    assert anchored[0] < 0.1 * free[0], r  # the protected half stays near θ* (measured: 60x less drift)
    assert anchored[1] > 0.5 * free[1], r  # the unprotected half (R̄ = 0, no pull) trains as before


# ---------------------------------------------------------------------------------------------- in the loop
class CheckFreeze(Freeze):
    """Records, per parameter, whether task 2 changed this rank's shard."""

    report: dict = {}

    def before_task(self, ctx, index, task):
        super().before_task(ctx, index, task)
        if index == 1:
            self._before = local_masters(ctx.engine)
            o = self.options
            CheckFreeze.report["names"] = frozen_names(list(self.mask), o.fraction, o.embeddings)[0]

    def after_task(self, ctx, index, task):
        if index == 1:
            after = local_masters(ctx.engine)
            CheckFreeze.report["moved"] = {n: not torch.equal(after[n], self._before[n])
                                           for n in after if after[n].numel()}
        super().after_task(ctx, index, task)


class CheckAgclReplay(AgclReplay):
    """agcl_replay whose agcl part is test_agcl's FrozenCheck; records the training stream's size."""

    report: dict = {}

    def __init__(self, options):
        super().__init__(options)
        self.agcl = FrozenCheck(options.agcl)
        self.parts = (self.agcl, self.replay)

    def training_examples(self, ctx, index, task):
        examples = super().training_examples(ctx, index, task)
        CheckAgclReplay.report[index] = (len(task.train), len(examples), sum(e in task.train for e in examples))
        return examples


class CheckHft(Hft):
    """Records, per task, which tensors HFT froze and which of this rank's shards moved."""

    report: dict = {}

    def before_task(self, ctx, index, task):
        super().before_task(ctx, index, task)
        self._before = local_masters(ctx.engine)
        CheckHft.report[index] = {"frozen": frozen_half(list(self.gate.layout.specs), ctx.cfg.seed, index)}

    def after_task(self, ctx, index, task):
        after = local_masters(ctx.engine)
        CheckHft.report[index]["moved"] = {n: not torch.equal(after[n], self._before[n])
                                           for n in after if after[n].numel()}
        super().after_task(ctx, index, task)


class CheckMagmask(FrozenCheck, Magmask):
    """magmask with test_agcl's FrozenCheck report (R̄ = 1 elements that moved during task 2)."""


class CountEwc(Ewc):
    """Records how many times the penalty was applied with an anchor in place."""

    applied = 0

    def before_step(self, ctx):
        CountEwc.applied += self.omega is not None
        super().before_step(ctx)


def _loop_body(tmp: str, method: str, ds: str, options: str, extra: list[str]) -> dict:
    from agcl_ds.loop import run

    METHODS.update(check_freeze="test_baselines:CheckFreeze", check_agcl_replay="test_baselines:CheckAgclReplay",
                   count_ewc="test_baselines:CountEwc", check_hft="test_baselines:CheckHft",
                   check_magmask="test_baselines:CheckMagmask")
    cfg = load_config("configs/demo_synthetic.yaml", TINY + extra + [
        f"output.dir={tmp}", f"method.name={method}", "model.pretrain=null", "training.weight_decay=0.1",
        f"method.options={options}"])
    results = run(cfg, resolve_ds_config(load_ds_config(f"ds_configs/{ds}.json"), cfg, 2))
    return {"matrix": results["matrix"], "freeze": CheckFreeze.report, "agcl": FrozenCheck.report,
            "replay": CheckAgclReplay.report, "ewc_applied": CountEwc.applied, "hft": CheckHft.report}


@pytest.mark.slow
def test_ewc_in_the_loop(tmp_path):
    out = run_ranks(_loop_body, "count_ewc", "zero3", "{lam: 10, n_samples: 8}", [], tmp=str(tmp_path))
    assert all(r["ewc_applied"] == 12 for r in out)  # every step of task 2 (task 1 has no anchor yet)
    ckpt = tmp_path / "count_ewc" / "checkpoints" / "t002-s0000000" / "anchor"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["meta"] == {"method": "ewc", "tasks": ["dec"]}
    assert sorted(os.listdir(ckpt)) == ["meta.json", "rank0.safetensors", "rank1.safetensors"]


@pytest.mark.slow
def test_freeze_keeps_bottom_blocks_bit_identical(tmp_path):
    rep = run_ranks(_loop_body, "check_freeze", "zero2", "{fraction: 0.5}", [], tmp=str(tmp_path))
    for r in rep:
        frozen, moved = r["freeze"]["names"], r["freeze"]["moved"]  # moved: this rank's non-empty shards
        assert frozen and all(".layers.0." in n for n in frozen), frozen  # TINY has 2 blocks: block 0 freezes
        assert not any(moved[n] for n in frozen if n in moved), moved  # AdamW + weight decay 0.1, bit-identical
        assert all(moved[n] for n in moved if n not in frozen), moved  # the rest keeps learning
    assert any(n in r["freeze"]["moved"] for r in rep for n in r["freeze"]["names"])  # some rank held block 0


@pytest.mark.slow
def test_agcl_replay_trains_on_the_mixture_and_gates(tmp_path):
    options = ("{replay: {per_task: 8, fraction: 0.25}, agcl: {gate_on: update, attribution: "
               "{only_correct: false, n_samples: 8, micro_batch_size: 4, k: 2, top_frac: 0.3}}}")
    out = run_ranks(_loop_body, "check_agcl_replay", "zero3", options, [], tmp=str(tmp_path))
    for r in out:
        assert r["replay"][0] == (64, 64, 64)  # the first task: nothing to replay
        n, total, own = r["replay"][1]
        assert own == n and total - own == round(n * 0.25 / 0.75)  # 21 replayed examples of task 1
        rep = r["agcl"]
        assert rep["tasks_in_store"] == ["dec"] and rep["frozen"] > 0 and rep["frozen_moved"] == 0, rep
        assert rep["free_moved"] > rep["frozen"], rep
    ckpt = tmp_path / "check_agcl_replay" / "checkpoints" / "t001-s0000000"
    assert json.loads((ckpt / "importance" / "meta.json").read_text())["tasks"] == ["dec"]
    assert len(json.loads((ckpt / "replay.json").read_text())) == 8


@pytest.mark.slow
def test_hft_trains_the_other_half_each_task(tmp_path):
    rep = run_ranks(_loop_body, "check_hft", "zero3", "{}", [], tmp=str(tmp_path))
    for r in rep:
        for task in (0, 1):
            frozen, moved = r["hft"][task]["frozen"], r["hft"][task]["moved"]
            assert not any(moved[n] for n in frozen if n in moved), (task, moved)  # AdamW + weight decay 0.1
            assert any(moved[n] for n in moved if n not in frozen)
        assert r["hft"][0]["frozen"] != r["hft"][1]["frozen"]


@pytest.mark.slow
def test_magmask_gates_its_top_k_mask(tmp_path):
    options = "{attribution: {n_samples: 8, micro_batch_size: 4, k: 2, top_frac: 0.2}}"
    rep = run_ranks(_loop_body, "check_magmask", "zero3", options, [], tmp=str(tmp_path))
    for r in rep:
        a = r["agcl"]
        assert a["tasks_in_store"] == ["dec"] and a["frozen"] > 0 and a["frozen_moved"] == 0, a
        assert a["free_moved"] > a["frozen"], a
    meta = json.loads((tmp_path / "check_magmask" / "checkpoints" / "t001-s0000000" / "importance" /
                       "meta.json").read_text())
    assert meta["meta"]["attribution"]["source"] == "grad_x_weight" and meta["meta"]["attribution"]["target"] == "loss"
