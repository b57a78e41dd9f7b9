"""The LMN paper's figures, drawn with matplotlib (``grokfast-metrics plot RUN``).

``grokfast-metrics plot SWEEP_DIR`` on a sweep directory rewrites the sweep's outputs instead
(:func:`grokfast_metrics.sweep.command.replot`; the sweep's figures are :mod:`grokfast_metrics.sweep.figures`).

* ``fig2_curves.png``: accuracy, loss, LMN and L2 vs step (Figure 2;
  :func:`~grokfast_metrics.experiment.curves.plot_curves`, which the trainer also uses for ``curves.png``).
* ``fig3_layers.png``: LMN at every tracked layer vs step (Figure 3 / Appendix A).
* ``fig4_connectivity.png``: the saved connectivity matrices ``L`` at chosen steps, samples reordered by
  spectral clustering, beside their eigenvalue spectra (Figure 4).
* ``scatter_test_loss.png``: LMN vs test loss and L2 vs test loss over the generalizing phase, with their
  Pearson correlations (the paper's claim (2): LMN is the more linear one); also written to ``figures.json``.

The run directory's files (metrics, summary, connectivity snapshots written by the trainer with
``--save-connectivity STEPS``) are read and written by :mod:`grokfast_metrics.experiment.runlog`, which needs no
matplotlib; importing this module selects matplotlib's Agg backend.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from ..experiment.curves import plot_curves, save_figure
from ..experiment.runlog import RunLogError, RunWriteError, load_connectivity, read_json, read_metrics, write_atomic

# ------------------------------------------------------------------------------------------
# connectivity: spectral reordering


def spectral_order(L: torch.Tensor | np.ndarray, k: int | None = None, seed: int = 0) -> np.ndarray:
    """A permutation of the samples that groups them by spectral clustering of ``L``.

    The rows of the top-``k`` eigenvectors (``k`` by default from the largest gap among the 13 leading
    absolute eigenvalues, so at most 12) are clustered
    with k-means (seeded, deterministic); clusters are ordered by size, samples inside a cluster by their
    coordinate on the leading eigenvector.
    """
    from scipy.cluster.vq import kmeans2

    A = np.asarray(L, dtype=np.float64)
    ev, vec = np.linalg.eigh(A)
    order = np.argsort(-np.abs(ev))
    ev, vec = np.abs(ev[order]), vec[:, order]
    if k is None:
        top = ev[: min(13, len(ev))]
        k = int(np.argmax(top[:-1] - top[1:])) + 1 if len(top) > 1 else 1
    k = max(1, min(k, 12, A.shape[0]))
    X = vec[:, :k] * np.sqrt(ev[:k])
    if k == 1:
        labels = np.zeros(A.shape[0], dtype=int)
    else:
        _, labels = kmeans2(X, k, minit="++", seed=seed)
    sizes = np.bincount(labels, minlength=k)
    rank = np.argsort(np.argsort(-sizes, kind="stable"), kind="stable")
    return np.lexsort((vec[:, 0], rank[labels]))


# ------------------------------------------------------------------------------------------
# Figure 2: training curves


# ------------------------------------------------------------------------------------------
# Figures 3 and 4, scatter plots, all figures of a run


def _layer_columns(rows: list[dict]) -> list[str]:
    cols = []
    for r in rows:
        for key in r:
            if key.startswith("lmn_") and key not in cols:
                cols.append(key)
    return cols


def plot_layers(rows: list[dict], path: str | Path, summary: dict | None = None) -> Path | None:
    """Figure 3: LMN of every tracked reading vs step (log-x), in two panels when both kinds were tracked:
    each layer to the logits (``lmn_<layer>``) and each segment between two layers (``lmn_<from>:<to>``,
    e.g. each layer to the next one). Returns None when no LMN column exists."""
    cols = _layer_columns(rows)
    if not cols:
        return None
    panels = [
        ("each layer to the logits", [c for c in cols if ":" not in c]),
        ("each layer to the next layer (segments)", [c for c in cols if ":" in c]),
    ]
    panels = [(t, cs) for t, cs in panels if cs]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4), squeeze=False)
    for ax, (title, cs) in zip(axes[0], panels):
        for c in cs:
            pts = [(r["step"], r[c]) for r in rows if r.get(c) is not None and r["step"] >= 1]
            if pts:
                ax.plot(*zip(*pts), label=c[len("lmn_") :].replace(":", " \u2192 "), lw=1.4)
        _mark_phases(ax, summary)
        ax.set(xscale="log", xlabel="step", ylabel="LMN", title=f"LMN: {title}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, 120)
    return Path(path)


def _mark_phases(ax, summary: dict | None) -> None:
    for key, color in (("memorization_step", "tab:red"), ("generalization_step", "tab:green")):
        s = (summary or {}).get(key)
        if s:
            ax.axvline(s, color=color, ls="--", lw=0.9, label=key.split("_")[0])
    c = ((summary or {}).get("numerical_collapse") or {}).get("step")
    if c:
        ax.axvline(c, color="crimson", ls=":", lw=1.4, label="numerical collapse")


def plot_connectivity(snaps: list[dict], path: str | Path) -> Path | None:
    """Each snapshot's ``L`` (spectrally reordered) above its eigenvalue spectrum. None if no snapshots."""
    if not snaps:
        return None
    n = len(snaps)
    # one colour scale for all panels, from the data: L often lives in [0.8, 1], where 0..1 shows nothing
    vmin = min(float(s["L"].min()) for s in snaps)
    vmin = min(vmin, 0.999)
    fig, axes = plt.subplots(
        2, n, figsize=(max(3.4 * n, 6.0), 6.4), squeeze=False, layout="constrained", gridspec_kw={"height_ratios": [3, 2]}
    )
    for c, s in enumerate(snaps):
        L = s["L"].double().numpy()
        perm = spectral_order(L)
        im = axes[0, c].imshow(L[perm][:, perm], vmin=vmin, vmax=1, cmap="viridis", interpolation="nearest")
        axes[0, c].set(title=f"step {s['step']}  LMN={s['lmn']:.2f}", xticks=[], yticks=[])
        ev = np.sort(np.abs(np.linalg.eigvalsh(L)))[::-1]
        axes[1, c].semilogy(np.arange(1, len(ev) + 1), np.maximum(ev / ev.sum(), 1e-12), ".", ms=3)
        axes[1, c].set(xscale="log", xlabel="index", ylabel="normalised |eigenvalue|" if c == 0 else None, ylim=(1e-8, 1.5))
    fig.colorbar(im, ax=axes[0, :].tolist(), shrink=0.8, label="L_ij")
    fig.suptitle(f"connectivity matrix L ({snaps[0]['layer']})\nsamples ordered by spectral clustering", fontsize=10)
    save_figure(fig, path, 110)
    return Path(path)


