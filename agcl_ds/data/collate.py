"""Tokenise prompt → answer pairs, mask the prompt out of the loss, pad into batches.

Batch contract (shared by training, evaluation and attribution): `input_ids [B,T]`,
`attention_mask [B,T]`, `labels [B,T]` with -100 on prompt and padding and the answer tokens plus
EOS elsewhere; right padding; labels aligned with input_ids (the model shifts), so the logit that
predicts token t is `logits[:, t-1]`.
"""

from __future__ import annotations

from typing import Protocol

import torch

from agcl_ds.data.types import DataError, Example

IGNORE = -100


class Tokenizer(Protocol):
    eos_id: int
    pad_id: int
    vocab_size: int

    def encode(self, text: str, prompt: bool) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes shifted by three specials: 0 pad, 1 bos, 2 eos. Needs no files, handles any text."""

    pad_id, bos_id, eos_id = 0, 1, 2
    vocab_size = 259

    def encode(self, text: str, prompt: bool) -> list[int]:
        ids = [b + 3 for b in text.encode("utf-8")]
        return [self.bos_id, *ids] if prompt else ids

    def decode(self, ids: list[int]) -> str:
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer behind the same three-field interface."""

    def __init__(self, tok) -> None:
        self.tok = tok
        if tok.eos_token_id is None:
            raise DataError("tokenizer: no eos_token_id; the answer needs an end-of-sequence token")
        self.eos_id = tok.eos_token_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.vocab_size = len(tok)

    def encode(self, text: str, prompt: bool) -> list[int]:
        return self.tok(text, add_special_tokens=prompt)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


def encode(tok: Tokenizer, prompt: str, answer: str, max_len: int) -> tuple[list[int], list[int]]:
    """Token ids and labels for one example; the prompt is cut from the left so the answer fits."""
    p = tok.encode(prompt, prompt=True)
    a = tok.encode(answer, prompt=False) + [tok.eos_id]
    if len(a) >= max_len:
        raise DataError(f"data.max_seq_len: an answer of {len(a)} tokens does not fit "
                        f"max_seq_len={max_len} ({answer[:40]!r})")
    p = p[-(max_len - len(a)):]
    return p + a, [IGNORE] * len(p) + a


def pad(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate(tok: Tokenizer, examples: list[Example], max_len: int) -> dict[str, torch.Tensor]:
    return pad([encode(tok, e.prompt, e.answer, max_len) for e in examples], tok.pad_id)
