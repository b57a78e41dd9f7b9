"""Full-batch training on the paper's tasks with LMN tracked densely (the project's main job).

:func:`train` runs one job from a :class:`TrainConfig` and writes, in the run directory:

- ``config.json``: the resolved configuration (device, probe, sizes, versions);
- ``metrics.jsonl`` / ``metrics.csv``: one row per logged step (:data:`BASE_COLUMNS` plus
  ``lmn_<layer>`` per tracked layer; LMN columns are empty/null where not computed);
- ``summary.json``: memorization / generalization steps, LMN at the key steps, timings;
- ``curves.png``: train/test accuracy, loss, LMN and L2 norm vs step (paper Fig. 2 style).

Step ``s`` in the logs is the model after ``s`` optimizer updates (``s = 0``: initialization).
The LMN tracker runs under ``torch.no_grad()`` on detached representations through
``grokfast_metrics.lmn``, which never touches parameters, modes or RNG; the probe subset is drawn
from its own ``torch.Generator``. A run with tracking and one without give bit-identical losses.
"""
from __future__ import annotations

import csv
import json
import math
import platform
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ._tail import parse_tail
from .complexity import compression_complexity, spectral_entropies, spectral_entropy_penalty, weight_matrices, weight_norms
from .core import BACKENDS, LMNResult, lmn
from .figures import save_connectivity
from .grokfast import FILTERS, make_filter
from .model import (
    DEFAULT_LAYER,
    EMBEDDINGS,
    LAYERS,
    GrokMLP,
    representations,
    scale_init,
)
from .tasks import TASKS, Task, make_task

#: columns always present in the logs; ``lmn_<layer>`` columns follow
BASE_COLUMNS = ("step", "train_loss", "train_acc", "test_loss", "test_acc", "l2", "lmn", "time_s")
#: test accuracy that counts as generalized
GENERALIZED_ACC = 0.99
#: default ``save_connectivity``: init, the two phase boundaries and the end
SNAPSHOT_DEFAULT = ("0", "memorization", "generalization", "final")
SNAPSHOT_EVENTS = ("memorization", "generalization", "final")
#: the trainer's compression-complexity grid (7 bin sizes x 4 rank fractions, ~1.6 s per evaluation on the
#: paper's model on one CPU core); ``grokfast_metrics.complexity`` has the finer default grid
COMPLEXITY_BINS = tuple(2.0**-k for k in range(12, -1, -2))
COMPLEXITY_RANK_FRACTIONS = (1.0, 0.9, 0.7, 0.5)