def generalizing_phase(rows: list[dict], summary: dict | None) -> list[dict]:
    """Rows with LMN between the memorization step and the generalization step (or the end)."""
    mem = (summary or {}).get("memorization_step")
    if mem is None:
        return []
    gen = (summary or {}).get("generalization_step")
    end = gen if gen is not None else math.inf
    return [r for r in rows if mem <= r["step"] <= end and r.get("lmn") is not None and r.get("test_loss") is not None]


def pearson(x: list[float], y: list[float]) -> float | None:
    """Pearson correlation, or None with fewer than 3 points or a constant series."""
    if len(x) < 3:
        return None
    a, b = np.asarray(x, float), np.asarray(y, float)
    if a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def plot_scatter(rows: list[dict], summary: dict | None, path: str | Path) -> dict:
    """LMN vs test loss and L2 vs test loss in the generalizing phase; returns the correlations."""
    phase = generalizing_phase(rows, summary)
    loss = [r["test_loss"] for r in phase]
    out = {
        "phase_points": len(phase),
        "phase_steps": [phase[0]["step"], phase[-1]["step"]] if phase else None,
        "pearson_lmn_test_loss": pearson([r["lmn"] for r in phase], loss),
        "pearson_l2_test_loss": pearson([r["l2"] for r in phase], loss),
    }
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "lmn", "LMN"), (axes[1], "l2", "L2 norm")):
        sc = ax.scatter([r[key] for r in phase], loss, c=[r["step"] for r in phase], s=10, cmap="plasma")
        r = out[f"pearson_{key}_test_loss"]
        ax.set(xlabel=label, ylabel="test loss", title=f"{label}: Pearson r = " + ("n/a" if r is None else f"{r:.3f}"))
    fig.suptitle("test loss vs complexity over the generalizing phase (memorization to generalization)", fontsize=10)
    if phase:
        fig.colorbar(sc, ax=axes.tolist(), label="step")
    save_figure(fig, path, 120)
    out["path"] = str(path)
    return out


def make_figures(run_dir: str | Path, out_dir: str | Path | None = None) -> dict:
    """Write every figure this run's logs allow; returns ``{name: path or None, "scatter": stats}``."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl; is it a run directory written by 'grokfast-metrics train'?")
    out = Path(out_dir) if out_dir else run_dir
    rows = read_metrics(run_dir)
    if not rows:
        raise RunLogError(f"{run_dir / 'metrics.jsonl'}: no rows")
    summary_path = run_dir / "summary.json"
    try:
        summary = read_json(summary_path) if summary_path.is_file() else {}
    except RunLogError as e:  # the figures need only the rows: drawn without the phase marks
        warnings.warn(f"{e}; the figures are drawn without it", stacklevel=2)
        summary = {}
    layers = [c[len("lmn_") :] for c in _layer_columns(rows)] or None
    snaps = load_connectivity(run_dir, skip_damaged=True)  # a damaged snapshot is skipped with a warning naming it
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunWriteError.of(out, e) from None
    res = {
        "fig2": str(plot_curves(rows, out / "fig2_curves.png", summary=summary, layers=layers)),
        "fig3": _s(plot_layers(rows, out / "fig3_layers.png", summary)),
        "fig4": _s(plot_connectivity([s for s in snaps if s["layer"] == _first_layer(snaps, summary)], out / "fig4_connectivity.png")),
        "scatter": plot_scatter(rows, summary, out / "scatter_test_loss.png"),
    }
    write_atomic(out / "figures.json", json.dumps(res, indent=2).encode("utf-8"))
    return res


def _first_layer(snaps: list[dict], summary: dict) -> str | None:
    if not snaps:
        return None
    layer = summary.get("lmn_layer")
    return layer if any(s["layer"] == layer for s in snaps) else snaps[0]["layer"]


def _s(p: Path | None) -> str | None:
    return None if p is None else str(p)


# ------------------------------------------------------------------------------------------
# CLI (grokfast-metrics plot RUN)
