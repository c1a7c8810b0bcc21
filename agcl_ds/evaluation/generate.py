"""Batched greedy decoding on a (possibly ZeRO-3-partitioned) model, all ranks in lock-step.

Prompts are left-padded so every row's next token sits in the last column; decoding stops at EOS or
after `max_new_tokens`. Under ZeRO-3 every forward is a collective (the layers are gathered on the
fly), so Hugging Face's `generate(..., synced_gpus=True)` keeps a rank that has finished its batch
stepping until all have, and every rank makes the same number of `generate` calls: one with less
work pads with a dummy prompt whose output it drops.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from agcl_ds.data.collate import Tokenizer
from agcl_ds.distributed import device, world_size


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


def _agreed_batches(n_batches: int) -> int:
    if dist.is_initialized() and world_size() > 1:
        t = torch.tensor([n_batches], device=device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())
    return n_batches


class Generator:
    """Greedy answers for prompts; `tokens` and `seconds` add up what it decoded (throughput)."""

    def __init__(self, module, tok: Tokenizer, batch_size: int) -> None:
        self.module, self.tok, self.batch_size = module, tok, batch_size
        self.tokens = 0
        self.seconds = 0.0

    @torch.no_grad()
    def answers(self, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
        """One decoded answer per prompt (token ids), EOS and what follows it cut off. Collective."""
        n_batches = _agreed_batches(-(-len(prompts) // self.batch_size))
        synced = dist.is_initialized() and world_size() > 1
        was_training = self.module.training
        self.module.eval()
        out: list[str] = []
        t0 = time.perf_counter()
        for b in range(n_batches):
            chunk = prompts[b * self.batch_size:(b + 1) * self.batch_size]
            ids, mask = left_pad(chunk or [[self.tok.eos_id]], self.tok.pad_id)
            gen = self.module.generate(input_ids=ids.to(device()), attention_mask=mask.to(device()),
                                       max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                       eos_token_id=self.tok.eos_id, pad_token_id=self.tok.pad_id,
                                       use_cache=True, synced_gpus=synced)
            new = gen[:, ids.shape[1]:].tolist()
            for row in new[:len(chunk)]:
                if self.tok.eos_id in row:
                    row = row[:row.index(self.tok.eos_id)]
                self.tokens += len(row)
                out.append(self.tok.decode(row))
        self.seconds += time.perf_counter() - t0
        self.module.train(was_training)
        return out
