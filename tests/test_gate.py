"""The gate against real reference runs: an ungated engine with the same init and data, on 2 ranks.

R̄ is a fixed pattern with a third of the elements each at 0, 0.5 and 1, so every check below looks at
protected (s = 0), half-gated (s = 0.5) and free (s = 1) elements of every parameter.
"""

from __future__ import annotations

import pytest
import torch
from _dist import run_ranks
from test_partition import build_engine, full_fp32, micro_step, pattern

from agcl_ds.gate import Gate, attach_gate
from agcl_ds.importance.partition import local_shards, shard_of
from agcl_ds.importance.store import ImportanceStore


def _rbar_full(engine) -> dict[str, torch.Tensor]:
    return {n: pattern(s) for n, s in local_shards(engine).items()}


def _local(full: dict[str, torch.Tensor], engine) -> dict[str, torch.Tensor]:
    return {n: shard_of(full[n], s) for n, s in local_shards(engine).items()}


def _run(engine, steps: range, gas: int) -> None:
    for k in steps:
        for j in range(gas):
            micro_step(engine, k * gas + j)


def _cat(d: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([d[n].float().reshape(-1) for n in sorted(d)])


def _sgd_body(tmp: str, configs: list[tuple[int, str, int, float]]) -> list[dict]:
    """Per config: an ungated run and a gated run (SGD, auto -> grad gate), same init and data."""
    lr, out = 0.1, []
    for stage, dtype, gas, clip in configs:
        ref = build_engine(stage, dtype, lr=lr, gas=gas)
        p0 = full_fp32(ref)
        _run(ref, range(1), gas)
        d_ref = _cat(full_fp32(ref)) - _cat(p0)
        eng = build_engine(stage, dtype, lr=lr, gas=gas, clip=clip)
        rbar = _rbar_full(eng)
        gate = attach_gate(eng, _local(rbar, eng))
        _run(eng, range(1), gas)
        p1 = _cat(full_fp32(eng))
        d = p1 - _cat(p0)
        r = _cat(rbar)
        s = 1 - r
        # the optimizer's gradient g = -d_ref / lr; DeepSpeed clips by clip / (||s*g|| + 1e-6) if that is < 1
        coef = min(1.0, clip / ((s * d_ref / lr).norm().item() + 1e-6)) if clip else 1.0
        coef_ungated_norm = min(1.0, clip / ((d_ref / lr).norm().item() + 1e-6)) if clip else 1.0
        expected = coef * s * d_ref
        _run(eng, range(1, 3), gas)
        p3 = _cat(full_fp32(eng))
        out.append({
            "config": (stage, dtype, gas, clip), "mode": gate.mode,
            "protected_unchanged": torch.equal(p3[r == 1], _cat(p0)[r == 1]),
            "free_equal_ungated": torch.equal(d[r == 0], d_ref[r == 0]) if coef == 1.0 else None,
            "update_err": ((d - expected).abs().max() / d_ref.abs().max()).item(),
            "half_ratio": ((d[r == 0.5] * d_ref[r == 0.5]).sum() / (d_ref[r == 0.5] ** 2).sum()).item(),
            "coef": coef, "coef_if_ungated_norm": coef_ungated_norm,
            "moved": (d_ref != 0).float().mean().item(),
        })
    return out


@pytest.mark.slow
def test_grad_gate_sgd_zero3_zero2_accumulation_and_clipping():
    configs = [(3, "fp32", 1, 0.0), (2, "bf16", 2, 0.0), (3, "bf16", 2, 0.5), (2, "fp32", 1, 0.5),
               (0, "fp32", 1, 0.5), (1, "bf16", 1, 0.0)]
    for res in run_ranks(_sgd_body, configs):
        for r in res:
            assert r["mode"] == "grad", r
            assert r["moved"] > 0.5, r  # the reference run really moved the params
            assert r["protected_unchanged"], r
            assert r["update_err"] < 1e-3, r  # update = -lr * clip_coef(gated norm) * s * g, element-wise
            if r["config"][3]:  # clipping saw the gated norm, which differs from the ungated one
                assert r["coef"] < 1 and abs(r["coef"] / r["coef_if_ungated_norm"] - 1) > 0.2, r
                assert abs(r["half_ratio"] - 0.5 * r["coef"]) < 1e-3 * r["coef"], r
            else:
                assert r["free_equal_ungated"], r  # s = 1: bit-identical to the ungated run
                assert abs(r["half_ratio"] - 0.5) < 1e-4, r  # s = 0.5: half the update


def _adamw_body(tmp: str, configs: list[tuple[int, str, bool]]) -> list[dict]:
    """Per config: ungated AdamW, update-gated and grad-gated AdamW (weight decay 0.1), same init and data.

    With optimizer offload the grad gate must refuse to attach; its error message is returned instead.
    """
    out = []
    for stage, dtype, offload in configs:
        kw = dict(optimizer="AdamW", lr=1e-2, wd=0.1, offload=offload)
        ref = build_engine(stage, dtype, **kw)
        p0 = _cat(full_fp32(ref))
        _run(ref, range(1), 1)
        d_ref = _cat(full_fp32(ref)) - p0
        res = {"config": (stage, dtype, offload)}
        for mode in ("update", "grad"):
            eng = build_engine(stage, dtype, **kw)
            rbar = _rbar_full(eng)
            if offload and mode == "grad":
                try:
                    Gate(eng, gate_on="grad")
                except ValueError as e:
                    res[mode] = str(e)
                continue
            gate = Gate(eng, gate_on="auto" if mode == "update" else "grad")
            gate.set_importance(_local(rbar, eng))
            r = _cat(rbar)
            _run(eng, range(1), 1)
            d = _cat(full_fp32(eng)) - p0
            _run(eng, range(1, 3), 1)
            p3 = _cat(full_fp32(eng))
            h = r == 0.5
            res[mode] = {
                "mode": gate.mode,
                "protected_unchanged": torch.equal(p3[r == 1], p0[r == 1]),
                "free_equal_ungated": torch.equal(d[r == 0], d_ref[r == 0]),
                "half_ratio": ((d[h] * d_ref[h]).sum() / (d_ref[h] ** 2).sum()).item(),
            }
        out.append(res)
    return out


@pytest.mark.slow
def test_update_gate_vs_grad_gate_adamw():
    configs = [(3, "fp32", False), (2, "bf16", False), (1, "fp32", False), (0, "bf16", False),
               (3, "fp32", True)]
    for res in run_ranks(_adamw_body, configs):
        for r in res:
            upd, grd = r["update"], r["grad"]
            assert upd["mode"] == "update", r  # auto under AdamW
            # update gate: protected bit-identical through AdamW + weight decay, free == ungated, half == 0.5
            assert upd["protected_unchanged"] and upd["free_equal_ungated"], r
            assert abs(upd["half_ratio"] - 0.5) < 1e-3, r
            if r["config"][2]:
                assert "does not support offload_optimizer" in grd, r
                continue
            # grad gate under Adam: the half-gated update is (nearly) the ungated one, protected ones move
            assert abs(grd["half_ratio"] - 1.0) < 0.05, r
            assert not grd["protected_unchanged"], r


def _impl_body(tmp: str, configs: list[tuple[int, str, int, bool]]) -> list[dict]:
    """Per config: the update gate's fused and snapshot paths on the same init, R̄ and data (AdamW, wd 0.1)."""
    out = []
    for stage, dtype, gas, offload in configs:
        res, kw = {"config": (stage, dtype, gas, offload)}, dict(optimizer="AdamW", lr=1e-2, wd=0.1, gas=gas,
                                                               offload=offload)
        for impl in ("snapshot", "fused"):
            eng = build_engine(stage, dtype, **kw)
            p0 = _cat(full_fp32(eng))
            rbar = _rbar_full(eng)
            gate = Gate(eng, gate_on="update", update_impl=impl, chunk=1000)  # several chunks per tensor
            gate.set_importance(_local(rbar, eng))
            _run(eng, range(3), gas)
            r = _cat(rbar)
            res[impl] = {"impl": gate.update_impl, "params": _cat(full_fp32(eng)), "p0": p0, "r": r}
        out.append(res)
    return out


@pytest.mark.slow
def test_fused_update_gate_is_bit_identical_to_snapshot():
    """The fused AdamW path (auto under torch AdamW) equals the snapshot path bit for bit, s in {0, 0.5, 1}."""
    configs = [(3, "fp32", 1, False), (3, "bf16", 2, False), (2, "fp32", 2, False), (1, "bf16", 1, False),
               (0, "fp32", 1, False), (0, "bf16", 1, False), (3, "fp32", 1, True)]
    for res in run_ranks(_impl_body, configs):
        for r in res:
            snap, fused = r["snapshot"], r["fused"]
            assert (snap["impl"], fused["impl"]) == ("snapshot", "fused"), r["config"]
            r_, p0 = fused["r"], fused["p0"]
            for level in (0.0, 0.5, 1.0):
                sel = r_ == level
                assert sel.any()
                assert torch.equal(fused["params"][sel], snap["params"][sel]), (r["config"], level)
            assert torch.equal(fused["params"][r_ == 1], p0[r_ == 1]), r["config"]  # protected: untouched
            assert not torch.equal(fused["params"][r_ == 0], p0[r_ == 0]), r["config"]  # free: trained


def _ckpt_body(tmp: str, stage: int, dtype: str) -> dict:
    kw = dict(optimizer="AdamW", lr=1e-2, wd=0.1, gas=2)
    ckpt = f"{tmp}/ckpt"
    eng = build_engine(stage, dtype, **kw)
    store = ImportanceStore.for_engine(eng, meta={"rules": "test"})
    store.add_task("t0", _local(_rbar_full(eng), eng))
    gate = Gate(eng, gate_on="update", keep_snapshot=False)  # the resumed run keeps it (CPU default)
    gate.set_importance(store.rbar)
    shared = gate._rbar is not None and gate._rbar.data_ptr() == store._rbar.data_ptr()
    _run(eng, range(2), 2)
    eng.save_checkpoint(ckpt, tag="t")
    store.save(ckpt)
    _run(eng, range(2, 4), 2)
    uninterrupted = full_fp32(eng)

    fresh = build_engine(stage, dtype, seed=99, **kw)  # different init: the checkpoint must restore it
    fresh.load_checkpoint(ckpt, tag="t")
    loaded = ImportanceStore.load(ckpt, local_shards(fresh))
    attach_gate(fresh, loaded.rbar, gate_on="update")
    _run(fresh, range(2, 4), 2)
    resumed = full_fp32(fresh)
    return {"shared": shared, "tasks": loaded.tasks, "meta": loaded.meta,
            "bit_equal": all(torch.equal(uninterrupted[n], resumed[n]) for n in uninterrupted),
            "rbar_equal": all(torch.equal(store.rbar[n], loaded.rbar[n]) for n in store.rbar)}


@pytest.mark.slow
def test_gate_survives_checkpoint_round_trip():
    for r in run_ranks(_ckpt_body, 3, "bf16"):
        assert r["shared"], "the gate should share the store's R̄ buffer (2 bytes/param in total)"
        assert r["tasks"] == ["t0"] and r["meta"] == {"rules": "test"}
        assert r["rbar_equal"] and r["bit_equal"], r


def _errors_body(tmp: str) -> list[str]:
    eng = build_engine(2)
    msgs = []
    gate = Gate(eng, gate_on="grad")
    for bad in (lambda: Gate(eng), lambda: Gate(eng, gate_on="x"), lambda: Gate(eng, update_impl="x")):
        try:
            bad()
        except ValueError as e:
            msgs.append(str(e))
    specs = local_shards(eng)
    name = next(n for n, s in specs.items() if s.numel)
    wrong = {n: torch.zeros(s.numel) for n, s in specs.items()}
    wrong[name] = torch.full((specs[name].numel,), 2.0)
    for bad in (wrong, {name: wrong[name]}):
        try:
            gate.set_importance(bad)
        except ValueError as e:
            msgs.append(str(e))
    gate.detach()
    msgs.append("detached" if "_take_model_step" not in eng.__dict__ and Gate(eng).mode == "grad" else "")
    eng._agcl_gate.detach()
    try:  # SGD has no fused gated step
        Gate(eng, gate_on="update", update_impl="fused")
    except ValueError as e:
        msgs.append(str(e))
    msgs.append(Gate(eng, gate_on="update").update_impl)
    return msgs


@pytest.mark.slow
def test_gate_rejects_bad_input():
    msgs = run_ranks(_errors_body)[0]
    assert "already has a Gate" in msgs[0]
    assert "gate_on must be one of" in msgs[1]
    assert "update_impl must be one of" in msgs[2]
    assert "values in [0, 1]" in msgs[3]
    assert "missing" in msgs[4]
    assert msgs[5] == "detached"
    assert "gates torch Adam/AdamW only" in msgs[6] and "SGD is not torch.optim.Adam/AdamW" in msgs[6]
    assert msgs[7] == "snapshot"  # auto falls back for other optimizers
