"""Tables and plots from results: the last stage of the pipeline."""

from __future__ import annotations

import json
import os
from typing import Any


def _fmt(x: float | None) -> str:
    return "  n/a" if x is None else f"{x:+.3f}" if x < 0 else f"{x:.3f}"


def _rows(tasks: list[str], metrics: list[str], width: int, labelled: list[tuple[str, list[float]]]) -> list[str]:
    corner = "after \\ on"
    head = f"{corner:<{width}}" + "".join(f"{t:>{width}}" for t in tasks)
    lines = [head, f"{'(metric)':<{width}}" + "".join(f"{m:>{width}}" for m in metrics)]
    lines += [f"{label:<{width}}" + "".join(f"{x:>{width}.3f}" for x in row) for label, row in labelled]
    return lines


def matrix_table(results: dict[str, Any]) -> str:
    """The score matrix as text: rows = after training task i, columns = evaluated on task j (each by
    the metric named under it); then the general-ability tasks, when the run had them."""
    tasks = results["tasks"]
    metrics = results.get("metrics") or ["accuracy"] * len(tasks)  # results from before per-task metrics
    general = results.get("general")
    names = tasks + (general["tasks"] if general else [])
    width = max(8, *(len(t) for t in names), *(len(m) for m in metrics)) + 1
    lines = [f"method: {results['method']}"]
    lines += _rows(tasks, metrics, width, [("(base)", results["base"]), *zip(tasks, results["matrix"], strict=True)])
    over = results.get("bwt_over", "T-1")
    lines.append(f"OP {_fmt(results['OP'])}   BWT {_fmt(results['BWT'])} (over {over})   FWT {_fmt(results['FWT'])}")
    if general:
        lines.append("general ability (never trained on):")
        lines += _rows(general["tasks"], general["metrics"], width,
                       [("(base)", general["base"]), *zip(tasks, general["rows"], strict=True)])
        lines.append(f"general delta {_fmt(general['delta'])} (after the last task - before the first)")
    return "\n".join(lines)


def side_by_side(all_results: list[dict[str, Any]]) -> str:
    """Several methods' matrices next to each other, then one summary line per method."""
    blocks = [matrix_table(r).splitlines() for r in all_results]
    widths = [max(len(line) for line in b) for b in blocks]
    height = max(len(b) for b in blocks)
    lines = []
    for i in range(height):
        lines.append("   |   ".join((b[i] if i < len(b) else "").ljust(w) for b, w in zip(blocks, widths, strict=True)))
    return "\n".join(line.rstrip() for line in lines)


def summary_table(all_results: list[dict[str, Any]]) -> str:
    general = any("general" in r for r in all_results)
    lines = [f"{'method':<16}{'OP':>8}{'BWT':>8}{'FWT':>8}" + (f"{'general':>9}" if general else "")]
    for r in all_results:
        delta = r.get("general", {}).get("delta")
        lines.append(f"{r['method']:<16}{_fmt(r['OP']):>8}{_fmt(r['BWT']):>8}{_fmt(r['FWT']):>8}"
                     + (f"{_fmt(delta):>9}" if general else ""))
    return "\n".join(lines)


def heatmap(results: dict[str, Any], path: str) -> None:
    """matrix.png: accuracy after each task (rows) on each task (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = results["tasks"]
    n = len(tasks)
    fig, ax = plt.subplots(figsize=(1.2 * n + 2.5, 1.0 * n + 1.8))
    im = ax.imshow(results["matrix"], vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(n), tasks, rotation=30, ha="right")
    ax.set_yticks(range(n), tasks)
    ax.set_xlabel("evaluated on")
    ax.set_ylabel("after training")
    for i in range(n):
        for j in range(n):
            v = results["matrix"][i][j]
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black")
    bwt = results["BWT"]
    ax.set_title(f"{results['method']}: OP {results['OP']:.3f}" + (f", BWT {bwt:+.3f}" if bwt is not None else ""))
    fig.colorbar(im, ax=ax, fraction=0.046)
    save_figure(fig, path)


def save_figure(fig, path: str) -> None:
    """Write a matplotlib figure atomically (temporary file, then rename) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def load_results(paths: list[str]) -> list[dict[str, Any]]:
    out = []
    for p in paths:
        try:
            with open(p) as f:
                out.append(json.load(f))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{p}: cannot read results ({e})") from None
    return out


def metric_bars(all_results: list[dict[str, Any]], path: str) -> None:
    """OP, BWT and FWT of several runs as grouped bars (one colour per run), written atomically.

    A metric that is undefined for a run (BWT/FWT of a one-task sequence) is left out and marked n/a."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["OP", "BWT", "FWT"]
    labels = _labels(all_results)
    n = len(all_results)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(2.2 + 1.4 * len(metrics) * max(1, n / 2), 3.8))
    for i, (r, label) in enumerate(zip(all_results, labels, strict=True)):
        xs = [m + (i - (n - 1) / 2) * width for m in range(len(metrics))]
        values = [r[m] for m in metrics]
        bars = ax.bar(xs, [v if v is not None else 0.0 for v in values], width, label=label)
        for bar, v in zip(bars, values, strict=True):
            y = bar.get_height() if v is not None else 0.0
            ax.annotate("n/a" if v is None else f"{v:.3f}", (bar.get_x() + bar.get_width() / 2, y),
                        ha="center", va="bottom" if y >= 0 else "top", fontsize=7)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(metrics)), metrics)
    ax.set_ylabel("accuracy / difference")
    ax.set_title("OP, BWT, FWT per run")
    ax.legend(fontsize=8, loc="best")
    save_figure(fig, path)


def _labels(all_results: list[dict[str, Any]]) -> list[str]:
    labels = [r["method"] for r in all_results]
    if len(set(labels)) < len(labels):  # the same method from several runs: add the experiment name
        labels = [f"{r['method']} ({r['config']['name']})" for r in all_results]
    return labels


def score_curves(all_results: list[dict[str, Any]], path: str) -> None:
    """One panel per task that later tasks follow: its score before training and after each task, one line
    per run, so forgetting shows as a line falling after the task's own step. Runs must share the tasks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = all_results[0]["tasks"]
    if any(r["tasks"] != tasks for r in all_results):
        raise ValueError("score curves need runs over the same task sequence")
    metrics = all_results[0].get("metrics") or ["accuracy"] * len(tasks)
    old = range(max(1, len(tasks) - 1))  # the last task is never an old one
    fig, axes = plt.subplots(1, len(old), figsize=(3.4 * len(old) + 0.6, 3.2), squeeze=False, sharey=True)
    steps = ["base", *tasks]
    for ax, j in zip(axes[0], old, strict=True):
        for r, label in zip(all_results, _labels(all_results), strict=True):
            ys = [r["base"][j], *(row[j] for row in r["matrix"])]
            ax.plot(range(len(ys)), ys, marker="o", label=label)
        ax.axvline(j + 1, color="grey", linewidth=0.8, linestyle=":")  # right after training on task j
        ax.set_xticks(range(len(steps)), steps, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{tasks[j]} ({metrics[j]})", fontsize=9)
        ax.set_xlabel("after training on", fontsize=8)
        ax.set_ylim(-0.02, 1.02)
    axes[0][0].set_ylabel("score")
    axes[0][-1].legend(fontsize=8, loc="best")
    save_figure(fig, path)