@dataclass
class TrainConfig:
    """Everything that defines a run. ``None`` fields are resolved from the device (see :meth:`resolved`).

    Attributes:
        task: ``"add"``, ``"s4"`` or ``"xor"``.
        steps: optimizer steps (paper: 20,000).
        lr, weight_decay: AdamW settings (paper: 1e-3, 0.2).
        train_fraction: fraction of all inputs used for training (paper: 0.8).
        seed: seed of the split and of the initialization.
        init_scale: Omnigrok ``alpha``: initial parameters are multiplied by it.
        embed_dim, hidden: widths (paper: 32, 100).
        embedding: ``"shared"`` (one table for both operands) or ``"separate"``.
        grokfast: gradient filter ``"none"``, ``"ema"`` or ``"ma"``.
        ema_alpha, ema_lamb, ma_window, ma_lamb: filter settings (Grokfast defaults).
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        lmn_every: LMN every k steps; 0 disables tracking. ``None``: 1 on CUDA, 100 on CPU.
        lmn_early: also compute LMN at the log-spaced steps ``floor(1.5 ** k) < lmn_every`` (about 11
            extra evaluations at every=100) so the memorization phase is resolved on a log axis.
        probe: probe set: ``"all"``, ``"train"``, ``"test"`` or an int n (seeded subset of all inputs).
            ``None``: ``"all"`` on CUDA, 256 on CPU.
        probe_seed: seed of the probe subset (own generator).
        lmn_layers: layers to track (first one is the ``lmn`` column), from :data:`LAYERS`.
        n_lambda: interpolation points per pair (paper: 21).
        lmn_backend: backend passed to ``grokfast_metrics.lmn``.
        spectral_entropy_weight: weight of the spectral-entropy penalty added to the training loss (DeMoss et
            al.); 0 = off. ``train_loss`` in the logs stays the plain cross-entropy.
        complexity: when to compute the compression-based complexity (costlier than LMN): ``"off"``,
            ``"log"`` (steps 0 and powers of two, plus the last step) or every k steps as a digit string.
        complexity_eps: loss tolerances of the compression complexity (one ``complexity_bits_eps<e>`` column each).
        save_connectivity: steps at which to save the connectivity matrix of the first tracked layer under
            ``connectivity/`` (for Figure 4): integers and/or ``"memorization"``, ``"generalization"``, ``"final"``.
        log_every: write a row every k steps (LMN steps and key steps always). ``None``: 1 on CUDA, 10 on CPU.
        threads: torch CPU threads during the run (restored afterwards). ``None``: 1 on CPU (the model is
            tiny; on a shared 2-core machine 2 threads measured 6-20x slower than 1), unchanged on CUDA.
    """

    task: str = "add"
    steps: int = 20_000
    lr: float = 1e-3
    weight_decay: float = 0.2
    train_fraction: float = 0.8
    seed: int = 0
    init_scale: float = 1.0
    embed_dim: int = 32
    hidden: int = 100
    embedding: str = "shared"
    grokfast: str = "none"
    ema_alpha: float = 0.98
    ema_lamb: float = 2.0
    ma_window: int = 100
    ma_lamb: float = 5.0
    device: str = "auto"
    lmn_every: int | None = None
    lmn_early: bool = True
    probe: str | int | None = None
    probe_seed: int = 0
    lmn_layers: list[str] = field(default_factory=lambda: [DEFAULT_LAYER])
    n_lambda: int = 21
    lmn_backend: str = "auto"
    spectral_entropy_weight: float = 0.0
    complexity: str = "log"
    complexity_eps: list[float] = field(default_factory=lambda: [1e-3, 1e-2, 1e-1])
    save_connectivity: list[str] = field(default_factory=lambda: list(SNAPSHOT_DEFAULT))
    log_every: int | None = None
    threads: int | None = None

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1; got {self.steps}")
        if not 0.0 < self.train_fraction < 1.0:
            raise ValueError(f"train fraction must be in (0, 1); got {self.train_fraction}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number; got {self.lr}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"weight decay must be >= 0; got {self.weight_decay}")
        if not (self.init_scale > 0 and math.isfinite(self.init_scale)):
            raise ValueError(f"init scale must be a positive number; got {self.init_scale}")
        if self.embedding not in EMBEDDINGS:
            raise ValueError(f"embedding must be one of {', '.join(EMBEDDINGS)}; got {self.embedding!r}")
        if self.grokfast not in FILTERS:
            raise ValueError(f"grokfast filter must be one of {', '.join(FILTERS)}; got {self.grokfast!r}")
        make_filter(self.grokfast, ema_alpha=self.ema_alpha, ema_lamb=self.ema_lamb, ma_window=self.ma_window, ma_lamb=self.ma_lamb)
        if self.lmn_every is not None and self.lmn_every < 0:
            raise ValueError(f"lmn_every must be >= 0 (0 disables tracking); got {self.lmn_every}")
        if self.log_every is not None and self.log_every < 1:
            raise ValueError(f"log_every must be >= 1; got {self.log_every}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1; got {self.threads}")
        if not self.lmn_layers:
            raise ValueError("lmn_layers is empty; give at least one layer")
        for layer in self.lmn_layers:
            if layer not in LAYERS:
                raise ValueError(f"unknown LMN layer {layer!r}; choose from {', '.join(LAYERS)}")
        if len(set(self.lmn_layers)) != len(self.lmn_layers):
            raise ValueError(f"lmn_layers has duplicates: {self.lmn_layers}")
        if self.n_lambda < 3:
            raise ValueError(f"n_lambda must be >= 3; got {self.n_lambda}")
        if not (self.spectral_entropy_weight >= 0 and math.isfinite(self.spectral_entropy_weight)):
            raise ValueError(f"spectral entropy weight must be >= 0; got {self.spectral_entropy_weight}")
        complexity_steps(self.complexity, 1)
        if not self.complexity_eps or any(not (e >= 0 and math.isfinite(e)) for e in self.complexity_eps):
            raise ValueError(f"complexity eps must be a non-empty list of numbers >= 0; got {self.complexity_eps}")
        for s in self.save_connectivity:
            if s not in SNAPSHOT_EVENTS and not (str(s).isdigit()):
                raise ValueError(f"save-connectivity steps must be integers >= 0 or one of {', '.join(SNAPSHOT_EVENTS)}; got {s!r}")
        if self.lmn_backend not in BACKENDS:
            raise ValueError(f"LMN backend must be one of {', '.join(BACKENDS)}; got {self.lmn_backend!r}")
        parse_probe(self.probe if self.probe is not None else "all")
        resolve_device(self.device)

    def resolved(self) -> TrainConfig:
        """A copy with device-dependent defaults filled in (after :meth:`validate`)."""
        dev = resolve_device(self.device)
        cuda = dev.type == "cuda"
        out = TrainConfig(**asdict(self))
        out.device = str(dev)
        if out.lmn_every is None:
            out.lmn_every = 1 if cuda else 100
        if out.probe is None:
            out.probe = "all" if cuda else 256
        out.probe = parse_probe(out.probe)
        if out.log_every is None:
            out.log_every = 1 if cuda else 10
        if out.threads is None and not cuda:
            out.threads = 1
        return out


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA if available else CPU; otherwise ``torch.device(device)``, checked to exist.

    Raises:
        ValueError: unparsable device, or CUDA asked for but not available.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"bad device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for but CUDA is not available; use --device cpu")
    return dev


