"""The AGFT gate: while training task t, scale every update by s = clamp(1 - alpha * R̄, 0, 1).

R̄ is the element-wise max of earlier tasks' importance (in [0, 1]). The gate attaches to any DeepSpeed
engine (ZeRO 0/1/2/3, fp32 or bf16; our loop or a Hugging Face Trainer's) and never reads `p.grad` /
`p.data` of partitioned params: it works on this rank's flat layout (`agcl_ds.importance.partition`).

Two placements:

- ``grad`` (the paper's literal form, Eq. 13): at the accumulation boundary, after backward and before
  the optimizer step, multiply this rank's reduced gradient partition by s (one pass over the flat
  buffer under ZeRO-3, the per-param fragments under ZeRO-1/2, `.grad` under ZeRO-0). It hooks
  `engine._take_model_step` on the instance: DeepSpeed calls it only at the boundary, and it runs before
  any gradient norm is taken (ZeRO-0 clips in the engine before `optimizer.step`, ZeRO-1/2/3 inside
  their `step`), so clipping sees the gated gradients. Not available with `offload_optimizer`: there
  DeepSpeed accumulates the norm during backward.
- ``update`` (survives Adam): each master element ends at ``p = lerp(p_new, p_old, 1 - s)``, where
  p_new is what the optimizer would have written. lerp is exact at both ends, so s = 0 leaves an element
  bit-identical (decoupled weight decay included) and s = 1 equals the ungated optimizer. Nothing is
  stored in the optimizer state, so checkpoints need only the R̄ store. Two implementations
  (``update_impl``), bit-identical to each other:

  - ``fused`` (torch ``Adam``/``AdamW``, the inner optimizer of ``"torch_adam": true`` configs): a step
    pre-hook runs AdamW's own element-wise arithmetic (torch's single-tensor order of operations) chunk
    by chunk, writing p_new into a chunk buffer and blending it straight into the master, then hides
    those gradients so the stock ``step`` skips the tensors it has already updated (a post-hook puts them
    back). One pass over the partition; no snapshot.
  - ``snapshot`` (any torch optimizer, DeepSpeed-built or client): a pre-hook copies each master tensor
    the inner ``step`` is about to update, a post-hook blends. Cost: a copy of what one inner ``step``
    call updates (4 bytes per element of one ZeRO-3 sub-group, or of the rank's ZeRO-1/2 partition;
    bound it with ``sub_group_size``), into one buffer sized to the largest such call. ``keep_snapshot``
    (default: on for masters in host memory) keeps that buffer between steps: on CPU a freshly allocated
    100 MB block costs more in page faults than the copy itself (measured in benchmarks/RESULTS.md),
    while GPU caching allocators reuse the block anyway.

  ``auto`` (the default) takes ``fused`` where every inner optimizer is a torch Adam/AdamW it can
  reproduce (no amsgrad, maximize, capturable, differentiable or fused kernel; decoupled or no weight
  decay; float lr and betas), ``snapshot`` otherwise (e.g. DeepSpeed's FusedAdam/CPUAdam kernels).

``auto`` picks ``grad`` for torch SGD without weight decay (its update is linear in the gradient, so
gating the gradient is exact and costs no extra memory) and ``update`` for everything else: Adam-family
optimizers divide by sqrt(v), which cancels a per-coordinate gradient factor (m -> c·m, sqrt(v) -> c·sqrt(v)),
and weight decay is applied outside the gradient, so a gradient gate would protect nothing.

R̄ is held once per rank in bf16 in the flat layout (2 bytes per parameter over all ranks); passing
`ImportanceStore.rbar` shares the store's buffer instead of copying it. The working gate s is
materialised in fp32 chunks of `chunk` elements during the step only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import torch

from agcl_ds.importance.partition import FlatLayout, flat_layout, grad_segments, inner_optimizers

GATE_MODES = ("grad", "update", "auto")
UPDATE_IMPLS = ("auto", "fused", "snapshot")


class Gate:
    """Attach the gate to `engine`; it stays inactive until `set_importance` gets a non-zero R̄."""

    def __init__(self, engine, gate_on: str = "auto", alpha: float = 1.0, chunk: int = 1 << 22,
                 keep_snapshot: bool | None = None, update_impl: str = "auto"):
        if gate_on not in GATE_MODES:
            raise ValueError(f"gate_on must be one of {GATE_MODES}, got {gate_on!r}")
        if update_impl not in UPDATE_IMPLS:
            raise ValueError(f"update_impl must be one of {UPDATE_IMPLS}, got {update_impl!r}")
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
        if chunk < 1:
            raise ValueError(f"chunk must be a positive number of elements, got {chunk!r}")
        if getattr(engine, "_agcl_gate", None) is not None:
            raise ValueError("this engine already has a Gate attached; call its detach() first")
        self.engine = engine
        self.layout: FlatLayout = flat_layout(engine)
        self.alpha = float(alpha)
        self.chunk = int(chunk)
        self.keep_snapshot = self.layout.device.type == "cpu" if keep_snapshot is None else bool(keep_snapshot)
        self._pool: dict[torch.dtype, torch.Tensor] = {}  # the snapshot buffer, kept when keep_snapshot
        self._inner = inner_optimizers(engine)
        self.mode = _resolve_mode(gate_on, self._inner)
        self._rbar: torch.Tensor | None = None
        self._wbuf: torch.Tensor | None = None
        self.elapsed_s = 0.0  # wall time spent gating so far (for overhead reports)
        self._snap: dict[int, torch.Tensor] = {}
        self._hidden: list[tuple[torch.Tensor, torch.Tensor]] = []  # (master, grad) the fused step took
        self._abuf: torch.Tensor | None = None  # the fused step's p_new and denominator, 2 chunks
        self._handles: list = []
        self._master_offset = {id(m): off for m, off in zip(self.layout.masters, self.layout.master_offsets,
                                                             strict=True)}
        self.update_impl = None if self.mode == "grad" else _resolve_impl(update_impl, self._inner)
        if self.mode == "grad":
            if engine.zero_cpu_offload():
                raise ValueError("gate_on='grad' does not support offload_optimizer (DeepSpeed takes the "
                                 "gradient norm during backward there); use gate_on='update'")
            if not hasattr(type(engine), "_take_model_step"):
                raise RuntimeError("this DeepSpeed version has no DeepSpeedEngine._take_model_step, which "
                                   "gate_on='grad' hooks; use gate_on='update'")
            self._original_take_model_step = engine._take_model_step

            def gated_take_model_step(*args, **kwargs):
                self._gate_grads()
                return self._original_take_model_step(*args, **kwargs)

            self._wrapper = gated_take_model_step
            engine._take_model_step = gated_take_model_step
        else:
            pre, post = (self._fused_step, self._unhide) if self.update_impl == "fused" else (self._snapshot,
                                                                                              self._blend)
            for opt in self._inner:
                self._handles.append(opt.register_step_pre_hook(pre))
                self._handles.append(opt.register_step_post_hook(post))
        engine._agcl_gate = self

    # ------------------------------------------------------------------ importance
    def set_importance(self, rbar: dict[str, torch.Tensor] | None) -> None:
        """Set R̄ from this rank's local shards (one per `local_shards(engine)` name, values in [0, 1]).

        None, or an all-zero R̄, switches gating off. Call again whenever R̄ changes.
        """
        if rbar is None:
            self._rbar = None
            return
        specs = self.layout.specs
        extra = sorted(set(rbar) - set(specs))
        missing = sorted(set(specs) - set(rbar))
        if extra or missing:
            what = f"unknown name {extra[0]!r}" if extra else f"missing {missing[0]!r}"
            raise ValueError(f"set_importance: expected one local shard per trained parameter, {what}")
        for name, t in rbar.items():
            if t.numel() != specs[name].numel:
                raise ValueError(f"set_importance: {name} has {t.numel()} elements, its local shard has "
                                 f"{specs[name].numel}")
            if t.numel() and not (bool(t.min() >= 0) and bool(t.max() <= 1)):
                raise ValueError(f"set_importance: {name} must hold values in [0, 1] (R̄ is a max of "
                                 "normalised importances)")
        flat = self._shared_flat(rbar)
        if flat is None:
            flat = torch.zeros(self.layout.numel, dtype=torch.bfloat16, device=self.layout.device)
            for name, t in rbar.items():
                spec = specs[name]
                flat.narrow(0, spec.flat_offset, spec.numel).copy_(t.reshape(-1))
        self._rbar = flat if bool(flat.any()) else None

    def _shared_flat(self, rbar: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The bf16 flat buffer `rbar` already lives in (e.g. the store's), or None if it is not one."""
        specs = self.layout.specs
        items = [(n, t) for n, t in rbar.items() if t.numel()]
        if not items:
            return None
        storage = items[0][1].untyped_storage()
        for name, t in items:
            if (t.dtype != torch.bfloat16 or t.device != self.layout.device or not t.is_contiguous()
                    or t.untyped_storage().data_ptr() != storage.data_ptr()
                    or t.storage_offset() != specs[name].flat_offset):
                return None
        if storage.nbytes() < 2 * self.layout.numel:
            return None
        return torch.empty(0, dtype=torch.bfloat16, device=self.layout.device).set_(storage, 0,
                                                                                    (self.layout.numel,))

    @property
    def active(self) -> bool:
        return self._rbar is not None

    # ------------------------------------------------------------------ the gate itself
    def _weights(self, offset: int, numel: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(start, length, 1 - s = clamp(alpha * R̄, 0, 1) in fp32) per chunk of a flat segment.

        The fp32 chunk is one reused buffer (at most `chunk` elements): allocating it per chunk costs
        page faults on CPU and allocator traffic on GPU.
        """
        size = min(self.chunk, self.layout.numel)
        if self._wbuf is None or self._wbuf.numel() < size:
            self._wbuf = torch.empty(size, dtype=torch.float32, device=self._rbar.device)
        for a in range(0, numel, self.chunk):
            k = min(self.chunk, numel - a)
            w = self._wbuf[:k]
            w.copy_(self._rbar.narrow(0, offset + a, k))
            if self.alpha != 1.0:
                w.mul_(self.alpha).clamp_(max=1.0)
            yield a, k, w

    @torch.no_grad()
    def _gate_grads(self) -> None:
        if self._rbar is None:
            return
        t0 = time.perf_counter()
        for grad, offset in grad_segments(self.engine, self.layout):
            for a, k, w in self._weights(offset, grad.numel()):
                grad.narrow(0, a, k).mul_(w.neg_().add_(1.0))
        self.elapsed_s += time.perf_counter() - t0

    @torch.no_grad()
    def _snapshot(self, opt, args, kwargs) -> None:
        if self._rbar is None:
            return
        t0 = time.perf_counter()
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for group in opt.param_groups:
            for t in group["params"]:
                if t.grad is not None and id(t) in self._master_offset:
                    by_dtype.setdefault(t.dtype, []).append(t)
        for dtype, stepped in by_dtype.items():
            pool, off = self._snapshot_buffer(dtype, sum(t.numel() for t in stepped)), 0
            for t in stepped:
                self._snap[id(t)] = pool.narrow(0, off, t.numel()).copy_(t.detach().reshape(-1))
                off += t.numel()
        self.elapsed_s += time.perf_counter() - t0

    def _snapshot_buffer(self, dtype: torch.dtype, numel: int) -> torch.Tensor:
        """At least `numel` elements for this step's copies: the kept buffer when it is large enough."""
        pool = self._pool.get(dtype)
        if pool is None or pool.numel() < numel:
            pool = torch.empty(numel, dtype=dtype, device=self.layout.device)
            if self.keep_snapshot:
                self._pool[dtype] = pool
        return pool

    @torch.no_grad()
    def _blend(self, opt, args, kwargs) -> None:
        if not self._snap:
            return
        t0 = time.perf_counter()
        for group in opt.param_groups:
            for t in group["params"]:
                old = self._snap.pop(id(t), None)
                if old is None:
                    continue
                new, old = t.detach().view(-1), old.view(-1)
                for a, k, w in self._weights(self._master_offset[id(t)], new.numel()):
                    new.narrow(0, a, k).lerp_(old.narrow(0, a, k), w)
        self.elapsed_s += time.perf_counter() - t0

    @torch.no_grad()
    def _fused_step(self, opt, args, kwargs) -> None:
        """Gated Adam/AdamW on every master this step updates; their grads are hidden from the stock step."""
        if self._rbar is None:
            return
        t0 = time.perf_counter()
        for group in opt.param_groups:
            for t in group["params"]:
                if t.grad is None or id(t) not in self._master_offset:
                    continue
                self._gated_adam(opt.state[t], group, t)
                self._hidden.append((t, t.grad))
                t.grad = None
        self.elapsed_s += time.perf_counter() - t0

    def _unhide(self, opt, args, kwargs) -> None:
        for t, grad in self._hidden:
            t.grad = grad
        self._hidden.clear()

    def _gated_adam(self, state: dict, group: dict, t: torch.Tensor) -> None:
        """torch's single-tensor Adam/AdamW (non-capturable) for one master, p_new blended per chunk.

        Same operations in the same order as `torch.optim.adam._single_tensor_adam`, so p_new, exp_avg,
        exp_avg_sq and step match the stock optimizer bit for bit; only where p_new lands differs.
        """
        if t.dtype != torch.float32 or not t.is_contiguous() or t.grad.is_sparse:
            raise RuntimeError(f"update_impl='fused' needs contiguous fp32 masters with dense gradients, got "
                               f"{t.dtype} {tuple(t.shape)}; use update_impl='snapshot'")
        if not state:  # lazy init exactly as torch's _init_group does it
            state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
            state["exp_avg"] = torch.zeros_like(t, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(t, memory_format=torch.preserve_format)
        state["step"] += 1
        step = state["step"].item()
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        step_size = lr / (1 - beta1 ** step)
        bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
        p, g = t.detach().view(-1), t.grad.view(-1)
        m, v = state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1)
        size = min(self.chunk, self.layout.numel)
        if self._abuf is None or self._abuf.numel() < 2 * size or self._abuf.device != p.device:
            self._abuf = torch.empty(2 * size, dtype=torch.float32, device=p.device)
        for a, k, w in self._weights(self._master_offset[id(t)], p.numel()):
            pc, gc, mc, vc = p.narrow(0, a, k), g.narrow(0, a, k), m.narrow(0, a, k), v.narrow(0, a, k)
            new, denom = self._abuf[:k], self._abuf[size:size + k]
            if wd != 0:
                torch.mul(pc, 1 - lr * wd, out=new)
            else:
                new.copy_(pc)
            mc.lerp_(gc, 1 - beta1)
            vc.mul_(beta2).addcmul_(gc, gc, value=1 - beta2)
            torch.sqrt(vc, out=denom).div_(bias_correction2_sqrt).add_(eps)
            new.addcdiv_(mc, denom, value=-step_size)
            torch.lerp(new, pc, w, out=pc)

    def detach(self) -> None:
        """Put the engine back to ungated training."""
        if self.engine.__dict__.get("_agcl_gate") is not self:
            return
        if self.mode == "grad":
            if self.engine.__dict__.get("_take_model_step") is not self._wrapper:
                raise RuntimeError("engine._take_model_step was re-wrapped after the gate was attached; "
                                   "detach that wrapper first")
            del self.engine._take_model_step
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._snap.clear()
        self._pool.clear()
        self._rbar = self._wbuf = self._abuf = None
        self.engine._agcl_gate = None


def _resolve_mode(gate_on: str, inner: list[torch.optim.Optimizer]) -> str:
    if gate_on != "auto":
        return gate_on
    linear = all(isinstance(o, torch.optim.SGD) and all(g.get("weight_decay", 0) == 0 for g in o.param_groups)
                 for o in inner)
    return "grad" if linear else "update"


def fused_unsupported(opt: torch.optim.Optimizer) -> str | None:
    """Why `opt`'s update cannot be gated by the fused path, or None when it can."""
    if type(opt) not in (torch.optim.Adam, torch.optim.AdamW):
        return f"{type(opt).__module__}.{type(opt).__name__} is not torch.optim.Adam/AdamW"
    for group in opt.param_groups:
        for flag in ("amsgrad", "maximize", "capturable", "differentiable", "fused"):
            if group.get(flag):
                return f"a param group has {flag}=True"
        if group["weight_decay"] != 0 and not group.get("decoupled_weight_decay", False):
            return "Adam with L2 (non-decoupled) weight decay"
        if any(torch.is_tensor(x) for x in (group["lr"], *group["betas"])):
            return "a tensor lr or betas"
    return None


def _resolve_impl(update_impl: str, inner: list[torch.optim.Optimizer]) -> str:
    reasons = [r for r in map(fused_unsupported, inner) if r is not None]
    if update_impl == "fused" and reasons:
        raise ValueError(f"update_impl='fused' gates torch Adam/AdamW only: {reasons[0]}; use 'snapshot'")
    if update_impl == "auto":
        return "snapshot" if reasons else "fused"
    return update_impl


def _scalar_dtype() -> torch.dtype:
    """The dtype torch's Adam gives its `step` counter (float64 only under a float64 default)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def attach_gate(engine, rbar: dict[str, torch.Tensor] | None, gate_on: str = "auto",
                alpha: float = 1.0, update_impl: str = "auto") -> Gate:
    """Attach a gate to `engine` and set R̄ in one call."""
    gate = Gate(engine, gate_on=gate_on, alpha=alpha, update_impl=update_impl)
    gate.set_importance(rbar)
    return gate
