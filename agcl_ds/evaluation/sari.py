"""SARI (Xu et al. 2016): how well a simplification adds, keeps and deletes n-grams of its source.

No maintained offline package computes it (Hugging Face's `evaluate` loads its metric script from the
hub), so it is written here, following the tensor2tensor formulation that `evaluate`'s "sari" adapts
and TRACE scores 20Minuten with:

- n-grams of orders 1..4 are counted as sets (a repeated n-gram counts once);
- per order, keep = F1 of the source n-grams kept, against references weighted by the fraction of
  references holding each n-gram; delete = precision of the source n-grams dropped (beta 0);
  add = F1 of the n-grams added, against any reference;
- an empty selection or relevance counts as precision/recall 1 (0/0 = 1), so an output equal to
  its reference scores 1;
- SARI = (mean keep + mean delete + mean add) / 3 over the orders, in [0, 1];
- before counting, text is lower-cased and split like sacreBLEU's "13a" tokenizer (punctuation
  apart, numbers' dots and commas kept), as `evaluate`'s metric does.

`tests/test_metrics_text.py` checks it against the reference implementation's published values.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

_13A = [
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),  # punctuation apart
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # a period or comma not preceded by a digit
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # ... or not followed by one
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # a dash after a digit
]


def tokenize_13a(text: str) -> list[str]:
    """Lower-cased tokens as sacreBLEU's 13a tokenizer splits them."""
    line = text.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    line = f" {line} "
    for pattern, repl in _13A:
        line = pattern.sub(repl, line)
    return line.lower().split()


def _ngrams(tokens: Sequence, n: int) -> Counter:
    return Counter({tuple(tokens[i:i + n]): 1 for i in range(len(tokens) - n + 1)})


def _fbeta(true_pos: float, selected: float, relevant: float, beta: float = 1.0) -> float:
    precision = true_pos / selected if selected > 0 else 1.0
    if beta == 0:
        return precision
    recall = true_pos / relevant if relevant > 0 else 1.0
    if precision > 0 and recall > 0:
        b2 = beta * beta
        return (1 + b2) * precision * recall / (b2 * precision + recall)
    return 0.0


def keep_score(source: Counter, prediction: Counter, weighted_refs: Counter) -> float:
    kept = source & prediction
    should_keep = source & weighted_refs
    return _fbeta(sum((kept & should_keep).values()), sum(kept.values()), sum(should_keep.values()))


def deletion_score(source: Counter, prediction: Counter, weighted_refs: Counter, beta: float = 0.0) -> float:
    deleted = source - prediction
    should_delete = source - weighted_refs
    return _fbeta(sum((deleted & should_delete).values()), sum(deleted.values()), sum(should_delete.values()),
                  beta=beta)


def addition_score(source: Counter, prediction: Counter, any_ref: Counter) -> float:
    added = prediction - source
    return _fbeta(sum((added & any_ref).values()), sum(added.values()), sum((any_ref - source).values()))


def sari_tokens(source: Sequence, prediction: Sequence, references: Sequence[Sequence],
                max_order: int = 4) -> tuple[float, float, float, float]:
    """(SARI, keep, delete, add) of one tokenised output, each in [0, 1]."""
    keep, delete, add = [], [], []
    for n in range(1, max_order + 1):
        src, pred = _ngrams(source, n), _ngrams(prediction, n)
        weighted, nonempty = Counter(), 0
        for ref in references:
            grams = _ngrams(ref, n)
            if grams:
                weighted.update(grams)
                nonempty += 1
        for gram in weighted:
            weighted[gram] /= nonempty
        any_ref = Counter(dict.fromkeys(weighted, 1))
        keep.append(keep_score(src, pred, weighted))
        delete.append(deletion_score(src, pred, weighted))
        add.append(addition_score(src, pred, any_ref))
    k, d, a = (sum(x) / max_order for x in (keep, delete, add))
    return (k + d + a) / 3, k, d, a


def sari(source: str, prediction: str, references: Sequence[str]) -> float:
    """SARI of one text output in [0, 1] (TRACE and `evaluate` print it times 100)."""
    return sari_tokens(tokenize_13a(source), tokenize_13a(prediction), [tokenize_13a(r) for r in references])[0]
