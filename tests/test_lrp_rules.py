"""AttnLRP / CP-LRP rules vs an independent float64 re-derivation, on PARAMETER relevance.

The reference below re-implements each family's forward from the weights with plain torch ops and writes
every rule with detach tricks (x·c + x.detach()·(1 − c) for a gradient factor c; x·(f(x)/x).detach() for
the identity rule; a detached normaliser), a different mechanism from the package's autograd Functions
and hooks. Both explain the same logit; W ⊙ ∂̃f/∂W must agree for every parameter.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
import transformers as T

from agcl_ds.lrp.rules import SUPPORTED, lrp_rules

V, H, L = 61, 32, 2
SMALL = dict(vocab_size=V, hidden_size=H, intermediate_size=48, num_hidden_layers=L,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
FACTORS = {"attnlrp": dict(qk=0.25, v=0.5, gate=1.0, prod=0.5),
           "cplrp": dict(qk=0.0, v=1.0, gate=0.0, prod=1.0)}


def build(family: str, attn: str = "eager", **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "gpt2":
        cfg = T.GPT2Config(vocab_size=V, n_embd=H, n_layer=L, n_head=4, n_positions=64, bos_token_id=0,
                           eos_token_id=0, **extra)
        model = T.GPT2LMHeadModel(cfg)
    else:
        cfg_cls, model_cls = {"llama": (T.LlamaConfig, T.LlamaForCausalLM),
                              "mistral": (T.MistralConfig, T.MistralForCausalLM),
                              "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM),
                              "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM)}[family]
        kw = dict(SMALL, head_dim=8) if family == "qwen3" else dict(SMALL)
        model = model_cls(cfg_cls(**kw, **extra))
    model.config._attn_implementation = attn
    with torch.no_grad():  # non-trivial norm weights and biases, so that their relevance is tested
        for n, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.rand_like(p) + 0.5 if ("norm" in n or "ln_" in n) and n.endswith("weight")
                        else 0.1 * torch.randn_like(p))
    return model.double().eval()


# ----------------------------------------------------------------------------- reference (float64)
def _grad_scale(x: torch.Tensor, c: float) -> torch.Tensor:
    return x * c + x.detach() * (1.0 - c)


def _identity(x: torch.Tensor, fx: torch.Tensor) -> torch.Tensor:
    return x * (fx / x).detach()


def _rms(x, w, eps):  # transformers computes RMSNorm in fp32 even in a float64 model: so do we
    h = x.float()
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps).detach()).to(x.dtype)


def _ln(x, w, b, eps):
    c = x - x.mean(-1, keepdim=True)
    return c / torch.sqrt(c.pow(2).mean(-1, keepdim=True) + eps).detach() * w + b


def _attend(q, k, v, scale, c, eager):
    """q [h,T,d], k/v [h,T,d] (already head-expanded); causal softmax attention with the uniform rules.

    transformers' Llama-family eager attention takes the softmax in fp32 even in a float64 model: so do we.
    """
    q, k, v = _grad_scale(q, c["qk"]), _grad_scale(k, c["qk"]), _grad_scale(v, c["v"])
    t = q.shape[1]
    s = q @ k.transpose(-1, -2) * scale + torch.full((t, t), float("-inf"), dtype=q.dtype).triu(1)
    return (s.float() if eager else s).softmax(-1).to(q.dtype) @ v


def _rope(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def ref_llama(model, W: dict, ids: torch.Tensor, c: dict) -> torch.Tensor:
    cfg = model.config
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // nh
    eps, t = cfg.rms_norm_eps, ids.shape[0]
    x = W["model.embed_tokens.weight"][ids]
    cos, sin = model.model.rotary_emb(x[None], torch.arange(t)[None])  # parameter-free, no rule
    cos, sin = cos[0].double(), sin[0].double()

    def lin(name, h):
        b = W.get(f"{name}.bias")
        return h @ W[f"{name}.weight"].T + (0 if b is None else b)

    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        h = _rms(x, W[p + "input_layernorm.weight"], eps)
        q = lin(p + "self_attn.q_proj", h).view(t, nh, hd)
        k = lin(p + "self_attn.k_proj", h).view(t, nkv, hd)
        v = lin(p + "self_attn.v_proj", h).view(t, nkv, hd)
        if p + "self_attn.q_norm.weight" in W:  # Qwen3: per-head RMSNorm before RoPE
            q = _rms(q, W[p + "self_attn.q_norm.weight"], eps)
            k = _rms(k, W[p + "self_attn.k_norm.weight"], eps)
        q, k = _rope(q.transpose(0, 1), cos, sin), _rope(k.transpose(0, 1), cos, sin)
        rep = nh // nkv
        k, v = k.repeat_interleave(rep, 0), v.transpose(0, 1).repeat_interleave(rep, 0)  # GQA
        a = _attend(q, k, v, hd ** -0.5, c, cfg._attn_implementation == "eager")
        x = x + lin(p + "self_attn.o_proj", a.transpose(0, 1).reshape(t, nh * hd))
        h = _rms(x, W[p + "post_attention_layernorm.weight"], eps)
        g = lin(p + "mlp.gate_proj", h)
        act = _grad_scale(_identity(g, F.silu(g)), c["gate"])
        x = x + lin(p + "mlp.down_proj", _grad_scale(act * lin(p + "mlp.up_proj", h), c["prod"]))
    x = _rms(x, W["model.norm.weight"], eps)
    head = W.get("lm_head.weight", W["model.embed_tokens.weight"])
    return x @ head.T


def ref_gpt2(model, W: dict, ids: torch.Tensor, c: dict) -> torch.Tensor:
    cfg = model.config
    nh, t, eps = cfg.n_head, ids.shape[0], cfg.layer_norm_epsilon
    hd = cfg.n_embd // nh
    x = W["transformer.wte.weight"][ids] + W["transformer.wpe.weight"][:t]

    def conv(name, h):
        return h @ W[f"{name}.weight"] + W[f"{name}.bias"]

    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        h = _ln(x, W[p + "ln_1.weight"], W[p + "ln_1.bias"], eps)
        q, k, v = conv(p + "attn.c_attn", h).split(cfg.n_embd, -1)
        a = _attend(*(z.view(t, nh, hd).transpose(0, 1) for z in (q, k, v)), hd ** -0.5, c,
                    eager=False)  # GPT-2's eager softmax keeps the model dtype
        x = x + conv(p + "attn.c_proj", a.transpose(0, 1).reshape(t, cfg.n_embd))
        h = conv(p + "mlp.c_fc", _ln(x, W[p + "ln_2.weight"], W[p + "ln_2.bias"], eps))
        x = x + conv(p + "mlp.c_proj", _identity(h, F.gelu(h, approximate="tanh")))
    x = _ln(x, W["transformer.ln_f.weight"], W["transformer.ln_f.bias"], eps)
    return x @ W["transformer.wte.weight"].T


def explained(logits: torch.Tensor) -> torch.Tensor:
    """the predicted next-token logit at the last two positions (a 2-token 'answer')"""
    lg = logits[-3:-1]
    return lg.gather(-1, lg.argmax(-1, keepdim=True)).sum()


def param_relevance_ref(model, ids, variant) -> dict[str, torch.Tensor]:
    W = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    fn = ref_gpt2 if model.config.model_type == "gpt2" else ref_llama
    f = explained(fn(model, W, ids, FACTORS[variant]))
    grads = torch.autograd.grad(f, list(W.values()), allow_unused=True)
    return {n: (w.detach() * (torch.zeros_like(w) if g is None else g))
            for (n, w), g in zip(W.items(), grads, strict=True)}


def param_relevance_rules(model, ids, variant) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with lrp_rules(model, variant):
        explained(model(input_ids=ids[None]).logits[0]).backward()
    return {n: p.detach() * (torch.zeros_like(p) if p.grad is None else p.grad)
            for n, p in model.named_parameters()}


def max_rel_err(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(((a[n] - b[n]).abs().max() / b[n].abs().max().clamp_min(1e-300)).item() for n in a)


CASES = [("llama", "eager"), ("llama", "sdpa"), ("mistral", "eager"), ("qwen2", "sdpa"), ("qwen3", "eager"),
         ("qwen3", "sdpa"), ("gpt2", "eager"), ("gpt2", "sdpa")]


@pytest.mark.parametrize("variant", ["attnlrp", "cplrp"])
@pytest.mark.parametrize("family,attn", CASES)
def test_parameter_relevance_matches_reference(family, attn, variant):
    model = build(family, attn)
    ids = torch.randint(0, V, (9,), generator=torch.Generator().manual_seed(1))
    got, ref = param_relevance_rules(model, ids, variant), param_relevance_ref(model, ids, variant)
    assert max_rel_err(got, ref) < 1e-10
    if family == "qwen3":  # the q_norm/k_norm weights get the ÷4 (AttnLRP) or nothing (CP-LRP)
        qn = got["model.layers.0.self_attn.q_norm.weight"]
        assert (qn.abs().max() > 0) == (variant == "attnlrp")


def _input_relevance(model, ids, variant):
    emb = model.get_input_embeddings()(ids[None]).detach().requires_grad_()
    with lrp_rules(model, variant):
        f = explained(model(inputs_embeds=emb).logits[0])
        f.backward()
    return (emb * emb.grad).sum().item(), f.item()


def test_cplrp_conserves_on_bias_free_llama():
    model = build("llama")
    assert not any(n.endswith(".bias") for n, _ in model.named_parameters())
    ids = torch.randint(0, V, (12,), generator=torch.Generator().manual_seed(2))
    r_in, f = _input_relevance(model, ids, "cplrp")
    assert abs(r_in - f) <= 1e-4 * abs(f)
    r_in, f = _input_relevance(model, ids, "attnlrp")  # not conservative (softmax), but the same sign/scale
    assert 0.3 < r_in / f < 1.5


def _hooks_left(model) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or "forward" in m.__dict__
               for m in model.modules())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_model_trains_identically_after_rules(family):
    extra = dict(attention_dropout=0.2) if family == "llama" else dict(attn_pdrop=0.2, resid_pdrop=0.2,
                                                                       embd_pdrop=0.2)
    model = build(family, "eager", **extra).float().train()
    twin = copy.deepcopy(model)
    ids = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(3))
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    with lrp_rules(model):
        assert not model.training
        explained(model(input_ids=ids).logits[0]).backward()
    assert model.training and all(m.training for m in model.modules()) and not _hooks_left(model)
    model.zero_grad(set_to_none=True)

    def step(m):
        torch.manual_seed(7)
        loss = m(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in m.named_parameters()}

    (la, ga), (lb, gb) = step(model), step(twin)
    assert torch.equal(la, lb)
    assert all(torch.equal(ga[n], gb[n]) for n in ga)
    torch.manual_seed(7)
    assert not torch.equal(model(**batch).loss, model.eval()(**batch).loss)  # dropout is really on again


def test_eval_mode_and_instance_forward_are_restored():
    model = build("qwen3")
    norm = model.model.norm
    own = norm.forward  # a pre-existing instance-level forward (as accelerate hooks install) survives
    norm.forward = own
    with lrp_rules(model, "cplrp"):
        assert norm.forward is not own
    assert norm.__dict__["forward"] is own and not model.training


def test_unsupported_architecture_is_refused_in_one_line():
    cfg = T.OPTConfig(vocab_size=V, hidden_size=H, num_hidden_layers=1, ffn_dim=48, num_attention_heads=4,
                      word_embed_proj_dim=H)
    model = T.OPTForCausalLM(cfg)
    with pytest.raises(ValueError) as e:
        with lrp_rules(model):
            pass
    msg = str(e.value)
    assert "\n" not in msg and all(k in msg for k in SUPPORTED) and "'opt'" in msg
    assert not _hooks_left(model)
    with pytest.raises(ValueError, match="variant"):
        lrp_rules(build("llama"), "lrp-eps").__enter__()


def test_bf16_forward_unchanged_and_finite():
    model = build("llama", "sdpa").to(torch.bfloat16)
    ids = torch.randint(0, V, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        base = model(input_ids=ids).logits
    with lrp_rules(model):
        out = model(input_ids=ids).logits
        explained(out[0]).backward()
    assert torch.equal(out.detach(), base)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert math.isfinite(model.lm_head.weight.grad.abs().sum().item())
