"""LoRA adapters (`model.peft`): the base stays frozen, ZeRO-3 shards base and adapter alike and trains the
same adapter as ZeRO-0, every method runs on adapters, and the export loads with plain peft."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from _dist import run_ranks
from test_loop import TINY

from agcl_ds.config import ConfigError, load_config, load_ds_config, resolve_ds_config

LORA = TINY + ["model.pretrain=null", "model.peft.r=4", "model.peft.alpha=8"]


def make_base(folder: str) -> str:
    """The tiny Llama of TINY saved as a pretrained folder (byte tokenizer), so that every ZeRO stage and
    every run starts from the same base weights (zero.Init draws a from-config model differently)."""
    from transformers import AutoModelForCausalLM

    from agcl_ds.data.collate import ByteTokenizer
    from agcl_ds.models import config_from

    cfg = load_config("configs/demo_synthetic.yaml", TINY + ["model.pretrain=null"])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config_from(cfg.model.from_config, ByteTokenizer())).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    return make_base(str(tmp_path_factory.mktemp("base") / "tiny"))


def _cfg(tmp: str, extra: list[str] | None = None, base: str | None = None):
    src = [] if base is None else ["model.from_config=null", f"model.path={base}", "model.tokenizer=byte"]
    return load_config("configs/demo_synthetic.yaml", LORA + src + (extra or []) + [f"output.dir={tmp}"])


def _full_state(engine) -> dict[str, torch.Tensor]:
    """Collective: every parameter of the engine's module, whole, on every rank."""
    import deepspeed

    out = {}
    for name, p in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
            out[name] = p.detach().float().cpu().clone()
    return out


def _train_body(tmp: str, ds_name: str, base: str) -> dict:
    from agcl_ds.data.tasks import load_tasks
    from agcl_ds.engine import build_engine, train_task
    from agcl_ds.models import load_model
    from agcl_ds.runlog import RunLog

    cfg = _cfg(tmp, ["training.steps_per_task=4"], base)
    ds = resolve_ds_config(load_ds_config(f"ds_configs/{ds_name}.json"), cfg, 2)
    loaded = load_model(cfg, ds)
    engine = build_engine(loaded, ds)
    before = _full_state(engine)
    trainable = sorted(n for n, p in engine.module.named_parameters() if p.requires_grad)
    sharded = all(hasattr(p, "ds_id") and p.ds_tensor.numel() < p.ds_numel
                  for p in engine.module.parameters() if p.numel() > 64 or hasattr(p, "ds_id"))
    task = load_tasks(cfg)[0]
    train_task(engine, loaded.tokenizer, task.train, 0, steps=4, lr=cfg.training.lr, cfg=cfg,
               log=RunLog(tmp, cfg), desc="lora")
    return {"before": before, "after": _full_state(engine), "trainable": trainable, "sharded": sharded}


