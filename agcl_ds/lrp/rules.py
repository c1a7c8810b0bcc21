"""AttnLRP (Achtibat et al. 2024, arXiv 2402.05602) as modified gradients, on one model instance.

Inside `with lrp_rules(model):` an ordinary backward pass of an explained scalar f yields LRP-modified
gradients ∂̃f, so the relevance of an activation is `a ⊙ ∂̃f/∂a` and of a parameter `W ⊙ ∂̃f/∂W`.
Forward values are unchanged; only gradients are rerouted:

- Linear / Conv1D / embeddings / LoRA A, B: plain gradient (ε-rule with ε = 0), no hook.
- softmax: AttnLRP's softmax rule equals gradient × input, so eager, sdpa and flash attention all work.
- q·kᵀ and A·v: uniform rule on both bilinear products. The gradient reaching q and k is ÷4 (½ from
  A·v, ½ from q·kᵀ), v is ÷2. It is applied at the last module output before RoPE: q_proj/k_proj, or
  q_norm/k_norm where present (Qwen3) so that those norms' weights see the divided gradient.
- element-wise activations: identity rule (∂̃ = f(x)/x); gated MLP product act(gate)·up: uniform rule (÷2).
  GPT-2's MLP is not gated: identity rule on its GELU in both variants.
- RMSNorm / LayerNorm: identity rule, i.e. the normalising factor is detached.
- dropout: off (the model is put in eval mode; every module's training flag is restored on exit).

CP-LRP (Ali et al. 2022): attention weights and the MLP gate are treated as constants (q, k and the
gate get zero gradient; v and up get the full gradient). It is exactly conservative on a bias-free model.

Everything is per instance (module hooks, and an instance-level `forward` for norms) and undone on exit,
so the same model trains exactly as before. Under DeepSpeed ZeRO-3 no parameter is read outside its own
module's forward/backward: the hooks touch activations only, and the norm forward reads its weight inside
the module's own forward.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn

Variant = Literal["attnlrp", "cplrp"]
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gpt2")


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by a factor (scalar or broadcastable tensor)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float | torch.Tensor) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g * ctx.factor, None


class _RatioGrad(torch.autograd.Function):
    """Forward returns the precomputed y; backward sends g·ratio to x (identity rule: ratio = f(x)/x)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(ratio)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (ratio,) = ctx.saved_tensors
        return g * ratio, None, None


def scale_grad(x: torch.Tensor, factor: float | torch.Tensor) -> torch.Tensor:
    return _ScaleGrad.apply(x, factor)


