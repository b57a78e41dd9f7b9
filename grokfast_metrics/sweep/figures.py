"""The sweep's figures: an Omnigrok-style phase diagram and "does LMN predict grokking?"."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from .outcomes import OUTCOMES, lmn_drop_feature

#: outcome -> colour of its phase-diagram cells
COLOURS = {"comprehension": "#4caf50", "grokking": "#ffb300", "memorization": "#e53935", "confusion": "#9e9e9e", "not run": "#ffffff"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> None:
    """Write the figure atomically (a full disk leaves no partial image); raises ``RunWriteError``."""
    from ..experiment.curves import save_figure

    save_figure(fig, path, 120)


def _cells(rows: list[dict], x_axis: str, y_axis: str | None) -> dict[tuple, list[dict]]:
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r[x_axis], r[y_axis] if y_axis else ""), []).append(r)
    return cells


def _cell_label(runs: list[dict]) -> tuple[str, str]:
    """Majority outcome of a cell's runs (seeds) and its annotation (mean generalization delay)."""
    outcomes = Counter(r.get("outcome") or "not run" for r in runs)
    outcome = outcomes.most_common(1)[0][0]
    delays = [r["generalization_delay"] for r in runs if r.get("generalization_delay") is not None]
    text = f"{sum(delays) / len(delays):.0f}" if delays else "-"
    return outcome, text if len(outcomes) == 1 else f"{text}\n({len(runs) - outcomes[outcome]}/{len(runs)} differ)"


def plot_phase(rows: list[dict], axes: list[str], path: str | Path) -> Path | None:
    """Phase diagram over the first two grid axes (one axis: a strip), cells coloured by outcome.

    Each cell is annotated with the mean generalization delay (steps from memorization to
    generalization) over its seeds. ``None`` when the sweep has no grid axis.
    """
    if not axes:
        return None
    plt = _pyplot()
    x_axis, y_axis = axes[0], axes[1] if len(axes) > 1 else None
    xs = list(dict.fromkeys(r[x_axis] for r in rows))
    ys = list(dict.fromkeys(r[y_axis] for r in rows)) if y_axis else [""]
    fig, ax = plt.subplots(figsize=(1.3 * len(xs) + 2.5, 1.0 * len(ys) + 2.0))
    for (x, y), runs in _cells(rows, x_axis, y_axis).items():
        outcome, text = _cell_label(runs)
        i, j = xs.index(x), ys.index(y)
        ax.add_patch(plt.Rectangle((i - 0.5, j - 0.5), 1, 1, color=COLOURS.get(outcome, "#ffffff"), ec="white"))
        ax.text(i, j, text, ha="center", va="center", fontsize=8)
    ax.set_xlim(-0.5, len(xs) - 0.5)
    ax.set_ylim(-0.5, len(ys) - 0.5)
    ax.set_xticks(range(len(xs)), [str(x) for x in xs])
    ax.set_yticks(range(len(ys)), [str(y) for y in ys])
    ax.set_xlabel(x_axis)
    ax.set_ylabel(y_axis or "")
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLOURS[o]) for o in OUTCOMES]
    ax.legend(handles, OUTCOMES, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.set_title("outcome per cell (majority over seeds); number: mean generalization delay (steps)", fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    return Path(path)


def _pearson(x: list[float], y: list[float]) -> float | None:
    n = len(x)
    if n < 3:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return None if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)


def _ranks(v: list[float]) -> list[float]:
    order = sorted(range(len(v)), key=v.__getitem__)
    ranks = [0.0] * len(v)
    for rank, k in enumerate(order):
        ranks[k] = float(rank)
    return ranks


def predictor_points(rows: list[dict], window: int) -> list[tuple[float, float, str]]:
    """``(LMN drop, generalization delay, run)`` of the runs that generalized after the feature's step."""
    points = []
    for r in rows:
        if r.get("generalization_delay") is None or r.get("run_dir") is None:
            continue
        feature = lmn_drop_feature(r["run_dir"], r["memorization_step"], window)
        if feature is not None and feature[1] < r["generalization_step"]:  # known before generalization
            points.append((feature[0], float(r["generalization_delay"]), r["run"]))
    return points


def _signed(v: float | None) -> str:
    return "-" if v is None else f"{v:+.2f}"


def plot_lmn_predicts(rows: list[dict], window: int, path: str | Path) -> dict:
    """Scatter of the generalization delay against the relative LMN drop ``window`` steps after memorization.

    Returns:
        ``{"n", "pearson", "spearman", "window", "path"}`` (correlations ``None`` below 3 runs).
    """
    points = predictor_points(rows, window)
    x, y = [p[0] for p in points], [p[1] for p in points]
    stats = {"n": len(points), "pearson": _pearson(x, y), "spearman": _pearson(_ranks(x), _ranks(y)), "window": window, "path": None}
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.0, 4.0))
    ax.scatter(x, y, s=18)
    ax.set_xlabel(f"relative LMN drop from memorization to {window} steps later")
    ax.set_ylabel("generalization delay (steps)")
    ax.set_title(f"n={stats['n']} runs; Pearson {_signed(stats['pearson'])}, Spearman {_signed(stats['spearman'])}", fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    stats["path"] = str(path)
    return stats