def test_only_adapters_train_and_zero3_matches_zero0(base):
    z3 = run_ranks(_train_body, "zero3", base)
    z0 = run_ranks(_train_body, "zero0", base)
    r3, r0 = z3[0], z0[0]
    assert r3["trainable"] == r0["trainable"] and r3["trainable"]
    assert all(".lora_A." in n or ".lora_B." in n for n in r3["trainable"])
    assert r3["sharded"]  # ZeRO-3 partitions base and adapter parameters alike
    for name, before in r3["before"].items():
        moved = not torch.equal(before, r3["after"][name])
        assert moved == (name in r3["trainable"]) or name.endswith("lora_A.default.weight"), name
        torch.testing.assert_close(r3["after"][name], r0["after"][name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(before, r0["before"][name], rtol=0, atol=0)  # same seeded adapter
    assert any(not torch.equal(r3["before"][n], r3["after"][n]) for n in r3["trainable"] if ".lora_B." in n)


def test_peft_config_errors_name_the_key(tmp_path):
    for extra, msg in [(["model.peft.r=0"], r"model\.peft\.r: expected an integer >= 1"),
                       (["model.peft.rank=4"], r"model\.peft\.rank: unknown key"),
                       (["model.peft.alpha=0"], r"model\.peft\.alpha: expected a positive number"),
                       (["model.peft.dropout=1.0"], r"model\.peft\.dropout"),
                       (["model.peft.type=ia3"], r"model\.peft\.type: expected one of 'lora'"),
                       (["model.train_top_layers=1"], r"model\.peft and model\.train_top_layers")]:
        with pytest.raises(ConfigError, match=msg):
            _cfg(str(tmp_path), extra)


def test_unknown_target_module_is_one_line(tmp_path):
    from agcl_ds.models import ModelError, load_model

    cfg = _cfg(str(tmp_path), ["model.peft.target_modules=[q_proj, qkv]"])
    with pytest.raises(ModelError, match=r"model\.peft\.target_modules: 'qkv' is not a Linear module .*known: "
                                         r"down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj\)"):
        load_model(cfg, {"zero_optimization": {"stage": 0}})


def _loop_body(tmp: str, method: str, base: str, ds_name: str = "zero3", precision: str = "fp32") -> dict:
    from agcl_ds.loop import run

    # the random tiny base answers nothing correctly: explain every sample
    prefix = {"agcl": "method.options.", "agcl_replay": "method.options.agcl."}.get(method)
    extra = [f"{prefix}attribution.only_correct=false"] if prefix else []
    extra += ["model.peft.type=osf"] if method == "osf" else []
    cfg = _cfg(tmp, [f"method.name={method}", "training.steps_per_task=6", "checkpoint.keep=1",
                     f"training.precision={precision}", *extra], base)
    ds = resolve_ds_config(load_ds_config(f"ds_configs/{ds_name}.json"), cfg, 2)
    results = run(cfg, ds)
    with open(os.path.join(cfg.run_dir(), "log.jsonl")) as f:
        events = [json.loads(line) for line in f]
    return {"results": results, "events": [e for e in events if e["event"] in ("gate", "importance", "osf")]}


@pytest.mark.slow
@pytest.mark.parametrize("method, ds_name, precision", [
    ("seq", "zero3", "fp32"), ("replay", "zero3", "fp32"), ("ewc", "zero3", "fp32"), ("agcl", "zero3", "fp32"),
    ("agcl_replay", "zero3", "fp32"), ("osf", "zero2", "fp32"),
    ("osf", "zero2", "bf16"),  # peft's projection hook meets bf16 gradients
])
def test_methods_run_on_adapters(tmp_path, base, method, ds_name, precision):
    out = run_ranks(_loop_body, method, base, ds_name, precision, tmp=str(tmp_path))[0]
    res = out["results"]
    assert len(res["matrix"]) == 2 and all(0 <= v <= 1 for row in res["matrix"] for v in row)
    assert res["config"]["model"]["peft"]["r"] == 4
    if method == "osf":
        assert [e["preserved_share"] for e in out["events"] if e["event"] == "osf"] == [0.75]  # 0.5, then 0.75
    if method.startswith("agcl"):
        imp = [e for e in out["events"] if e["event"] == "importance"]
        assert len(imp) == 1 and 0 < imp[0]["mean"] < 1  # the adapters' importance of task 1, top-k binarised
        assert [e["mode"] for e in out["events"] if e["event"] == "gate"] == ["update"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, base) -> str:
    """A finished 2-task LoRA seq run (ZeRO-3, 2 ranks): its run folder."""
    tmp = str(tmp_path_factory.mktemp("lora_run"))
    run_ranks(_loop_body, "seq", base, tmp=tmp)
    return os.path.join(tmp, "seq")


def test_export_adapter_loads_with_plain_peft_and_matches_the_merged_model(lora_run, base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from agcl_ds.cli import main

    main(["export", "--checkpoint", lora_run, "--out", str(tmp_path / "adapter"), "--adapter",
          "--base-out", str(tmp_path / "base")])
    assert {"adapter_config.json", "adapter_model.safetensors", "agcl_export.json"} <= set(
        os.listdir(tmp_path / "adapter"))
    main(["export", "--checkpoint", lora_run, "--out", str(tmp_path / "merged")])
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))
    base_logits = plain(input_ids=ids).logits
    original = AutoModelForCausalLM.from_pretrained(base)  # the base folder the run started from
    torch.testing.assert_close(original(input_ids=ids).logits, base_logits, rtol=0, atol=0)
    adapted = PeftModel.from_pretrained(plain, str(tmp_path / "adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        a, b = adapted(input_ids=ids).logits, merged(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert (a - base_logits).abs().max() > 1e-3  # the adapter changed the model
    assert "lora" not in " ".join(n for n, _ in merged.named_parameters())


def test_export_flags_are_refused_where_they_do_not_apply(lora_run, base, tmp_path, capsys):
    from agcl_ds.cli import main
    from agcl_ds.export import export_checkpoint

    with pytest.raises(SystemExit) as exit_:
        main(["export", "--checkpoint", lora_run, "--out", str(tmp_path / "a"), "--base-out", str(tmp_path / "b")])
    assert exit_.value.code != 0 and "--base-out: only with --adapter" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "a")
    export_checkpoint(lora_run, str(tmp_path / "a"), adapter=True)  # the base is the run's model.path
    with open(tmp_path / "a" / "adapter_config.json") as f:
        assert json.load(f)["base_model_name_or_path"] == os.path.abspath(base)



def _olora_body(tmp: str, base: str, lam: float) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from agcl_ds.loop import run

    cfg = _cfg(tmp, ["method.name=olora", "model.peft.adapter=per_task", f"method.options.lam_orth={lam}",
                     "checkpoint.keep=2", "training.steps_per_task=6"], base)
    ds = resolve_ds_config(load_ds_config("ds_configs/zero3.json"), cfg, 2)
    run(cfg, ds)
    root = os.path.join(cfg.run_dir(), "checkpoints")
    return {tag: {k: v.clone() for k, v in get_fp32_state_dict_from_zero_checkpoint(root, tag=tag).items()}
            for tag in ("t001-s0000000", "t002-s0000000")}


def _overlap(state: dict) -> float:
    """Σ over layers of Σ|A_0 A_1ᵀ|."""
    return sum(float((state[k] @ state[k.replace(".task0.", ".task1.")].t()).abs().sum().detach())
               for k in state if ".lora_A.task0." in k)


@pytest.mark.slow
def test_olora_trains_one_adapter_per_task_and_keeps_them_orthogonal(base):
    free, held = (run_ranks(_olora_body, base, lam)[0] for lam in (0.0, 50.0))
    for out in (free, held):
        one, two = out["t001-s0000000"], out["t002-s0000000"]
        for k in one:
            if ".task0." in k:
                assert torch.equal(one[k], two[k]), k  # task 0's adapter is frozen bit for bit during task 1
        assert any(not torch.equal(one[k], two[k]) for k in one if ".lora_B.task1." in k)
        assert all(not one[k].any() for k in one if ".lora_B.task1." in k)  # untouched during task 0
    # 6 Adam steps of lr 3e-3 move each element of A_1 by at most 0.018 (|A| ~ 0.1): 0.53x measured
    assert _overlap(held["t002-s0000000"]) < 0.75 * _overlap(free["t002-s0000000"])


def test_olora_needs_per_task_adapters(tmp_path):
    from agcl_ds.config import MethodConfig
    from agcl_ds.methods import build_method

    with pytest.raises(ConfigError, match=r"model\.peft\.adapter: method olora trains per-task adapters"):
        _cfg(str(tmp_path), ["method.name=olora"])
    with pytest.raises(ConfigError, match=r"model\.peft\.adapter: .*got 'per_task' with method 'seq'"):
        _cfg(str(tmp_path), ["model.peft.adapter=per_task"])
    plain = load_config("configs/demo_synthetic.yaml", TINY + ["model.pretrain=null", "method.name=olora"])
    with pytest.raises(ConfigError, match="method olora: trains LoRA adapters; set model.peft"):
        build_method(MethodConfig("olora")).check(plain)


def _merge_body(tmp: str, ds_name: str, base: str) -> dict:
    from agcl_ds.adapters import lora_layers, merge_and_restart
    from agcl_ds.data.collate import collate
    from agcl_ds.data.tasks import load_tasks
    from agcl_ds.engine import build_engine, train_task
    from agcl_ds.models import load_model
    from agcl_ds.runlog import RunLog

    cfg = _cfg(tmp, ["model.peft.adapter=per_task_merge", "training.steps_per_task=4"], base)
    ds = resolve_ds_config(load_ds_config(f"ds_configs/{ds_name}.json"), cfg, 2)
    loaded = load_model(cfg, ds)
    engine = build_engine(loaded, ds)
    task = load_tasks(cfg)[0]
    train_task(engine, loaded.tokenizer, task.train, 0, steps=4, lr=cfg.training.lr, cfg=cfg,
               log=RunLog(tmp, cfg), desc="lora")
    batch = collate(loaded.tokenizer, task.test[:4], 16)
    engine.eval()
    with torch.no_grad():
        before_logits = engine(input_ids=batch["input_ids"]).logits.float()
    before = _full_state(engine)
    merge_and_restart(engine.module, cfg.seed, 0)
    with torch.no_grad():
        after_logits = engine(input_ids=batch["input_ids"]).logits.float()
    after = _full_state(engine)
    name = lora_layers(engine.module)[0][0]
    return {"before": before, "after": after, "logits": (before_logits, after_logits), "layer": name}


@pytest.mark.parametrize("ds_name", ["zero3", "zero0"])
def test_per_task_merge_moves_the_adapter_into_the_base_and_restarts_it(base, ds_name):
    out = run_ranks(_merge_body, ds_name, base)[0]
    before, after, layer = out["before"], out["after"], out["layer"]
    a, b, w = (f"{layer}.lora_A.default.weight", f"{layer}.lora_B.default.weight", f"{layer}.base_layer.weight")
    assert before[b].abs().max() > 0 and not after[b].any()  # a fresh adapter: B = 0 ...
    assert not torch.equal(after[a], before[a])  # ... and a new A
    torch.testing.assert_close(after[w], before[w] + 2.0 * before[b] @ before[a])  # alpha / r = 8 / 4
    torch.testing.assert_close(*out["logits"], rtol=1e-4, atol=1e-4)  # the model computes the same function


def _structured_agcl_body(tmp: str, base: str, gate: str) -> dict:
    from agcl_ds.distributed import is_main
    from agcl_ds.importance.store import consolidate
    from agcl_ds.loop import run

    adapter = "per_task_merge" if gate == "rows" else "shared"
    cfg = _cfg(tmp, ["method.name=agcl", f"model.peft.adapter={adapter}", f"method.options.lora_gate={gate}",
                     "training.steps_per_task=6",
                     "method.options.attribution.only_correct=false", "checkpoint.keep=2"], base)
    run(cfg, resolve_ds_config(load_ds_config("ds_configs/zero3.json"), cfg, 2))
    folder = os.path.join(cfg.run_dir(), "checkpoints", "t001-s0000000")
    return consolidate(folder, os.path.join(tmp, "rbar.safetensors")) if is_main() else None


@pytest.mark.slow
def test_agcl_with_merged_adapters_holds_output_rows(base):
    rbar = run_ranks(_structured_agcl_body, base, "rows")[0]
    b_maps = {n: t for n, t in rbar.items() if ".lora_B." in n}
    assert b_maps and all(not t.any() for n, t in rbar.items() if ".lora_A." in n)
    for name, t in b_maps.items():
        rows = t.float()
        assert torch.equal(rows, rows[:, :1].expand_as(rows)), name  # whole rows of B, nothing else
        assert int(rows[:, 0].sum()) == max(1, round(0.2 * rows.shape[0])), name  # top 20% of the rows


@pytest.mark.slow
def test_agcl_components_hold_whole_rank_components(base):
    """lora_gate components: row i of lora_A and column i of lora_B held together, ceil(20% of r) of them."""
    rbar = run_ranks(_structured_agcl_body, base, "components")[0]
    pairs = [(n, n.replace(".lora_B.", ".lora_A.")) for n in rbar if ".lora_B." in n]
    assert pairs
    for b_name, a_name in pairs:
        b, a = rbar[b_name].float(), rbar[a_name].float()  # [out, r], [r, in]
        held = b[0].bool()
        assert torch.equal(b, held.float().expand_as(b)), b_name  # whole columns of B
        assert torch.equal(a, held.float()[:, None].expand_as(a)), a_name  # the same rows of A
        assert int(held.sum()) == math.ceil(0.2 * held.numel()), b_name


def test_lora_gate_needs_the_matching_adapter(tmp_path):
    from agcl_ds.config import MethodConfig
    from agcl_ds.methods import build_method

    for gate, extra, want in [("components", ["model.peft.adapter=per_task_merge"], "adapter shared, got lora/per_"),
                              ("rows", [], "adapter per_task_merge, got lora/shared")]:
        cfg = _cfg(str(tmp_path), ["method.name=agcl", f"method.options.lora_gate={gate}", *extra])
        with pytest.raises(ConfigError, match=f"method.options.lora_gate: {gate} needs .*{want}"):
            build_method(cfg.method).check(cfg)
    plain = load_config("configs/demo_synthetic.yaml", TINY + ["model.pretrain=null", "method.name=agcl"])
    with pytest.raises(ConfigError, match="got no model.peft"):
        build_method(MethodConfig("agcl", {"lora_gate": "components"})).check(plain)


def _gate_body(tmp: str, stage: int, optimizer: str, base: str) -> dict:
    """A LoRA engine built as the loop builds it, gated with R̄ = 1 on every lora_A and 0 on every lora_B."""
    from test_partition import ds_config, local_masters

    from agcl_ds.data.collate import collate
    from agcl_ds.data.tasks import load_tasks
    from agcl_ds.engine import build_engine
    from agcl_ds.gate import attach_gate
    from agcl_ds.importance.partition import local_shards
    from agcl_ds.models import load_model

    cfg = _cfg(tmp, [], base)
    ds = ds_config(stage, optimizer=optimizer, lr=1e-2, wd=0.1 if optimizer == "AdamW" else 0.0)
    ds["train_micro_batch_size_per_gpu"] = 4
    loaded = load_model(cfg, ds)
    engine = build_engine(loaded, ds)
    specs = local_shards(engine)
    gate = attach_gate(engine, {n: torch.full((s.numel,), float(".lora_A." in n)) for n, s in specs.items()})
    before = local_masters(engine)
    examples = load_tasks(cfg)[0].train
    for k in range(3):
        chunk = collate(loaded.tokenizer, examples[4 * k:4 * k + 4], 16)
        batch = {key: v.to(engine.device) for key, v in chunk.items()}
        engine.backward(engine(**batch).loss)
        engine.step()
    after = local_masters(engine)
    moved = {n: not torch.equal(before[n], after[n]) for n in before if before[n].numel()}
    return {"mode": gate.mode, "moved": moved}


@pytest.mark.slow
@pytest.mark.parametrize("stage, optimizer, mode", [(3, "AdamW", "update"), (3, "SGD", "grad"),
                                                    (2, "AdamW", "update"), (0, "SGD", "grad")])
def test_gate_holds_partitioned_adapters_exactly(base, stage, optimizer, mode):
    for r in run_ranks(_gate_body, stage, optimizer, base):
        assert r["mode"] == mode
        held = [n for n in r["moved"] if ".lora_A." in n]
        free = [n for n in r["moved"] if ".lora_B." in n]
        assert held and free
        assert not any(r["moved"][n] for n in held)  # bit-identical, AdamW's weight decay included
        assert all(r["moved"][n] for n in free)


def _osf_body(tmp: str, stage: int, base: str) -> dict:
    """Train with SGD, re-sculpt, train again: returns the function before/after re-sculpting and, per layer,
    how much of the second task's change lies in the directions preserved for it."""
    from test_partition import ds_config

    from agcl_ds.adapters import _full_fp32, osf_layers, osf_rank, osf_resculpt
    from agcl_ds.data.collate import collate
    from agcl_ds.data.tasks import load_tasks
    from agcl_ds.engine import build_engine, train_task
    from agcl_ds.models import load_model
    from agcl_ds.runlog import RunLog

    cfg = _cfg(tmp, ["model.peft.type=osf", "method.name=osf", "training.steps_per_task=3"], base)
    ds = ds_config(stage, optimizer="SGD", lr=0.5)
    ds["train_micro_batch_size_per_gpu"] = cfg.training.micro_batch_size
    loaded = load_model(cfg, ds)
    engine = build_engine(loaded, ds)
    tasks = load_tasks(cfg)

    def effective() -> dict[str, torch.Tensor]:
        import deepspeed

        out = {}
        for name, layer in osf_layers(engine.module):
            p = layer.osf_svd_params["default"]
            u, s, v = (_full_fp32(p[k]) for k in ("U_low", "S_low", "V_low"))
            u0, s0, v0 = (getattr(layer, f"_osf_{k}_low_init")["default"].float().cpu() for k in "USV")
            w = layer.get_base_layer().weight
            with deepspeed.zero.GatheredParameters([w], enabled=hasattr(w, "ds_id")):
                out[name] = w.detach().float().cpu() + (u * s) @ v - (u0 * s0) @ v0
        return out

    log = RunLog(tmp, cfg)
    train_task(engine, loaded.tokenizer, tasks[0].train, 0, steps=3, lr=0.5, cfg=cfg, log=log, desc="osf 1")
    batch = collate(loaded.tokenizer, tasks[0].test[:4], 16)
    engine.eval()
    with torch.no_grad():
        before = engine(input_ids=batch["input_ids"]).logits.float()
    osf_resculpt(engine.module, cfg.model.peft.effective_rank, 1, 2)
    with torch.no_grad():
        after = engine(input_ids=batch["input_ids"]).logits.float()
    engine.train()
    w1 = effective()
    train_task(engine, loaded.tokenizer, tasks[1].train, 1, steps=3, lr=0.5, cfg=cfg, log=log, desc="osf 2")
    w2 = effective()
    leak = {}
    for name, w in w1.items():
        U, S, Vt = torch.linalg.svd(w, full_matrices=False)
        k = osf_rank(S.numel(), cfg.model.peft.effective_rank, 1, 2)
        d = w2[name] - w
        leak[name] = (float((U[:, :k].t() @ d).norm() / d.norm().clamp_min(1e-30)),
                      float((d @ Vt[:k].t()).norm() / d.norm().clamp_min(1e-30)), float(d.norm()))
    return {"logits": (before, after), "leak": leak}


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 0])
def test_osf_updates_stay_orthogonal_to_the_preserved_directions(base, stage):
    out = run_ranks(_osf_body, stage, base)[0]
    torch.testing.assert_close(*out["logits"], rtol=1e-4, atol=1e-4)  # re-sculpting keeps the function
    assert len(out["leak"]) == 2 * 7
    for name, (left, right, norm) in out["leak"].items():
        assert norm > 0, name  # the second task changed every adapted weight ...
        assert left < 1e-3 and right < 1e-3, (name, left, right)  # ... only outside the preserved subspace


