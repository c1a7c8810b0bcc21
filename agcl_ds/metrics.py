"""Continual-learning metrics from the accuracy matrix.

Conventions (T tasks, a[i][j] = accuracy on task j after training task i, 0-based, b[j] = the base
model's accuracy on task j before any training):

    OP  = mean_j a[T-1][j]                          average score after the last task
    BWT = sum_{j<T-1} (a[T-1][j] - a[j][j]) / (T-1) as TRACE and Mammoth (`bwt_over: T` divides by T)
    FWT = mean_{j>0} (a[j-1][j] - b[j])             over T-1 tasks, against the untrained base

a[i][j] is whatever metric task j is scored by (accuracy, ROUGE-L, ...), each in [0, 1]. BWT < 0 is
forgetting. With one task BWT and FWT are undefined and reported as None.

General-ability retention (TRACE's "general ability" delta): g[i][k] = score of general task k (never
trained on) after task i, g_base[k] before the first task; `general_delta` = mean_k (g[T-1][k] - g_base[k]).
"""

from __future__ import annotations


def _check(matrix: list[list[float]]) -> int:
    t = len(matrix)
    if t == 0 or any(len(row) != t for row in matrix):
        raise ValueError(f"accuracy matrix must be T x T, got {[len(r) for r in matrix]}")
    return t


def op(matrix: list[list[float]]) -> float:
    t = _check(matrix)
    return sum(matrix[-1]) / t


def bwt(matrix: list[list[float]], over: str = "T-1") -> float | None:
    t = _check(matrix)
    if t < 2:
        return None
    return sum(matrix[-1][j] - matrix[j][j] for j in range(t - 1)) / (t - 1 if over == "T-1" else t)


def fwt(matrix: list[list[float]], base: list[float]) -> float | None:
    t = _check(matrix)
    if len(base) != t:
        raise ValueError(f"base accuracies: expected {t} values, got {len(base)}")
    if t < 2:
        return None
    return sum(matrix[j - 1][j] - base[j] for j in range(1, t)) / (t - 1)


def general_delta(rows: list[list[float]], base: list[float]) -> float | None:
    """Mean change of the general tasks' scores from before the first task to after the last."""
    if not base or not rows:
        return None
    return sum(after - before for after, before in zip(rows[-1], base, strict=True)) / len(base)


def summary(matrix: list[list[float]], base: list[float], bwt_over: str = "T-1") -> dict[str, float | None]:
    return {"OP": op(matrix), "BWT": bwt(matrix, bwt_over), "FWT": fwt(matrix, base)}
