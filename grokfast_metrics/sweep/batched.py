"""Batched runs (``grokfast-metrics sweep --batched``): runs that share an architecture and task, trained together
in one process as one stack of models.

Each run is set up exactly as :func:`grokfast_metrics.experiment.trainer.train` sets it up
(:func:`~grokfast_metrics.experiment.trainer.setup`:
the same seeded model, split, probe, schedule, tracker and log), then the models are stacked with
``torch.func.stack_module_state`` and trained with ``vmap`` over ``functional_call``: one forward/backward and
one AdamW update for the whole stack per step, with each model's learning rate, weight decay and epsilon as
tensors (its init scale and seed are in its stacked initial weights, its data split in its stacked data). Each
run's own module keeps *views* of its slice of the stack, so everything measured on a run (LMN through the
trainer's tracker, norms, ranks, compression complexity) runs on that module with the trainer's own code, and
each run writes the same run directory and ``metrics.jsonl`` rows as ``train`` does. LMN is computed per model
of the stack (a loop over the fused kernel: ``gm.lmn`` takes one tail).

What may differ between the runs of one stack is :data:`PER_MODEL`; every other option must be equal
(:func:`stack_key`). Runs that cannot be stacked (:func:`unstackable_reason`) run one by one.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

from ..experiment.config import TrainConfig
from ..experiment.run import Run, RunResult
from ..experiment.runlog import prepare_run_dir
from ..experiment.trainctl import Timer, _Signals
from ..experiment.trainer import (
    EXIT_SIGINT,
    EXIT_SIGTERM,
    _finish,
    _Stop,
    measure,
    nonfinite_stop,
    setup,
    step_metrics,
    write_row,
)
from .grid import Run as GridRun

#: options that may differ between the runs of one stack; all others must be equal
PER_MODEL = frozenset(
    {
        "seed",
        "lr",
        "weight_decay",
        "adam_eps",
        "init_scale",
        "probe",
        "probe_seed",
        "collapse_fraction",
        "collapse_spike",
        "lmn_every",
        "lmn_early",
        "lmn_layers",
        "n_lambda",
        "lmn_backend",
        "complexity",
        "complexity_eps",
        "save_connectivity",
        "log_every",
    }
)
#: AdamW's betas (torch's defaults, as the trainer's ``torch.optim.AdamW``)
BETAS = (0.9, 0.999)


def unstackable_reason(cfg: TrainConfig) -> str | None:
    """Why a run cannot be trained in a stack (``None``: it can)."""
    if cfg.model != "mlp":
        return f"--model {cfg.model} is not stacked (only the mlp is)"
    if cfg.spectral_entropy_weight > 0:
        return "--spectral-entropy-weight (a per-model SVD penalty in the loss) is not stacked"
    if cfg.checkpoint_every:
        return "--checkpoint-every (checkpoints of one run) is not supported in a stack"
    if cfg.lmn_async:
        return "--lmn-async (one eigen thread per run) is not stacked"
    return None


def stack_key(cfg: TrainConfig) -> tuple:
    """Runs with equal keys can share a stack: every option outside :data:`PER_MODEL`."""
    return tuple((k, repr(v)) for k, v in sorted(asdict(cfg).items()) if k not in PER_MODEL)


class Stack:
    """The stacked parameters of the models of ``runs``, their stacked data, hyperparameters and AdamW state.

    After construction each run's ``model`` holds views of its slice of the stack: the stack's in-place
    updates are what the run's module reads.
    """

    def __init__(self, runs: list[Run]):
        models = [r.model for r in runs]
        self.params, self.buffers = stack_module_state(models)
        for i, model in enumerate(models):
            for name, p in model.named_parameters():
                p.data = self.params[name].data[i]
        self.skeleton = copy.deepcopy(models[0]).to("meta")
        self.data = {k: torch.stack([r.data[k] for r in runs]) for k in ("x_tr", "y_tr", "x_te", "y_te")}
        first = next(iter(self.params.values()))
        shape = lambda p: (len(runs),) + (1,) * (p.dim() - 1)
        hyper = {k: torch.tensor([float(getattr(r.cfg, k)) for r in runs], dtype=torch.float64) for k in ("lr", "weight_decay", "adam_eps")}
        # the scalars torch's single-tensor AdamW forms in Python floats, here per model (rounded once to the dtype)
        self.decay = {n: (1 - hyper["lr"] * hyper["weight_decay"]).to(first).view(shape(p)) for n, p in self.params.items()}
        self.lr = {n: hyper["lr"].view(shape(p)) for n, p in self.params.items()}
        self.eps = {n: hyper["adam_eps"].to(first).view(shape(p)) for n, p in self.params.items()}
        self.exp_avg = {n: torch.zeros_like(p, memory_format=torch.preserve_format) for n, p in self.params.items()}
        self.exp_avg_sq = {n: torch.zeros_like(p, memory_format=torch.preserve_format) for n, p in self.params.items()}
        self.updates = 0
        self.grad_filter = runs[0].grad_filter  # the same filter settings for the stack (stack_key)

    def _logits(self, params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.skeleton, (params, buffers), (x,))

    def forward_backward(self, final: bool) -> list[list[float]]:
        """Each model's loss and gradients (not at the ``final`` step); per model the statistics that
        :func:`grokfast_metrics.experiment.trainer.forward_backward` computes, in its order."""
        d, forward = self.data, vmap(self._logits)
        logits = forward(self.params, self.buffers, d["x_tr"])
        loss = vmap(F.cross_entropy)(logits, d["y_tr"])
        if not final:
            for p in self.params.values():
                p.grad = None
            loss.sum().backward()  # the models share no parameter: each gets the gradient of its own loss
        with torch.no_grad():
            te_logits = forward(self.params, self.buffers, d["x_te"])
            p_correct = torch.softmax(logits.detach(), 2).gather(2, d["y_tr"][..., None])
            norms = torch.stack([p.detach().flatten(1).norm(dim=1) for p in self.params.values()])
            stats = torch.stack(
                [
                    loss.detach(),
                    (logits.argmax(2) == d["y_tr"]).sum(1).to(loss.dtype),
                    vmap(F.cross_entropy)(te_logits, d["y_te"]),
                    (te_logits.argmax(2) == d["y_te"]).sum(1).to(loss.dtype),
                    norms.norm(dim=0),
                    (p_correct == 1).sum((1, 2)).to(loss.dtype),
                ],
                dim=1,
            )
        return stats.tolist()

    @torch.no_grad()
    def optimizer_step(self) -> None:
        """The Grokfast filter (if any) on the stacked gradients, then one AdamW update of the stack: torch's
        single-tensor AdamW, operation for operation, with per-model learning rate, weight decay and epsilon."""
        if self.grad_filter is not None:
            self.grad_filter(list(self.params.items()))
        self.updates += 1
        beta1, beta2 = BETAS
        bias_correction1 = 1 - beta1**self.updates
        bias_correction2_sqrt = (1 - beta2**self.updates) ** 0.5
        for name, p in self.params.items():
            grad, exp_avg, exp_avg_sq = p.grad, self.exp_avg[name], self.exp_avg_sq[name]
            p.mul_(self.decay[name])
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps[name])
            step_size = (-self.lr[name] / bias_correction1).to(p)
            p.add_(step_size * exp_avg / denom)  # addcdiv_'s order: self + value * t1 / t2


def _step(stack: Stack, runs: dict[int, Run], step: int, final: bool, stops: dict[int, _Stop], pending: dict[int, dict]) -> None:
    """One step of every live run: the stack's forward/backward, each run's metrics and measurements, the
    stack's update, each run's row. A run whose loss or norm is not finite stops (its row is written)."""
    timer = next(iter(runs.values())).timer
    with timer("train"):
        stats = stack.forward_backward(final)
    rows = {}
    for i, run in runs.items():
        metrics, events = step_metrics(run, step, stats[i])
        pending[i] = metrics
        stops_here = nonfinite_stop(metrics)
        if stops_here is not None:
            stops[i] = stops_here
            continue
        rows[i] = (measure(run, step, run.schedule.due(step, events), events, metrics), metrics)
    with timer("train"):
        if not final:
            stack.optimizer_step()
    now = time.perf_counter()
    with timer("log"):
        for i, (row, metrics) in rows.items():
            if row is not None:
                write_row(runs[i], row, metrics, now)
                pending.pop(i)
        for i in set(stops) & set(runs):
            write_row(runs[i], {}, pending.pop(i), now)


def _loop(stack: Stack, runs: list[Run], signals: _Signals) -> dict[int, _Stop]:
    """Steps 0 to ``steps`` of the stack; returns why runs stopped early (by index; absent: completed)."""
    stops: dict[int, _Stop] = {}
    pending: dict[int, dict] = {}
    try:
        for step in range(runs[0].cfg.steps + 1):
            live = {i: r for i, r in enumerate(runs) if i not in stops}
            if not live:
                break
            _step(stack, live, step, step == runs[0].cfg.steps, stops, pending)
    except KeyboardInterrupt:
        name = signals.received[0] if signals.received else "SIGINT"
        with signals.deferred():
            for i, run in enumerate(runs):
                if i in stops:
                    continue
                stops[i] = _Stop(f"interrupted ({name})", EXIT_SIGTERM if name == "SIGTERM" else EXIT_SIGINT)
                if i in pending and (not run.log.rows or run.log.rows[-1]["step"] < pending[i]["step"]):
                    write_row(run, {}, pending[i], time.perf_counter())
    return stops


def train_stack(
    cfgs: list[TrainConfig], run_dirs: list[str | Path], *, plot: bool = True, overwrite: bool = False
) -> list[RunResult | Exception]:
    """Train the runs of ``cfgs`` as one stack, each into its directory, as :func:`~grokfast_metrics.experiment.trainer.train` would.

    A run whose setup fails (e.g. a probe larger than the task) gets its exception in the result list and
    the others go on. ``summary.json``'s timings (and ``time_s``) are the stack's, shared by its runs.

    Raises:
        ValueError: the configurations cannot share a stack (:func:`stack_key`, :func:`unstackable_reason`).
        RunDirError: a directory holds a run and ``overwrite`` is False (nothing is trained).
    """
    cfgs = [c.resolved() for c in _checked(cfgs)]
    for d in run_dirs:
        prepare_run_dir(d, overwrite=overwrite)
    threads_before = torch.get_num_threads()
    if cfgs[0].threads is not None:
        torch.set_num_threads(cfgs[0].threads)
    try:
        with _Signals() as signals:
            results: list[RunResult | Exception] = []
            runs: list[Run] = []
            for cfg, d in zip(cfgs, run_dirs):
                try:
                    runs.append(setup(cfg, Path(d)))
                    results.append(None)
                except Exception as e:  # this run fails; the stack goes on without it
                    results.append(e)
            if runs:
                finished = iter(_train(runs, plot, signals))
                results = [next(finished) if r is None else r for r in results]
            return results
    finally:
        torch.set_num_threads(threads_before)


def _checked(cfgs: list[TrainConfig]) -> list[TrainConfig]:
    if not cfgs:
        raise ValueError("no runs to stack")
    for c in cfgs:
        c.validate()
        reason = unstackable_reason(c)
        if reason is not None:
            raise ValueError(f"cannot stack: {reason}")
    if len({stack_key(c) for c in cfgs}) > 1:
        raise ValueError(f"cannot stack runs whose options differ outside {', '.join(sorted(PER_MODEL))}")
    return cfgs


def _train(runs: list[Run], plot: bool, signals: _Signals) -> list[RunResult]:
    timer, start = Timer(runs[0].timer.device), time.perf_counter()
    for run in runs:
        run.timer, run.start = timer, start
    try:
        stops = _loop(Stack(runs), runs, signals)
    finally:
        for run in runs:
            run.log.close()
    return [_finish(run, stops.get(i), plot, signals) for i, run in enumerate(runs)]


def plan_stacks(runs: list[GridRun], workers: int) -> tuple[list[list[GridRun]], list[str]]:
    """The tasks of a batched sweep and what to tell the user about them.

    Runs with equal :func:`stack_key` form a group; each group is cut into stacks of at most
    ``ceil(stackable runs / workers)`` runs (so that every worker gets a stack); a run that cannot be
    stacked is a task of its own and is trained one by one (the message says why).
    """
    tasks: list[list[GridRun]] = []
    notes: list[str] = []
    groups: dict[tuple, list[GridRun]] = {}
    for run in runs:
        reason = unstackable_reason(run.config)
        if reason is None:
            groups.setdefault(stack_key(run.config), []).append(run)
        else:
            tasks.append([run])
            notes.append(f"--batched: {run.name} runs one by one: {reason}")
    stackable = sum(len(g) for g in groups.values())
    size = max(1, math.ceil(stackable / max(1, workers)))
    for group in groups.values():
        pieces = math.ceil(len(group) / size)
        tasks += [group[k::pieces] for k in range(pieces)]
    if len(groups) > 1:
        notes.append(
            f"--batched: the runs differ in options that cannot vary within a stack (only "
            f"{', '.join(sorted(PER_MODEL))} can): {len(groups)} groups trained as separate stacks"
        )
    stacks = [len(t) for t in tasks if len(t) > 1]
    notes.append(
        f"--batched: {sum(stacks)} runs in {len(stacks)} stacks of {', '.join(map(str, stacks)) or '-'}; "
        f"{len(tasks) - len(stacks)} run(s) one by one"
    )
    return tasks, notes
