"""Sharded evaluation: one row of the score matrix, each task scored by its own metric.

Each rank scores its slice of every test set and the score sums are added over ranks. Under
ZeRO-3 every forward pass is a collective (layers are gathered on the fly), so all ranks run the
same number of batches; a rank that has run out of rows scores a dummy batch and drops it.

Scoring (`evaluation.mode`, `evaluation.decode`):
- `generate`: the greedy answer, scored by the task's metric (`metrics.py`). Where the metric is
  `accuracy` and `decode: auto` (the default), it is computed in one teacher-forced pass: greedy
  decoding reproduces the gold answer (and its EOS) exactly when the argmax at every gold position
  equals the gold token, since until the first mismatch the greedy prefix *is* the gold prefix.
  Every other metric, and every task under `decode: always`, decodes for real (`generate.py`).
- `likelihood`: the option (from the task's closed label set) whose tokens plus EOS have the
  highest total log-probability given the prompt; falls back to `generate` for open-answer tasks.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from agcl_ds.config import ExperimentConfig
from agcl_ds.data.collate import IGNORE, Tokenizer, encode, pad
from agcl_ds.data.types import Task
from agcl_ds.distributed import all_sum, device, rank, world_size
from agcl_ds.evaluation.generate import Generator
from agcl_ds.evaluation.metrics import METRICS

Row = tuple[list[int], list[int]]


class Evaluator:
    def __init__(self, engine, tokenizer: Tokenizer, max_len: int, batch_size: int, mode: str,
                 max_new_tokens: int = 64, decode: str = "auto") -> None:
        self.engine = engine
        self.tok = tokenizer
        self.max_len = max_len
        self.batch_size = batch_size
        self.mode = mode
        self.max_new_tokens = max_new_tokens
        self.decode = decode
        self.generator = Generator(engine.module, tokenizer, batch_size)
        self.seconds = 0.0  # wall time spent in evaluate_all (the evaluator's cost, e.g. of more test examples)

    @classmethod
    def for_run(cls, engine, tokenizer: Tokenizer, cfg: ExperimentConfig) -> Evaluator:
        """The evaluator a run's config describes (`data.max_seq_len` and the `evaluation` section)."""
        e = cfg.evaluation
        return cls(engine, tokenizer, cfg.data.max_seq_len, e.batch_size, e.mode, e.max_new_tokens, e.decode)

    def _score(self, rows: list[Row]) -> list[tuple[bool, float]]:
        """(all gold tokens are the argmax, summed gold log-prob) per row, in a fixed number of
        forward passes agreed by all ranks."""
        n_batches = math.ceil(len(rows) / self.batch_size)
        if dist.is_initialized() and world_size() > 1:
            t = torch.tensor([n_batches], device=device())
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            n_batches = int(t.item())
        dummy: Row = ([self.tok.eos_id, self.tok.eos_id], [IGNORE, self.tok.eos_id])
        module = self.engine.module
        was_training = module.training
        module.eval()
        out: list[tuple[bool, float]] = []
        with torch.no_grad():
            for b in range(n_batches):
                chunk = rows[b * self.batch_size:(b + 1) * self.batch_size]
                batch = pad(chunk or [dummy], self.tok.pad_id)
                batch = {k: v.to(device()) for k, v in batch.items()}
                logits = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                targets = batch["labels"][:, 1:]
                mask = targets != IGNORE
                picked = logits[:, :-1][mask].float()  # only the gold positions: [N, V]
                gold = targets[mask]
                hit = picked.argmax(-1) == gold
                logp = torch.log_softmax(picked, -1).gather(1, gold[:, None])[:, 0]
                row_id = torch.arange(len(targets), device=targets.device)[:, None].expand_as(targets)[mask]
                n_gold = torch.bincount(row_id, minlength=len(targets))
                n_hit = torch.bincount(row_id, weights=hit.double(), minlength=len(targets))
                sum_logp = torch.zeros(len(targets), dtype=torch.float64, device=targets.device)
                sum_logp.index_add_(0, row_id, logp.double())
                if chunk:
                    out.extend(zip((n_hit == n_gold).tolist(), sum_logp.tolist(), strict=True))
        module.train(was_training)
        return out

    def evaluate(self, task: Task) -> float:
        """The task's score (its metric's mean over the test set) in [0, 1], identical on every rank."""
        mine = task.test[rank()::world_size()]
        if task.metric != "accuracy" or self.decode == "always":
            correct = self._generated(task, mine)
        elif self.mode == "likelihood" and task.options:
            options = task.options
            rows = [encode(self.tok, ex.prompt, opt, self.max_len) for ex in mine for opt in options]
            scores = [s for _, s in self._score(rows)]
            correct = 0
            for i, ex in enumerate(mine):
                best = max(range(len(options)), key=lambda k: scores[i * len(options) + k])
                correct += options[best] == ex.answer
        else:
            rows = [encode(self.tok, ex.prompt, ex.answer, self.max_len) for ex in mine]
            correct = sum(hit for hit, _ in self._score(rows))
        total_correct, total = all_sum([float(correct), float(len(mine))])
        return total_correct / total if total else 0.0

    def _generated(self, task: Task, mine: list) -> float:
        """The sum of the metric over this rank's examples, from real greedy decoding."""
        metric = METRICS[task.metric]
        budget = self.max_len - self.max_new_tokens  # > 0: the config checks it
        prompts = [self.tok.encode(ex.prompt, prompt=True)[-budget:] for ex in mine]
        answers = self.generator.answers(prompts, self.max_new_tokens)
        return sum(metric(a, ex.answer, ex.prompt) for a, ex in zip(answers, mine, strict=True))

    def evaluate_all(self, tasks: list[Task]) -> list[float]:
        t0 = time.perf_counter()
        scores = [self.evaluate(t) for t in tasks]
        self.seconds += time.perf_counter() - t0
        return scores