PROBE = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])


def _osf_export_body(tmp: str, base: str) -> dict:
    """An osf engine trained, re-sculpted and trained again, checkpointed as the loop does; its probe logits."""
    from agcl_ds import checkpoint
    from agcl_ds.adapters import osf_resculpt
    from agcl_ds.data.tasks import load_tasks
    from agcl_ds.engine import build_engine, train_task
    from agcl_ds.methods import build_method
    from agcl_ds.methods.base import RunContext
    from agcl_ds.models import load_model
    from agcl_ds.runlog import RunLog

    cfg = _cfg(tmp, ["model.peft.type=osf", "method.name=osf"], base)
    ds = resolve_ds_config(load_ds_config("ds_configs/zero2.json"), cfg, 2)
    loaded = load_model(cfg, ds)
    engine = build_engine(loaded, ds)
    tasks, log = load_tasks(cfg), RunLog(tmp, cfg)
    method = build_method(cfg.method)
    method.setup(RunContext(cfg, engine, loaded.tokenizer, tasks, tmp, log, None, ds, None))
    for i in range(2):
        train_task(engine, loaded.tokenizer, tasks[i].train, i, steps=3, lr=cfg.training.lr, cfg=cfg, log=log,
                   desc=f"osf {i}")
        if i == 0:
            osf_resculpt(engine.module, cfg.model.peft.effective_rank, 1, 2)
    engine.eval()
    with torch.no_grad():
        logits = engine(input_ids=PROBE.to(engine.device)).logits.float()
    pos = checkpoint.Position(task=2, step=0, config=cfg.resume_view(), world_size=2, zero_stage=2, method="osf")
    checkpoint.save(os.path.join(tmp, "osf", "checkpoints"), engine, method, pos, keep=1)
    return logits


@pytest.mark.slow
def test_osf_export_is_the_merged_model(base, tmp_path):
    from transformers import AutoModelForCausalLM

    from agcl_ds.export import export_checkpoint

    logits = run_ranks(_osf_export_body, base, tmp=str(tmp_path))[0]
    export_checkpoint(str(tmp_path / "osf"), str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    assert "osf" not in " ".join(n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=PROBE).logits, logits, rtol=1e-4, atol=1e-4)
    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    with torch.no_grad():
        assert (plain(input_ids=PROBE).logits - logits).abs().max() > 1e-3  # both tasks changed the model
