"""Per-answer scores of a generated answer against its gold answer, each in [0, 1].

A task names its metric (`evaluation.metrics`, or the layout's default: TRACE's own per task). A
task's score is the mean over its test examples; an empty generation scores 0 (TRACE skips it in
the sum and divides by all examples: the same mean).

| metric     | what                                                             | source                        |
|------------|------------------------------------------------------------------|-------------------------------|
| `accuracy` | exact match after stripping surrounding whitespace               | TRACE's accuracy (string ==)  |
| `choice`   | the option letter: the character after the first "Answer: " if  | TRACE's C-STANCE, FOMC and    |
|            | the text has one, else its first non-space character; upper-case | ScienceQA extraction          |
| `rouge_l`  | ROUGE-L F-measure (longest common subsequence of tokens)        | `rouge-score`                 |
| `sari`     | SARI of the output against the gold simplification and source    | `agcl_ds.evaluation.sari`     |
| `edit_sim` | normalised Levenshtein similarity (fuzzy ratio / 100), after     | `rapidfuzz`, as TRACE's       |
|            | TRACE's Py150 literal placeholders are put back                  | fuzzywuzzy ratio              |
| `f1`       | token F1 (SQuAD: lower-case, no punctuation or articles)         | written here (SQuAD's rules)  |

`rouge-score`'s tokenizer keeps only ASCII letters and digits, like the `rouge` package TRACE
uses for English; scores of non-English text read lower than they would with a language-aware
tokenizer.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable
from functools import cache

from agcl_ds.evaluation.sari import sari

Metric = Callable[[str, str, str], float]  # (prediction, gold, prompt) -> score in [0, 1]


def accuracy(prediction: str, gold: str, prompt: str = "") -> float:
    return float(prediction.strip() == gold.strip())


def option_letter(text: str) -> str:
    """The option a multiple-choice answer names, as TRACE reads it."""
    at = text.find("Answer: ")
    picked = text[at + 8:at + 9] if at >= 0 else text.strip()[:1]
    return picked.upper()


def choice(prediction: str, gold: str, prompt: str = "") -> float:
    letter = option_letter(prediction)
    return float(bool(letter) and letter == option_letter(gold))


@cache
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, gold: str, prompt: str = "") -> float:
    if not prediction.strip() or not gold.strip():
        return 0.0
    return float(_rouge().score(gold, prediction)["rougeL"].fmeasure)


_LITERAL = re.compile(r"<(STR|NUM|CHAR)_LIT:(.*?)>", re.S)


def restore_literals(code: str) -> str:
    """Py150's literal placeholders back to text, as TRACE does before comparing code."""
    code = code.replace("<NUM_LIT>", "0").replace("<STR_LIT>", "").replace("<CHAR_LIT>", "")
    return _LITERAL.sub(lambda m: m.group(2), code)


def edit_sim(prediction: str, gold: str, prompt: str = "") -> float:
    from rapidfuzz import fuzz

    prediction, gold = restore_literals(prediction), restore_literals(gold)
    if not prediction or not gold:
        return 0.0
    return fuzz.ratio(prediction, gold) / 100.0


def _squad_tokens(text: str) -> list[str]:
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def f1(prediction: str, gold: str, prompt: str = "") -> float:
    pred, ref = _squad_tokens(prediction), _squad_tokens(gold)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def sari_metric(prediction: str, gold: str, prompt: str = "") -> float:
    """SARI with the prompt as the source sentence (TRACE's 20Minuten prompt holds the text to simplify)."""
    return sari(prompt, prediction, [gold])


METRICS: dict[str, Metric] = {
    "accuracy": accuracy,
    "choice": choice,
    "rouge_l": rouge_l,
    "sari": sari_metric,
    "edit_sim": edit_sim,
    "f1": f1,
}
