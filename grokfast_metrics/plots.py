"""Training-curve plot in the style of the LMN paper's Figure 2, and the text summary of a run.

:func:`plot_curves` draws four panels against the step on a log axis: train/test accuracy,
train/test loss, LMN (per tracked layer) and the L2 norm of all parameters, with the
memorization and generalization steps marked and the three phases shaded.
"""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

_PHASES = (("memorizing", "#fde2e2"), ("generalizing", "#fff4cc"), ("finalizing", "#e3f4e1"))


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Rows of ``run_dir/metrics.jsonl`` (skips a truncated last line, e.g. after a crash).

    Raises:
        FileNotFoundError: no ``metrics.jsonl`` in ``run_dir``.
    """
    rows = []
    with open(Path(run_dir) / "metrics.jsonl", encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


def _xy(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_curves(rows: list[dict], path: str | Path, *, summary: dict | None = None, layers: list[str] | None = None,
                title: str | None = None) -> Path:
    """Write a 1x4 figure: accuracy, loss, LMN, L2 norm vs step (symlog x: linear in [0, 1], log above).

    Args:
        rows: logged rows (``step``, ``train_acc``, ``test_acc``, ``train_loss``, ``test_loss``,
            ``l2``, ``lmn`` / ``lmn_<layer>``), e.g. from :func:`read_metrics`.
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
    last = max((r["step"] for r in rows), default=1)
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    bounds = [0, mem if mem is not None else last, gen if gen is not None else last, last]
    for ax in axes:
        ax.set_xscale("symlog", linthresh=1.0, linscale=0.5)
        ax.set_xlim(0, max(last, 1) * 1.05)
        ax.set_xlabel("step")
        ax.grid(True, which="major", alpha=0.3)
        for (_name, color), lo, hi in zip(_PHASES, bounds[:-1], bounds[1:]):
            if hi > lo:
                ax.axvspan(lo, hi, color=color, alpha=0.6, lw=0)
        for s in (mem, gen):
            if s is not None:
                ax.axvline(s, color="0.3", ls="--", lw=0.8)

    ax = axes[0]
    ax.plot(*_xy(rows, "train_acc"), label="train", color="C0")
    ax.plot(*_xy(rows, "test_acc"), label="test", color="C3")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(loc="upper left", fontsize=8)

    ax = axes[1]
    ax.plot(*_xy(rows, "train_loss"), label="train", color="C0")
    ax.plot(*_xy(rows, "test_loss"), label="test", color="C3")
    ax.set_yscale("log")
    ax.set_ylabel("cross-entropy loss")
    ax.legend(loc="lower left", fontsize=8)

    ax = axes[2]
    keys = [f"lmn_{layer}" for layer in layers] if layers else ["lmn"]
    for i, key in enumerate(keys):
        xs, ys = _xy(rows, key)
        if xs:
            ax.plot(xs, ys, marker="." if len(xs) <= 120 else None, ms=4, color=f"C{2 + i}",
                    label=key[4:] if len(keys) > 1 else None)
    if len(keys) > 1:
        ax.legend(fontsize=8)
    where = summary.get("lmn_layer", keys[0][4:] if layers else "tracked layer")
    probe = summary.get("lmn_probe")
    ax.set_ylabel(f"LMN ({where}" + (f", probe {probe})" if probe is not None else ")"))

    ax = axes[3]
    ax.plot(*_xy(rows, "l2"), color="C4")
    ax.set_ylabel("L2 norm of parameters")

    handles = [plt.Rectangle((0, 0), 1, 1, color=c, alpha=0.6) for _, c in _PHASES]
    fig.legend(handles, [n for n, _ in _PHASES], loc="lower center", ncol=3, fontsize=8, frameon=False)
    if title is None:
        title = summary.get("task", "")
        if mem is not None or gen is not None:
            title += f"   memorization step {mem}, generalization step {gen}"
        if summary.get("interrupted"):
            title += "   (interrupted)"
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_summary(summary: dict) -> str:
    """Human-readable multi-line summary of :func:`grokfast_metrics.train.summarize`'s dict."""

    def lm(key):
        v = summary.get(key)
        return "-" if v is None else f"{v['lmn']:.2f} (step {v['step']})"

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    t = summary.get("timings_s", {})
    lines = [
        (f"task {summary.get('task')}: {summary.get('steps_done')}/{summary.get('steps_planned')} steps"
         + ("  [interrupted]" if summary.get("interrupted") else "")),
        f"  memorization step (train acc 100%):   {summary.get('memorization_step')}",
        f"  generalization step (test acc >= 99%): {summary.get('generalization_step')}",
        f"  final accuracy train {pct(summary.get('final_train_acc'))}, test {pct(summary.get('final_test_acc'))}",
        (f"  LMN ({summary.get('lmn_layer')}): init {lm('lmn_init')}, peak {lm('lmn_peak')}, "
         f"at memorization {lm('lmn_at_memorization')}, at generalization {lm('lmn_at_generalization')}, "
         f"final {lm('lmn_final')}"),
        (f"  time {t.get('total', 0):.1f} s (train {t.get('train', 0):.1f} s, LMN {t.get('lmn', 0):.1f} s "
         f"over {summary.get('lmn_evaluations')} evaluations, complexity/norms {t.get('complexity', 0):.1f} s, "
         f"logging {t.get('log', 0):.1f} s)"),
    ]
    return "\n".join(lines)
