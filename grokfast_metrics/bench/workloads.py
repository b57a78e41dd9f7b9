"""What the benchmarks run: seeded tails and inputs of the paper's shapes, and a training step.

:func:`mlp_tail` / :func:`make_tail` are the library's one builder of a seeded MLP tail;
:func:`addition_training` is the paper's MLP (:class:`grokfast_metrics.experiment.model.GrokMLP`, shared
embedding) on addition mod 31 (:func:`grokfast_metrics.experiment.tasks.make_task`), used for the training
overhead of tracking the LMN.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import torch
from torch import nn

from ..compute import core
from ..experiment.model import GrokMLP, representation
from ..experiment.tasks import make_task
from .harness import Timing, time_fn

#: training fraction of the overhead benchmark (480 of the 961 addition inputs)
TRAIN_FRACTION = 0.5
#: the layer whose LMN the overhead benchmark tracks
TRACKED_LAYER = "hidden1_post"


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Run the block with the global CPU RNG seeded with ``seed`` and restore it after (no-op for ``None``)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def mlp_tail(
    widths: Sequence[int],
    act: Callable[[], nn.Module] = nn.SiLU,
    *,
    bias: bool = True,
    final_act: Callable[[], nn.Module] | None = None,
    seed: int | None = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> nn.Sequential:
    """``Linear(w0, w1) -> act -> Linear(w1, w2) -> act ... -> Linear(w_k-1, w_k)`` with torch's default init.

    Args:
        widths: layer widths, input first, at least two.
        act: factory of the activation between Linears (``nn.SiLU``, ``lambda: nn.LeakyReLU(0.1)``...).
        bias: whether the Linears have a bias.
        final_act: factory of an activation after the last Linear (none by default).
        seed: the parameters are drawn with the global RNG seeded with it and the RNG is restored after;
            ``None`` draws from the global RNG as it is.
        dtype: parameter dtype.
        device: parameter device.

    Raises:
        ValueError: fewer than two widths or a width < 1.
    """
    if len(widths) < 2 or min(widths) < 1:
        raise ValueError(f"widths must be >= 2 sizes, each >= 1; got {list(widths)}")
    layers: list[nn.Module] = []
    with seeded(seed):
        for k, (a, b) in enumerate(pairwise(widths)):
            if k:
                layers.append(act())
            layers.append(nn.Linear(a, b, bias=bias))
    if final_act is not None:
        layers.append(final_act())
    return nn.Sequential(*layers).to(device=device, dtype=dtype)


def make_tail(hidden: int, out: int, depth: int = 1, seed: int = 0, device: torch.device | str = "cpu") -> nn.Sequential:
    """Paper-shaped fp32 tail from the first hidden layer: ``depth`` x (Linear(H,H), SiLU), then Linear(H,O).

    ``depth=1`` is the default tail ``Linear(H,H) -> SiLU -> Linear(H,O)``; ``h`` has ``H`` features.
    Seeded with ``seed``; the global RNG is left as it was.

    Raises:
        ValueError: ``depth < 1`` or a size < 1.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1; got {depth}")
    return mlp_tail([hidden] * (depth + 1) + [out], seed=seed, device=device)


