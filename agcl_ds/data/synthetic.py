"""The built-in offline task family: digit maps that share their inputs.

Every task reads the same digit strings and maps them differently (reverse, add one, rotate, ...),
and names itself in its prompt (`revinc:31415926=`), so one model can hold them all while
sequential fine-tuning on them overwrites shared circuitry and forgets. The continual tasks are
compositions of the base maps, so a base model pretrained on a broad mixture of base maps already
holds knowledge that each continual fine-tune can build on: the regime the method is meant for.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from agcl_ds.data.types import DataError, Example, Task

Digits = list[int]


def _rot(d: Digits, k: int) -> Digits:
    return d[k:] + d[:k]


def _swap_pairs(d: Digits) -> Digits:
    out = list(d)
    for i in range(0, len(d) - 1, 2):
        out[i], out[i + 1] = d[i + 1], d[i]
    return out


MAPS: dict[str, Callable[[Digits], Digits]] = {
    "rev": lambda d: d[::-1],
    "inc": lambda d: [(x + 1) % 10 for x in d],
    "dec": lambda d: [(x + 9) % 10 for x in d],
    "add2": lambda d: [(x + 2) % 10 for x in d],
    "add3": lambda d: [(x + 3) % 10 for x in d],
    "mul3": lambda d: [(3 * x) % 10 for x in d],
    "neg": lambda d: [(10 - x) % 10 for x in d],
    "comp": lambda d: [9 - x for x in d],
    "rot2": lambda d: _rot(d, 2),
    "sort": sorted,
    "swap": _swap_pairs,
    "revinc": lambda d: [(x + 1) % 10 for x in d[::-1]],
    "revcomp": lambda d: [9 - x for x in d[::-1]],
    "rot2comp": lambda d: [9 - x for x in _rot(d, 2)],
    "rot2inc": lambda d: [(x + 1) % 10 for x in _rot(d, 2)],
}


def _inputs(n: int, n_digits: int, rng: random.Random, avoid: set[tuple[int, ...]]) -> list[Digits]:
    out: list[Digits] = []
    while len(out) < n:
        d = tuple(rng.randrange(10) for _ in range(n_digits))
        if d not in avoid:
            avoid.add(d)
            out.append(list(d))
    return out


def _example(name: str, d: Digits) -> Example:
    return Example(f"{name}:{''.join(map(str, d))}=", "".join(map(str, MAPS[name](d))))


def _pools(cfg) -> tuple[list[Digits], list[Digits]]:
    """Disjoint train and test input pools, shared by every task (cfg: SyntheticConfig)."""
    rng = random.Random(cfg.seed)
    seen: set[tuple[int, ...]] = set()
    test = _inputs(cfg.n_test, cfg.n_digits, rng, seen)
    train = _inputs(cfg.n_train, cfg.n_digits, rng, seen)
    return train, test


def _check_names(names: list[str], where: str) -> None:
    for name in names:
        if name not in MAPS:
            raise DataError(f"{where}: unknown synthetic task {name!r} (known: {', '.join(sorted(MAPS))})")


def make_tasks(names: list[str], cfg) -> list[Task]:
    """The continual tasks, in the given order (cfg: agcl_ds.config.SyntheticConfig)."""
    _check_names(names, "data.tasks")
    _check_names(cfg.base_tasks, "data.synthetic.base_tasks")
    overlap = sorted(set(names) & set(cfg.base_tasks))
    if overlap:
        raise DataError(f"data.tasks: {overlap[0]!r} is also a base task; continual tasks must be new")
    train, test = _pools(cfg)
    return [Task(name, [_example(name, d) for d in train], [_example(name, d) for d in test])
            for name in names]


def make_mixture(cfg) -> Task:
    """The broad pretraining mixture: every base map on every train input, shuffled."""
    _check_names(cfg.base_tasks, "data.synthetic.base_tasks")
    train, test = _pools(cfg)
    mix = [_example(name, d) for d in train for name in cfg.base_tasks]
    random.Random(cfg.seed + 1).shuffle(mix)
    held_out = [_example(name, d) for d in test for name in cfg.base_tasks]
    return Task("base-mixture", mix, held_out)
