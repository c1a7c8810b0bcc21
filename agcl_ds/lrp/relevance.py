"""Per-sample parameter relevance R_b(W) = W ⊙ ∂̃f_b/∂W, taken in module hooks before anything sums.

A batched backward only yields Σ_b W ⊙ ∂̃f_b/∂W, whose magnitude is far below Σ_b |W ⊙ ∂̃f_b/∂W| (signs
cancel across samples), so the per-sample maps are built from what each module sees: a forward hook saves
its input x, a tensor hook on its output receives the (LRP-modified) output gradient g, and

    Linear   G_b = Σ_t g_btᵀ x_bt           (GPT-2 Conv1D: the transpose)      bias  G_b = Σ_t g_bt
    Embedding G_b[v] = Σ_{t: id_bt = v} g_bt
    Norm      G_b = Σ_t g_bt ⊙ x̂_bt                                            bias  G_b = Σ_t g_bt

and |W ⊙ G_b| goes to a consumer callback, in row blocks of bounded size (the lm_head and embeddings are
B × V × H), inside the backward of the module that uses W last — the moment ZeRO-3 has W gathered. A
parameter used by several modules (tied embedding / lm_head) sums its G_b over uses before the |·|.

Row blocks depend only on the parameter's shape (never on how many samples a rank kept), so every rank of a
data-parallel job cuts a parameter the same way. Embeddings and the output head are row-sparse: a sample
touches only the embedding rows of its own tokens and, explaining a logit, only the head rows of the explained
tokens. Their blocks carry just the rows some kept sample touches (`rows`); every other row of the block is
exactly zero for every kept sample. On a vocabulary of 32k–128k that is well under 1% of the rows.

Run it inside `lrp_rules(model)` for AttnLRP; without rules the maps are plain |W ⊙ ∂f_b/∂W|.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn

from agcl_ds.lrp.rules import Variant, is_rms_norm, lrp_rules, normalized_input

Target = Literal["predicted", "gold", "loss"]
Positions = Literal["all", "first"]
# Rows of a parameter: a contiguous range, or sorted unique row indices
Rows = slice | torch.Tensor
# consumer(name, param, |R| [n_kept, m, *param.shape[1:]], block, rows): the kept samples' relevance in the row
# block `block` (a slice); `rows` None means all m = block rows, else the m row indices (sorted, inside block)
# that carry it, every other row of the block being zero for every kept sample
Consumer = Callable[[str, nn.Parameter, torch.Tensor, slice, torch.Tensor | None], None]
# factors(name, weight, u [n_kept, T, R], v [n_kept, T, C]) -> taken: the per-sample maps of a weight used by one
# Linear / Conv1D are |W ⊙ Σ_t u_btᵀ v_bt|; a consumer that takes the factors gets no blocks for that weight
Factors = Callable[[str, nn.Parameter, torch.Tensor, torch.Tensor], bool]
# a per-sample signed gradient block: rows -> a new Tensor[B, len(rows), *param.shape[1:]]
_Part = Callable[[Rows], torch.Tensor]

DEFAULT_CHUNK_ELEMS = 1 << 23  # per kept sample in one block: 32 MiB of fp32, 256 MiB for 8 samples


def answer_mask(labels: torch.Tensor) -> torch.Tensor:
    """[B, T-1] bool: logits[:, t] predicts an answer token (labels[:, t+1] != -100)."""
    return labels[:, 1:] != -100


def answered_correctly(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B] bool: greedy argmax equals the label at every answer position (and there is at least one)."""
    pos = answer_mask(labels)
    hit = logits[:, :-1].argmax(-1) == labels[:, 1:]
    return (hit | ~pos).all(1) & pos.any(1)


def explained_logit(logits: torch.Tensor, labels: torch.Tensor, target: Target = "predicted",
                    positions: Positions = "all") -> torch.Tensor:
    """[B] the explained output f_b at the answer positions (summed, or the first): the predicted or gold
    next-token logit, or (`loss`, the loss-based ablation) the gold token's log-probability, i.e. minus
    the sample's cross-entropy, whose gradient also flows through every other logit via the softmax."""
    if target not in ("predicted", "gold", "loss"):
        raise ValueError(f"target must be 'predicted', 'gold' or 'loss', got {target!r}")
    if positions not in ("all", "first"):
        raise ValueError(f"positions must be 'all' or 'first', got {positions!r}")
    pos = answer_mask(labels)
    if positions == "first":
        pos = pos & (pos.cumsum(1) == 1)
    lg = logits[:, :-1]
    tok = lg.argmax(-1) if target == "predicted" else labels[:, 1:].clamp_min(0)
    if target == "loss":
        lg = torch.log_softmax(lg.float(), dim=-1)
    val = lg.gather(-1, tok.unsqueeze(-1)).squeeze(-1).float()
    return (val * pos).sum(1)