def identity_rule(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y = f(x) element-wise, with gradient g·f(x)/x so that x ⊙ ∂̃ = y ⊙ g (relevance passes unchanged).

    No additive stabiliser (it would bias small |x| by eps/|x|); where x == 0 the ratio is set to 0, which
    leaves that element's relevance (x ⊙ ∂̃ = 0) exact.
    """
    xd, yd = x.detach(), y.detach()
    zero = xd == 0
    return _RatioGrad.apply(x, yd, torch.where(zero, 0.0, yd) / torch.where(zero, 1.0, xd))


def is_rms_norm(m: nn.Module) -> bool:
    """Llama-style RMSNorm (Llama, Mistral, Qwen2, Qwen3): y = weight ⊙ x / rms(x)."""
    return type(m).__name__.endswith("RMSNorm") and hasattr(m, "variance_epsilon") and hasattr(m, "weight")


def normalized_input(m: nn.Module, x: torch.Tensor, detach_scale: bool = False) -> torch.Tensor:
    """x̂ of a supported norm (before weight and bias), computed as transformers does.

    Shared by the identity-rule forward and by the per-sample norm-weight relevance (G = Σ_t g ⊙ x̂).
    """
    if is_rms_norm(m):
        h = x.to(torch.float32)
        r = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + m.variance_epsilon)
        return (h * (r.detach() if detach_scale else r)).to(x.dtype)
    if isinstance(m, nn.LayerNorm):
        dims = tuple(range(-len(m.normalized_shape), 0))
        c = x - x.mean(dims, keepdim=True)
        s = torch.sqrt(c.pow(2).mean(dims, keepdim=True) + m.eps)
        return c / (s.detach() if detach_scale else s)
    raise TypeError(f"not a supported norm: {type(m).__name__}")


def _identity_norm_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = normalized_input(self, x, detach_scale=True)
    if self.weight is not None:
        y = self.weight * y
    if getattr(self, "bias", None) is not None:
        y = y + self.bias
    return y


def hf_config(model: nn.Module):
    """The transformers config of `model` (plain, peft-wrapped or DeepSpeed-wrapped), or None."""
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "model_type"):
            return cfg
    return None


def check_supported(model: nn.Module) -> str:
    """Return the model_type, or raise a one-line ValueError naming the supported families."""
    cfg = hf_config(model)
    kind = getattr(cfg, "model_type", None)
    if kind not in SUPPORTED:
        raise ValueError(f"LRP rules do not cover model_type {kind!r} ({type(model).__name__}); "
                         f"supported: {', '.join(SUPPORTED)}")
    return kind


@dataclass
class RuleHandle:
    """What `attach_rules` changed, so that `remove` restores it exactly."""

    hooks: list = field(default_factory=list)
    forwards: dict = field(default_factory=dict)  # module -> its previous instance-level forward (or None)
    training: dict = field(default_factory=dict)  # module -> training flag before

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        for m, prev in self.forwards.items():
            if prev is None:
                del m.forward
            else:
                m.forward = prev
        for m, flag in self.training.items():
            m.training = flag
        self.hooks, self.forwards, self.training = [], {}, {}


def _grad_hook(factor: float | torch.Tensor):
    return lambda mod, inp, out: scale_grad(out, factor)


def attach_rules(model: nn.Module, variant: Variant = "attnlrp") -> RuleHandle:
    """Attach the rules to this instance; return a handle whose `remove()` undoes everything."""
    if variant not in ("attnlrp", "cplrp"):
        raise ValueError(f"unknown LRP variant {variant!r}; expected 'attnlrp' or 'cplrp'")
    kind = check_supported(model)
    cp = variant == "cplrp"
    qk, v, gate, prod = (0.0, 1.0, 0.0, 1.0) if cp else (0.25, 0.5, 1.0, 0.5)
    h = RuleHandle()
    try:
        h.training = {m: m.training for m in model.modules()}
        model.eval()
        for m in model.modules():
            if is_rms_norm(m) or isinstance(m, nn.LayerNorm):
                h.forwards[m] = m.__dict__.get("forward")
                m.forward = types.MethodType(_identity_norm_forward, m)
        if kind == "gpt2":
            _attach_gpt2(model, h, qk, v)
        else:
            _attach_llama_like(model, h, qk, v, gate, prod)
    except BaseException:
        h.remove()
        raise
    return h


def _attach_llama_like(model: nn.Module, h: RuleHandle, qk: float, v: float, gate: float,
                       prod: float) -> None:
    for m in model.modules():
        if all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj")):
            for src, f in ((getattr(m, "q_norm", m.q_proj), qk), (getattr(m, "k_norm", m.k_proj), qk),
                           (m.v_proj, v)):
                h.hooks.append(src.register_forward_hook(_grad_hook(f)))
        elif all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            h.hooks.append(m.act_fn.register_forward_hook(_activation_hook(gate)))
            if prod != 1.0:
                h.hooks.append(m.down_proj.register_forward_pre_hook(
                    lambda mod, args: (scale_grad(args[0], prod), *args[1:])))


def _attach_gpt2(model: nn.Module, h: RuleHandle, qk: float, v: float) -> None:
    for m in model.modules():
        if hasattr(m, "c_attn") and hasattr(m, "split_size"):
            if getattr(m, "is_cross_attention", False):
                raise ValueError("LRP rules do not cover GPT-2 cross-attention")

            def qkv(mod, inp, out):  # fused [q | k | v] along the last dim
                e = out.shape[-1] // 3
                f = torch.cat([out.new_full((2 * e,), qk), out.new_full((e,), v)])
                return scale_grad(out, f)

            h.hooks.append(m.c_attn.register_forward_hook(qkv))
        elif hasattr(m, "c_fc") and hasattr(m, "act"):
            h.hooks.append(m.act.register_forward_hook(_activation_hook(1.0)))  # not gated: identity


def _activation_hook(factor: float):
    """Identity rule on the activation; factor 0 (CP-LRP gate) makes the activation a constant."""
    if factor == 0.0:
        return lambda mod, inp, out: scale_grad(out, 0.0)
    return lambda mod, inp, out: identity_rule(inp[0], out)


@contextlib.contextmanager
def lrp_rules(model: nn.Module, variant: Variant = "attnlrp") -> Iterator[RuleHandle]:
    """Context manager: LRP-modified gradients inside, the untouched model (training flags too) after."""
    h = attach_rules(model, variant)
    try:
        yield h
    finally:
        h.remove()