def make_inputs(n: int, hidden: int, seed: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(n, hidden)`` fp32 representations, post-SiLU-like (``silu(2 x)``, ``x ~ N(0,1)``); row ``i`` does not depend on ``n``."""
    x = torch.from_numpy(np.random.default_rng(seed).standard_normal((n, hidden))).float()  # row-major draws
    return torch.nn.functional.silu(2.0 * x).to(device)


#: the lowered transformer tail of the GPU day (the target shape of docs/targets.md): Nanda's 1-layer transformer, p = 113
TRANSFORMER_TAIL = dict(p=113, d_model=128, d_mlp=512)


def transformer_residuals(n: int, p: int = 113, d_model: int = 128, d_mlp: int = 512, seed: int = 0):
    """``(model, x, h)``: a seeded :class:`~grokfast_metrics.transformer.GrokTransformer` (``p`` tokens and classes), ``n``
    operand pairs ``x`` ``(n, 2)`` (a seeded permutation of all ``p^2``, repeated when ``n > p^2``: repeated rows are
    identical samples, ``L = 1``) and ``h`` ``(n, 3 d_model)``: its residual stream at the LMN cut
    (``blocks.0.hook_resid_mid``, the three positions flattened), what ``lmn_at`` interpolates."""
    from ..experiment.transformer import GrokTransformer

    with seeded(seed), torch.no_grad():
        model = GrokTransformer(p, p, d_model=d_model, d_mlp=d_mlp)
        order = torch.randperm(p * p)
    idx = order[torch.arange(n) % (p * p)]
    x = torch.stack([idx // p, idx % p], dim=1)
    acts: list[torch.Tensor] = []
    hook = model.get_submodule("blocks.0.hook_resid_mid").register_forward_hook(lambda _m, _i, out: acts.append(out))
    try:
        with torch.no_grad():
            model(x)
    finally:
        hook.remove()
    return model, x, acts[0].reshape(n, -1)


@dataclass
class Workload:
    """What the timing stage measures: ``make(n, device) -> (h (n, D), tail)``, and its useful FLOP per pair.

    ``H``, ``O``, ``depth`` are the row fields (``H`` = width of the interpolated representation).
    """

    name: str
    make: Callable[[int, torch.device], tuple[torch.Tensor, nn.Module]]
    H: int
    O: int
    depth: int
    flop_per_pair: int


def transformer_tail_workload(n_lambda: int = 21) -> Workload:
    """The GPU day's lowered transformer tail (the hook of :func:`grokfast_metrics.bench.gpu_day_timing.workloads`).

    :func:`transformer_residuals` at :data:`TRANSFORMER_TAIL`'s sizes; the tail is what ``lmn_at``'s plan lowers the
    model to at ``blocks.0.hook_resid_mid`` (:mod:`grokfast_metrics.dropin.lower`: the last position, ``Linear(128, 512)``
    absorbed, ReLU, the folded ``113 x 512`` output matrix, the skip term ``lam (u_j - u_i)``): the C++ kernel runs it
    on the CPU, Triton v1 on CUDA, ``backend="torch"`` the generic path through the lowered module. Useful FLOP per
    pair: ``2 T d_mlp p`` (the output matrix, as for the MLP).
    """
    from ..dropin.plan import Plan
    from ..experiment.transformer import TRANSFORMER_LAYER

    sizes = TRANSFORMER_TAIL

    def make(n: int, device: torch.device):
        model, x, h = transformer_residuals(n, **sizes)
        plan = Plan(model, x[: min(n, 16)], at=TRANSFORMER_LAYER)
        with plan.running():
            plan.forward()  # builds the split tail and its lowering
        low = plan.lowering
        if low is None or low.tail is None:
            raise RuntimeError(f"the transformer tail did not lower: {None if low is None else low.reason}")
        return h.to(device), low.tail.to(device)

    d_mlp, p = sizes["d_mlp"], sizes["p"]
    return Workload("transformer", make, d_mlp, p, 1, 2 * n_lambda * d_mlp * p)


@dataclass
class TrainingWorkload:
    """The paper's MLP on addition mod 31, one full-batch AdamW step, and the LMN it would track.

    Attributes:
        model: ``GrokMLP(31, 31, embedding="shared")``.
        step: one full-batch AdamW step (lr 1e-3, weight decay 1) on the training inputs.
        x_track: ``(n_track, 2)`` inputs whose first-hidden-layer LMN is tracked.
        n_train: number of training inputs (480).
    """

    model: GrokMLP
    step: Callable[[], None]
    x_track: torch.Tensor
    n_train: int

    def track(self, backend: str = "auto", n_lambda: int = 21) -> core.LMNResult:
        """LMN of the first hidden layer's output (post-SiLU) on :attr:`x_track`, with ``backend``'s ``L``."""
        with torch.no_grad():
            h, tail = representation(self.model, self.x_track, TRACKED_LAYER)
            return core.lmn_from_connectivity(core.connectivity(h, tail, n_lambda, backend=backend))


def addition_training(device: torch.device | str, n_track: int = 961, seed: int = 0) -> TrainingWorkload:
    """:class:`TrainingWorkload` on ``device``: split and initialisation seeded with ``seed`` (global RNG left alone).

    The tracked inputs are the first ``n_track`` training inputs, then test inputs (all 961 when
    ``n_track >= 961``), in index order.
    """
    task = make_task("add", TRAIN_FRACTION, seed)
    with seeded(seed):
        model = GrokMLP(task.n_tokens, task.n_classes, embedding="shared")
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1.0)
    x, y = task.x.to(device), task.y.to(device)
    train = task.train_idx.to(device)
    xt, yt = x[train], y[train]
    track = torch.cat([task.train_idx, task.test_idx])[:n_track].sort().values

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()

    return TrainingWorkload(model, step, x[track.to(device)], int(train.numel()))


def train_overhead(
    device: torch.device,
    n_track: int = 961,
    steps: int = 5,
    backend: str = "auto",
    seed: int = 0,
    budget_s: float | None = None,
    n_lambda: int = 21,
) -> tuple[Timing, Timing]:
    """Time a training step of :func:`addition_training` without / with LMN tracking after it.

    Tracking computes the LMN (``backend``'s L, then ``core.lmn_from_connectivity``) of the first hidden
    layer's output on ``n_track`` of the 961 inputs after every step. Both steps are warmed up first.

    Returns:
        ``(plain, tracked)`` step timings.
    """
    work = addition_training(device, n_track, seed)

    def tracked_step() -> None:
        work.step()
        work.track(backend, n_lambda)

    work.step()
    tracked_step()  # warm-up both (allocations, kernel compilation)
    plain = time_fn(work.step, device, steps)
    tracked = time_fn(tracked_step, device, steps, budget_s)
    return plain, tracked