def parse_probe(probe: str | int) -> str | int:
    """``"all"``/``"train"``/``"test"`` or a subset size n >= 2 (int or digit string).

    Raises:
        ValueError: anything else.
    """
    if isinstance(probe, str) and probe in ("all", "train", "test"):
        return probe
    try:
        n = int(probe)
    except (TypeError, ValueError):
        raise ValueError(f"probe must be 'all', 'train', 'test' or a subset size n >= 2; got {probe!r}") from None
    if n < 2:
        raise ValueError(f"probe subset size must be >= 2; got {n}")
    return n


def lmn_steps_early(every: int, base: float = 1.5) -> set[int]:
    """Log-spaced steps ``floor(base ** k)`` below ``every`` (extra LMN points early in training)."""
    out, k = set(), 0
    while (s := int(base**k)) < every:
        out.add(s)
        k += 1
    return out


def complexity_steps(spec: str, steps: int) -> set[int]:
    """Steps at which the compression complexity runs: ``"off"``, ``"log"`` (0 and powers of two) or every k.

    Raises:
        ValueError: any other spec.
    """
    spec = str(spec)
    if spec == "off":
        return set()
    if spec == "log":
        out, k = {0}, 0
        while 2**k <= steps:
            out.add(2**k)
            k += 1
        return out
    if spec.isdigit() and int(spec) >= 1:
        return set(range(0, steps + 1, int(spec)))
    raise ValueError(f"complexity must be 'off', 'log' or a step interval >= 1; got {spec!r}")


