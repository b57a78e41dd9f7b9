"""``curves.png``: the training curves the trainer draws at the end of a run (accuracy, loss, LMN and L2 vs step;
the paper's Figure 2), and how a figure is written (:func:`save_figure`). The other figures of a run are
:mod:`grokfast_metrics.figures.run`; importing this module selects matplotlib's Agg backend (the trainer imports
it only to draw, after training)."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from .runlog import write_atomic


def save_figure(fig, path: str | Path, dpi: int) -> Path:
    """``fig`` as a PNG at ``path``, written atomically (a full disk leaves no partial image); the figure is closed.

    Raises:
        RunWriteError: the file could not be written (names it and the cause).
    """
    buf = io.BytesIO()
    try:
        fig.savefig(buf, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    return write_atomic(Path(path), buf.getvalue())


_PHASES = (("memorizing", "#fde2e2"), ("generalizing", "#fff4cc"), ("finalizing", "#e3f4e1"))


def _xy(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_curves(
    rows: list[dict], path: str | Path, *, summary: dict | None = None, layers: list[str] | None = None, title: str | None = None
) -> Path:
    """Write a 1x4 figure: accuracy, loss, LMN, L2 norm vs step (symlog x: linear in [0, 1], log above).

    The memorization and generalization steps are marked and the three phases shaded.

    Args:
        rows: logged rows (``step``, ``train_acc``, ``test_acc``, ``train_loss``, ``test_loss``,
            ``l2``, ``lmn`` / ``lmn_<layer>``), e.g. from :func:`grokfast_metrics.experiment.runlog.read_metrics`.
        path: PNG path to write.
        summary: optional run summary (memorization / generalization steps are marked).
        layers: tracked layers (one LMN line each); default: the ``lmn`` column only.
        title: figure title (default from the summary).

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    summary = summary or {}
    mem, gen = summary.get("memorization_step"), summary.get("generalization_step")
    collapse = (summary.get("numerical_collapse") or {}).get("step")
    last = max((r["step"] for r in rows), default=1)
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for ax in axes:
        _phase_axis(ax, last, mem, gen)
        if collapse is not None:
            ax.axvline(collapse, color="crimson", ls=":", lw=1.6)
    _train_test_panel(axes[0], rows, "acc", "accuracy", legend="upper left")
    axes[0].set_ylim(-0.02, 1.02)
    _train_test_panel(axes[1], rows, "loss", "cross-entropy loss", legend="lower left")
    axes[1].set_yscale("log")
    _lmn_panel(axes[2], rows, summary, layers)
    axes[3].plot(*_xy(rows, "l2"), color="C4")
    axes[3].set_ylabel("L2 norm of parameters")

    handles = [plt.Rectangle((0, 0), 1, 1, color=c, alpha=0.6) for _, c in _PHASES]
    names = [n for n, _ in _PHASES]
    if collapse is not None:
        handles.append(plt.Line2D([], [], color="crimson", ls=":", lw=1.6))
        names.append(f"numerical collapse (step {collapse})")
    fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=8, frameon=False)
    fig.suptitle(_curves_title(summary) if title is None else title)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    save_figure(fig, path, 110)
    return path


def _phase_axis(ax, last: int, mem: int | None, gen: int | None) -> None:
    """Symlog step axis with the phases shaded and the memorization / generalization steps marked."""
    ax.set_xscale("symlog", linthresh=1.0, linscale=0.5)
    ax.set_xlim(0, max(last, 1) * 1.05)
    ax.set_xlabel("step")
    ax.grid(True, which="major", alpha=0.3)
    bounds = [0, mem if mem is not None else last, gen if gen is not None else last, last]
    for (_name, color), lo, hi in zip(_PHASES, bounds[:-1], bounds[1:]):
        if hi > lo:
            ax.axvspan(lo, hi, color=color, alpha=0.6, lw=0)
    for s in (mem, gen):
        if s is not None:
            ax.axvline(s, color="0.3", ls="--", lw=0.8)


def _train_test_panel(ax, rows: list[dict], what: str, ylabel: str, legend: str) -> None:
    ax.plot(*_xy(rows, f"train_{what}"), label="train", color="C0")
    ax.plot(*_xy(rows, f"test_{what}"), label="test", color="C3")
    ax.set_ylabel(ylabel)
    ax.legend(loc=legend, fontsize=8)


def _lmn_panel(ax, rows: list[dict], summary: dict, layers: list[str] | None) -> None:
    keys = [f"lmn_{layer}" for layer in layers] if layers else ["lmn"]
    for i, key in enumerate(keys):
        xs, ys = _xy(rows, key)
        if xs:
            ax.plot(xs, ys, marker="." if len(xs) <= 120 else None, ms=4, color=f"C{2 + i}", label=key[4:] if len(keys) > 1 else None)
    if len(keys) > 1:
        ax.legend(fontsize=8)
    where = summary.get("lmn_layer", keys[0][4:] if layers else "tracked layer")
    probe = summary.get("lmn_probe")
    ax.set_ylabel(f"LMN ({where}" + (f", probe {probe})" if probe is not None else ")"))


def _curves_title(summary: dict) -> str:
    title = summary.get("task", "")
    mem, gen = summary.get("memorization_step"), summary.get("generalization_step")
    if mem is not None or gen is not None:
        title += f"   memorization step {mem}, generalization step {gen}"
    collapse = summary.get("numerical_collapse")
    if collapse is not None:
        title += f"   numerical collapse at step {collapse['step']}"
    if summary.get("stop_reason"):
        title += f"   ({summary['stop_reason']})"
    elif summary.get("interrupted"):
        title += "   (interrupted)"
    return title