def _is_conv1d(m: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): a Linear with weight stored [in, out]."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and hasattr(m, "nx")


def _kind(m: nn.Module) -> str | None:
    if isinstance(m, nn.Linear):
        return "linear"
    if _is_conv1d(m):
        return "conv1d"
    if isinstance(m, nn.Embedding):
        return "embedding"
    if is_rms_norm(m) or isinstance(m, nn.LayerNorm):
        return "norm"
    return None


@dataclass
class _Pending:
    param: nn.Parameter
    uses: int = 0
    parts: list[_Part] = field(default_factory=list)
    touched: list[torch.Tensor | None] = field(default_factory=list)  # per part: its nonzero rows, None = any


def _union(touched: list[torch.Tensor | None]) -> torch.Tensor | None:
    """Rows any part touches (sorted), or None when some part may touch every row."""
    if not touched or any(t is None for t in touched):
        return None
    return torch.cat(touched).unique(sorted=True)


class PerSampleRelevance:
    """Hooks that hand per-sample |W ⊙ ∂̃f_b/∂W| of every parameter to `consumer`, one micro-batch at a time.

    Use as a context manager; inside, `run(batch)` does one forward/backward. Parameters are frozen
    (requires_grad False) meanwhile so that autograd skips its own summed weight gradients; the flags are
    restored on exit. `model` names the parameters (pass `engine.module` for a DeepSpeed engine).
    `max_chunk_elems` bounds one block per kept sample: blocks hold at most n_kept × that many values.
    `factors`, if given, is offered the factors of every weight used by one (not row-sparse) Linear or Conv1D
    first; a router that sends data-parallel ranks their share of the maps may find them cheaper to send.
    """

    def __init__(self, model: nn.Module, consumer: Consumer, max_chunk_elems: int = DEFAULT_CHUNK_ELEMS,
                 wanted: Collection[str] | None = None, factors: Factors | None = None):
        if max_chunk_elems < 1:
            raise ValueError(f"max_chunk_elems must be >= 1, got {max_chunk_elems}")
        self.model, self.consumer, self.max_chunk_elems, self.factors = model, consumer, max_chunk_elems, factors
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.modules = [(m, k) for m in model.modules() if (k := _kind(m)) is not None]
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        # modules whose weight rows only the sample's own ids touch: embeddings, and the head explaining a logit
        self.row_sparse = {id(m) for m, k in self.modules if k == "embedding" or (m is head and k == "linear")}
        # modules whose parameters nobody wants (frozen blocks) pass relevance through untouched
        self.skip = set() if wanted is None else {
            id(m) for m, _ in self.modules if not any(self.names[id(p)] in wanted for p in m.parameters(recurse=False))}
        covered = {id(p) for m, _ in self.modules for p in m.parameters(recurse=False)}
        missing = [n for n, p in model.named_parameters() if id(p) not in covered]
        if missing:
            raise ValueError(f"no per-sample relevance rule for {len(missing)} parameter(s), e.g. "
                             f"{', '.join(missing[:3])}; covered: Linear, Conv1D, Embedding, RMSNorm, "
                             "LayerNorm")
        self.keep = torch.ones(0, dtype=torch.bool)
        self._batch = 0
        self._state: dict[int, _Pending] = {}
        self._leaves: list[torch.Tensor] = []
        self._handles: list = []
        self._requires_grad: dict[nn.Parameter, bool] = {}

    def __enter__(self) -> PerSampleRelevance:
        if any(getattr(m, "gradient_checkpointing", False) and m.training for m in self.model.modules()):
            raise ValueError("per-sample relevance hooks need gradient checkpointing off "
                             "(or the model in eval mode)")
        self._requires_grad = {p: p.requires_grad for p in self.model.parameters()}
        for p in self._requires_grad:
            p.requires_grad_(False)
        for m, kind in self.modules:
            self._handles.append(m.register_forward_hook(self._forward_hook(kind), prepend=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        for p, flag in self._requires_grad.items():
            p.requires_grad_(flag)
        self._handles, self._requires_grad, self._state, self._leaves = [], {}, {}, []

    def run(self, batch: Mapping[str, torch.Tensor], target: Target = "predicted",
            positions: Positions = "all", only_correct: bool = True,
            forward: Callable[..., object] | None = None,
            on_keep: Callable[[torch.Tensor, int], None] | None = None) -> torch.Tensor:
        """One forward/backward on `batch`; returns the [B] bool mask of samples whose maps were emitted.
        `on_keep(keep, tokens)` runs between the two, when the kept samples are known and nothing has been
        emitted (tokens: the batch's sequence length).

        The backward always runs (with f = 0 if no sample is kept) so that every rank of a ZeRO-3 job
        takes part in the same gathers.
        """
        if not self._handles:
            raise RuntimeError("PerSampleRelevance.run needs the hooks installed: use it inside `with`")
        self._state, self._leaves = {}, []
        labels = batch["labels"]
        self._batch = labels.shape[0]
        out = (forward or self.model)(input_ids=batch["input_ids"],
                                      attention_mask=batch.get("attention_mask"))
        logits = out.logits if hasattr(out, "logits") else out[0]
        if only_correct:
            keep = answered_correctly(logits.detach(), labels)
        else:
            keep = torch.ones_like(labels[:, 0], dtype=torch.bool)
        self.keep = keep
        if on_keep is not None:
            on_keep(keep, labels.shape[1])
        f = (explained_logit(logits, labels, target, positions) * keep).sum()
        if not self._leaves:
            raise RuntimeError("no embedding output was seen in the forward; cannot backpropagate")
        torch.autograd.grad(f, self._leaves, allow_unused=True)
        # a use that no gradient reached (none in the supported families; reads W outside its module,
        # so single-process only): emit what arrived, so that every parameter is reported once per pass
        for pid in [pid for pid, s in self._state.items() if s.uses > 0]:
            self._emit(pid)
        self._state, self._leaves = {}, []
        return keep

    # ------------------------------------------------------------------ hooks
    def _forward_hook(self, kind: str):
        def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            if not torch.is_grad_enabled():
                return None
            saved, ret = args[0].detach(), None
            if kind == "embedding":
                if not out.requires_grad:
                    out.requires_grad_()  # params are frozen: the graph starts at the embedding outputs
                    self._leaves.append(out)
                if out.shape[0] == 1 < self._batch:  # GPT-2 wpe: one row broadcast over the batch
                    out = ret = out.expand(self._batch, *out.shape[1:])
                    saved = saved.expand(self._batch, *saved.shape[1:])
            if not out.requires_grad or id(mod) in self.skip:
                return ret
            for p in mod.parameters(recurse=False):
                self._state.setdefault(id(p), _Pending(p)).uses += 1
            out.register_hook(lambda g: self._backward(mod, kind, saved, g))
            return ret

        return hook

    def _backward(self, mod: nn.Module, kind: str, x: torch.Tensor, g: torch.Tensor) -> None:
        x, g = x[self.keep], g[self.keep]
        touched = self._touched(mod, kind, x, g) if id(mod) in self.row_sparse else None
        g = g.to(torch.promote_types(g.dtype, torch.float32))
        for p, part in self._parts(mod, kind, x, g, offer=touched is None):
            s = self._state[id(p)]
            s.parts.append(part)
            s.touched.append(touched)
            s.uses -= 1
            if s.uses == 0:
                self._emit(id(p))

    def _offer_factors(self, mod: nn.Module, kind: str, x: torch.Tensor, g: torch.Tensor) -> bool:
        """Whether `factors` took the weight of this Linear / Conv1D (x, g: [n, T, ·]); if so it is done with."""
        w, state = mod.weight, self._state[id(mod.weight)]
        if self.factors is None or state.uses != 1 or state.parts:  # a shared weight sums its G_b: maps
            return False
        if not self.factors(self.names[id(w)], w, *((g, x) if kind == "linear" else (x, g))):
            return False
        del self._state[id(w)]
        return True

    @staticmethod
    def _touched(mod: nn.Module, kind: str, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Rows of a row-sparse module's weight (and bias) that these samples' G_b can make nonzero."""
        reached = g != 0
        if kind == "embedding":  # ids at the positions some gradient reaches (not the padding, not past the answer)
            ids = x[reached.any(-1)]
            if mod.padding_idx is not None:
                ids = ids[ids != mod.padding_idx]
            return ids.unique(sorted=True)
        return reached.reshape(-1, g.shape[-1]).any(0).nonzero().flatten()  # output units some gradient reaches

    def _parts(self, mod: nn.Module, kind: str, x: torch.Tensor, g: torch.Tensor,
               offer: bool) -> list[tuple[nn.Parameter, _Part]]:
        """(param, part) for each of the module's parameters still to emit; `offer`: a Linear / Conv1D weight
        goes to `factors` first (not for a row-sparse module, whose blocks carry only touched rows)."""
        if kind == "embedding":
            pad = mod.padding_idx
            return [(mod.weight, lambda rows: _embedding_block(x, g, rows, pad))]
        if kind == "norm":
            gw = _tokens(g * normalized_input(mod, x).to(g.dtype)).sum(1)
            out = [(mod.weight, lambda rows: gw[:, rows].clone())] if mod.weight is not None else []
            if getattr(mod, "bias", None) is not None:
                gb = _tokens(g).sum(1)
                out.append((mod.bias, lambda rows: gb[:, rows].clone()))
            return out
        g, x = _tokens(g), _tokens(x).to(g.dtype)
        factored = offer and self._offer_factors(mod, kind, x, g)
        if factored and mod.bias is None:
            return []
        live = (g != 0).any(-1).any(0)  # positions no sample's gradient reaches (e.g. after the answer)
        if not bool(live.all()):
            g, x = g[:, live], x[:, live]
        if factored:
            out = []
        elif kind == "linear":
            out = [(mod.weight, lambda rows: torch.einsum("bto,bti->boi", g[..., rows], x))]
        else:  # conv1d, weight [in, out]
            out = [(mod.weight, lambda rows: torch.einsum("bti,bto->bio", x[..., rows], g))]
        if mod.bias is not None:
            out.append((mod.bias, lambda rows: g[..., rows].sum(1)))
        return out

    def _emit(self, pid: int) -> None:
        s = self._state.pop(pid)
        p = s.param
        w = p.detach()
        n = int(self.keep.sum())
        step = max(1, self.max_chunk_elems // max(1, math.prod(w.shape[1:])))  # the same on every rank
        dt = torch.promote_types(w.dtype, torch.float32)
        touched = _union(s.touched)
        for r0 in range(0, w.shape[0], step):
            block = slice(r0, min(w.shape[0], r0 + step))
            rows = None if touched is None else touched[int(torch.searchsorted(touched, block.start)):
                                                        int(torch.searchsorted(touched, block.stop))]
            sel = block if rows is None else rows
            if s.parts:  # each part is a new tensor: summed and scaled in place (no block-sized temporaries)
                grad = s.parts[0](sel).to(dt)
                for part in s.parts[1:]:
                    grad.add_(part(sel))
            else:
                grad = w.new_zeros((n, block.stop - block.start, *w.shape[1:]), dtype=dt)
            self.consumer(self.names[pid], p, grad.mul_(w[sel].to(dt)).abs_(), block, rows)


def _tokens(t: torch.Tensor) -> torch.Tensor:
    """[B, ..., C] -> [B, N, C] (explicit sizes: B may be 0 when no sample is kept)."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:-1]), t.shape[-1])


def _embedding_block(ids: torch.Tensor, g: torch.Tensor, rows: Rows, pad: int | None) -> torch.Tensor:
    """Per-sample gradient of the embedding rows `rows`: Σ over the sample's tokens with that id."""
    if isinstance(rows, slice):
        m, at = rows.stop - rows.start, ids - rows.start
        sel = (at >= 0) & (at < m)
    else:
        m, at = rows.numel(), torch.searchsorted(rows, ids)
        sel = rows[at.clamp(max=max(m - 1, 0))] == ids if m else torch.zeros_like(ids, dtype=torch.bool)
    if pad is not None:
        sel &= ids != pad  # nn.Embedding never updates padding_idx
    bi, ti = sel.nonzero(as_tuple=True)
    b, h = g.shape[0], g.shape[-1]
    out = g.new_zeros(b * m, h)
    out.index_add_(0, bi * m + at[bi, ti], g[bi, ti])
    return out.view(b, m, h)


def relevance_maps(model: nn.Module, batch: Mapping[str, torch.Tensor], variant: Variant = "attnlrp",
                   target: Target = "predicted", positions: Positions = "all", only_correct: bool = True,
                   reduce: Literal["none", "sum"] = "none",
                   max_chunk_elems: int = DEFAULT_CHUNK_ELEMS,
                   ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Single-process convenience: {name: |R| [n_kept, *shape] (or summed over samples)}, kept-mask [B].

    Not for ZeRO-3 (the full maps of every parameter are held at once); use PerSampleRelevance there.
    """
    if reduce not in ("none", "sum"):
        raise ValueError(f"reduce must be 'none' or 'sum', got {reduce!r}")
    maps: dict[str, torch.Tensor] = {}

    def collect(name: str, p: nn.Parameter, r: torch.Tensor, block: slice, rows: torch.Tensor | None) -> None:
        if name not in maps:
            shape = p.shape if reduce == "sum" else (r.shape[0], *p.shape)
            maps[name] = r.new_zeros(shape)
        dst = maps[name] if reduce == "sum" else maps[name].transpose(0, 1)
        dst[block if rows is None else rows] += r.sum(0) if reduce == "sum" else r.transpose(0, 1)

    with lrp_rules(model, variant), PerSampleRelevance(model, collect, max_chunk_elems) as hooks:
        keep = hooks.run(batch, target, positions, only_correct)
    return maps, keep