def weight_columns(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """Column names of the per-layer norms (``l2_<module>``, ``l2_last``) and effective ranks (``erank_<linear>``)."""
    norms = [f"l2_{name}" for name in weight_norms(model)["layers"]] + ["l2_last"]
    ranks = [f"erank_{name}" for name in weight_matrices(model)]
    return norms, ranks


def weight_measures(model: torch.nn.Module, ranks: bool) -> dict[str, float]:
    """Per-layer L2 norms, the last layer's norm and (if ``ranks``) the effective rank of each Linear."""
    wn = weight_norms(model)
    row = {f"l2_{name}": v for name, v in wn["layers"].items()}
    row["l2_last"] = wn["last"]
    if ranks:
        row.update({f"erank_{name}": v["effective_rank"] for name, v in spectral_entropies(model).items()})
    return row


def probe_indices(task: Task, probe: str | int, seed: int) -> torch.Tensor:
    """Sorted indices of the probe inputs; a size-n subset of all inputs is drawn with its own generator.

    Raises:
        ValueError: subset size larger than the task.
    """
    if probe == "all":
        return torch.arange(task.n_inputs)
    if probe == "train":
        return task.train_idx.clone()
    if probe == "test":
        return task.test_idx.clone()
    n = int(probe)
    if n > task.n_inputs:
        raise ValueError(f"probe subset of {n} is larger than the task ({task.n_inputs} inputs); use --probe all")
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randperm(task.n_inputs, generator=gen)[:n].sort().values


def build_model(task: Task, cfg: TrainConfig, device: torch.device) -> GrokMLP:
    """The paper's MLP for ``task``, seeded by ``cfg.seed`` (global RNG state is restored afterwards)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = GrokMLP(task.n_tokens, task.n_classes, cfg.embed_dim, cfg.hidden, cfg.embedding)
    scale_init(model, cfg.init_scale)
    return model.to(device)


class MetricsLog:
    """Append-only ``metrics.jsonl`` + ``metrics.csv`` with periodic flushing.

    Args:
        run_dir: directory to write into (created by the caller).
        columns: CSV header.
        flush_s: flush at most this often (and always on :meth:`close`).
    """

    def __init__(self, run_dir: Path, columns: list[str], flush_s: float = 1.0):
        self.columns = columns
        self.flush_s = flush_s
        self._jsonl = open(run_dir / "metrics.jsonl", "w", encoding="utf-8")
        self._csv_file = open(run_dir / "metrics.csv", "w", encoding="utf-8", newline="")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=columns, extrasaction="raise")
        self._csv.writeheader()
        self._last_flush = time.perf_counter()
        self.rows: list[dict] = []

    def write(self, row: dict) -> None:
        """Write one row (keys must be a subset of ``columns``; missing ones are null)."""
        full = {c: row.get(c) for c in self.columns}
        self.rows.append(full)
        self._jsonl.write(json.dumps(full) + "\n")
        self._csv.writerow({c: ("" if v is None else v) for c, v in full.items()})
        now = time.perf_counter()
        if now - self._last_flush >= self.flush_s:
            self.flush()
            self._last_flush = now

    def flush(self) -> None:
        self._jsonl.flush()
        self._csv_file.flush()

    def close(self) -> None:
        if not self._jsonl.closed:
            self.flush()
            self._jsonl.close()
            self._csv_file.close()


@dataclass
class RunResult:
    """What :func:`train` returns. ``summary`` is also written to ``summary.json``."""

    run_dir: Path
    summary: dict
    rows: list[dict]
    interrupted: bool


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def track_lmn(model: GrokMLP, x_probe: torch.Tensor, layers: list[str], n_lambda: int = 21,
              backend: str = "auto") -> dict[str, LMNResult]:
    """LMN of the probe inputs at each of ``layers`` (no grad, RNG and modes untouched).

    Args:
        model: the network.
        x_probe: ``(N, 2)`` probe operands on the model's device.
        layers: layer names from :data:`~grokfast_metrics.model.LAYERS`.

    Returns:
        ``{layer: LMNResult}`` (``.lmn``, ``.connectivity``, ...).
    """
    reps = representations(model, x_probe, layers)
    return {layer: lmn(h, tail, n_lambda, backend) for layer, (h, tail) in reps.items()}


def _lmn_at(rows: list[dict], step: int | None, key: str = "lmn") -> tuple[int, float] | None:
    """(step, lmn) of the first tracked row at or after ``step``."""
    if step is None:
        return None
    for r in rows:
        if r["step"] >= step and r.get(key) is not None:
            return r["step"], r[key]
    return None


def summarize(rows: list[dict], cfg: TrainConfig, memorization_step: int | None, generalization_step: int | None,
              timings: dict, interrupted: bool, steps_done: int) -> dict:
    """Summary dict: key steps, LMN at init / peak / memorization / generalization / end, timings."""
    tracked = [r for r in rows if r.get("lmn") is not None]
    peak = max(tracked, key=lambda r: r["lmn"]) if tracked else None
    last = rows[-1] if rows else {}

    def at(step):
        hit = _lmn_at(rows, step)
        return None if hit is None else {"step": hit[0], "lmn": hit[1]}

    return {
        "task": cfg.task,
        "steps_done": steps_done,
        "steps_planned": cfg.steps,
        "interrupted": interrupted,
        "memorization_step": memorization_step,
        "generalization_step": generalization_step,
        "final_train_acc": last.get("train_acc"),
        "final_test_acc": last.get("test_acc"),
        "final_l2": last.get("l2"),
        "lmn_layer": cfg.lmn_layers[0],
        "lmn_probe": cfg.probe,
        "lmn_init": at(0),
        "lmn_peak": None if peak is None else {"step": peak["step"], "lmn": peak["lmn"]},
        "lmn_at_memorization": at(memorization_step),
        "lmn_at_generalization": at(generalization_step),
        "lmn_final": None if not tracked else {"step": tracked[-1]["step"], "lmn": tracked[-1]["lmn"]},
        "lmn_evaluations": len(tracked),
        "timings_s": timings,
    }


def train(cfg: TrainConfig, run_dir: str | Path, *, progress: bool = True, plot: bool = True) -> RunResult:
    """Run one training job and write its logs, summary and plot into ``run_dir``.

    Ctrl-C (``KeyboardInterrupt``) stops training early; the logs, summary and plot of the steps
    that ran are still written and ``RunResult.interrupted`` is True.

    Args:
        cfg: configuration (validated here; device defaults resolved).
        run_dir: output directory (created if missing; existing logs in it are overwritten).
        progress: show a tqdm progress bar on stderr.
        plot: write ``curves.png``.

    Returns:
        :class:`RunResult`.

    Raises:
        ValueError: invalid configuration or probe.
        OSError: ``run_dir`` cannot be created or written.
    """
    cfg.validate()
    cfg = cfg.resolved()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    threads_before = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, run_dir, progress, plot)
    finally:
        torch.set_num_threads(threads_before)


def _run(cfg: TrainConfig, run_dir: Path, progress: bool, plot: bool) -> RunResult:
    device = torch.device(cfg.device)

    task = make_task(cfg.task, cfg.train_fraction, cfg.seed)
    probe_idx = probe_indices(task, cfg.probe, cfg.probe_seed)
    model = build_model(task, cfg, device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    grad_filter = make_filter(cfg.grokfast, ema_alpha=cfg.ema_alpha, ema_lamb=cfg.ema_lamb, ma_window=cfg.ma_window, ma_lamb=cfg.ma_lamb)

    x, y = task.x.to(device), task.y.to(device)
    x_tr, y_tr = x[task.train_idx.to(device)], y[task.train_idx.to(device)]
    x_te, y_te = x[task.test_idx.to(device)], y[task.test_idx.to(device)]
    x_probe = x[probe_idx.to(device)]
    n_tr, n_te = len(task.train_idx), len(task.test_idx)
    layers = list(cfg.lmn_layers)
    tracking = cfg.lmn_every > 0
    early = lmn_steps_early(cfg.lmn_every) if tracking and cfg.lmn_early else set()

    meta = {
        "config": asdict(cfg),
        "n_inputs": task.n_inputs, "n_train": n_tr, "n_test": n_te, "n_classes": task.n_classes,
        "n_probe": len(probe_idx), "lmn_early_steps": sorted(early), "n_params": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(), "argv": sys.argv,
    }
    (run_dir / "config.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    for layer in layers:
        if parse_tail(model.tail(layer)).is_affine:
            warnings.warn(f"LMN at {layer}: the tail from there to the logits is affine, so its LMN is 1 at every step "
                          "(see docs/lmn.md, 'Which layer')", stacklevel=2)
    norm_cols, rank_cols = weight_columns(model)
    cx_steps = complexity_steps(cfg.complexity, cfg.steps) | ({cfg.steps} if cfg.complexity != "off" else set())
    cx_cols = [f"complexity_bits_eps{e:g}" for e in cfg.complexity_eps]
    snap_steps = {int(s) for s in cfg.save_connectivity if str(s).isdigit()}
    snap_events = {s for s in cfg.save_connectivity if s in SNAPSHOT_EVENTS}
    cx_loss = lambda m: float(F.cross_entropy(m(x_tr), y_tr))

    columns = list(BASE_COLUMNS) + [f"lmn_{layer}" for layer in layers] + norm_cols + rank_cols + cx_cols
    log = MetricsLog(run_dir, columns)
    timings = {"train": 0.0, "lmn": 0.0, "complexity": 0.0, "log": 0.0}  # complexity: also norms and ranks
    mem_step = gen_step = None
    interrupted = False
    step = 0
    start = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, desc=f"{cfg.task}", unit="step", dynamic_ncols=True, mininterval=0.5)
    last_postfix = 0.0
    last_lmn: float | None = None
    pending: dict | None = None  # metrics of the current step, written on interrupt if not logged yet

    try:
        for step in range(cfg.steps + 1):
            t0 = time.perf_counter()
            final = step == cfg.steps
            model.train()
            logits = model(x_tr)
            loss = F.cross_entropy(logits, y_tr)
            if not final:
                opt.zero_grad(set_to_none=True)
                if cfg.spectral_entropy_weight > 0:
                    (loss + cfg.spectral_entropy_weight * spectral_entropy_penalty(model)).backward()
                else:
                    loss.backward()
            with torch.no_grad():
                te_logits = model(x_te)
                stats = torch.stack([
                    loss.detach(),
                    (logits.argmax(1) == y_tr).sum().to(loss.dtype),
                    F.cross_entropy(te_logits, y_te),
                    (te_logits.argmax(1) == y_te).sum().to(loss.dtype),
                    torch.stack(torch._foreach_norm([p.detach() for p in model.parameters()])).norm(),
                ]).tolist()
            tr_loss, tr_correct, te_loss, te_correct, l2 = stats
            tr_acc, te_acc = tr_correct / n_tr, te_correct / n_te
            key = False
            if mem_step is None and tr_correct == n_tr:
                mem_step, key = step, True
            if gen_step is None and te_acc >= GENERALIZED_ACC:
                gen_step, key = step, True
            pending = {"step": step, "train_loss": tr_loss, "train_acc": tr_acc, "test_loss": te_loss,
                       "test_acc": te_acc, "l2": l2}
            t1 = time.perf_counter()
            timings["train"] += t1 - t0

            row = None
            events = {e for e, hit in (("memorization", step == mem_step), ("generalization", step == gen_step),
                                       ("final", final)) if hit}
            snap = step in snap_steps or bool(events & snap_events)
            if tracking and (step % cfg.lmn_every == 0 or final or key or step in early or snap):
                res = track_lmn(model, x_probe, layers, cfg.n_lambda, cfg.lmn_backend)
                _sync(device)
                row = {f"lmn_{layer}": r.lmn for layer, r in res.items()}
                row["lmn"] = last_lmn = res[layers[0]].lmn
                if snap:
                    save_connectivity(run_dir, step, layers[0], res[layers[0]].connectivity, last_lmn)
            t2 = time.perf_counter()
            timings["lmn"] += t2 - t1
            if step in cx_steps:
                cc = compression_complexity(model, cx_loss, cfg.complexity_eps, COMPLEXITY_BINS, COMPLEXITY_RANK_FRACTIONS)
                row = row or {}
                row.update({f"complexity_bits_eps{e:g}": b for e, b in cc.bits.items()})
            logged = row is not None or key or final or step % cfg.log_every == 0
            if logged:  # norms / effective ranks of the same weights as the rest of the row
                pending.update(weight_measures(model, ranks=(row is not None and "lmn" in row) or final))
            t1b = time.perf_counter()
            timings["complexity"] += t1b - t2
            t2 = t1b

            if not final:
                if grad_filter is not None:
                    grad_filter(model)
                opt.step()
            t3 = time.perf_counter()
            timings["train"] += t3 - t2

            if logged:
                row = row or {}
                row.update(pending, time_s=round(t3 - start, 4))
                log.write(row)
                pending = None
            if bar is not None:
                if not final:
                    bar.update(1)
                if t3 - last_postfix > 0.5 or final:
                    last_postfix = t3
                    lm = "-" if last_lmn is None else f"{last_lmn:.2f}"
                    bar.set_postfix_str(f"loss {tr_loss:.3g}/{te_loss:.3g} acc {tr_acc:.3f}/{te_acc:.3f} LMN {lm}", refresh=False)
            timings["log"] += time.perf_counter() - t3
    except KeyboardInterrupt:
        interrupted = True
        if pending is not None and (not log.rows or log.rows[-1]["step"] < pending["step"]):
            log.write({**pending, "time_s": round(time.perf_counter() - start, 4)})
    finally:
        if bar is not None:
            bar.close()
        log.close()

    timings = {k: round(v, 3) for k, v in timings.items()}
    timings["total"] = round(time.perf_counter() - start, 3)
    rows = log.rows
    steps_done = rows[-1]["step"] if rows else 0
    summary = summarize(rows, cfg, mem_step, gen_step, timings, interrupted, steps_done)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if plot and rows:
        from .plots import plot_curves

        plot_curves(rows, run_dir / "curves.png", summary=summary, layers=layers)
    return RunResult(run_dir, summary, rows, interrupted)
