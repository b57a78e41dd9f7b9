"""LMN at any layer of any ``nn.Module``: :func:`lmn_at`, the cut check and the tail it builds.

``lmn_at(model, inputs, at="blocks.0")`` (``model, inputs, at`` positional, the rest by keyword) takes the output
of the submodule named ``at`` as the representation ``h`` (one flattened row per sample) and *the rest of the model* (or, with
``to=``, the sub-network up to module ``to``'s output) as the tail. The tail is one of, in order of
preference (:class:`Plan` decides once):

* **chain**: ``at`` (and ``to``) sit in (nested) plain ``nn.Sequential`` chains and the activation
  is ``(N, D)``: the tail is the modules between them; an MLP segment takes the fused kernels;
* **split**: ``torch.fx`` traces the model (every module that does not contain ``at``/``to`` is a
  leaf) and the nodes after ``at`` that the output needs depend on nothing else of the input: the
  tail is that sub-graph alone, so the layers before ``at`` are never re-run;
* **hooks**: otherwise the model is re-run on copies of probe sample 0 with a forward hook that
  *replaces* ``at``'s output (and, with ``to=``, stops the forward at ``to``).

Split and hook tails take the generic path of :mod:`grokfast_metrics.compute.generic`: the ends of every
path computed once, the interior points in large batches. The split tail is checked against the
model's own outputs on every computation and abandoned for the hook path if they disagree.

Re-running the model with a replaced activation is only the rest of the model if the rest depends
on the inputs *only through* that activation (``at`` is a *cut*). A residual sub-layer
(``x + attn(x)``) is not: the skip connection bypasses it. :func:`check_cut` verifies the cut on
a few pairs and ``lmn_at`` refuses a non-cut with a ``ValueError`` naming an enclosing module
that is one.

While ``lmn_at`` runs, the forward hooks and forward pre-hooks the user registered on the model's
modules are suspended (``user_hooks=True`` keeps them firing); the pre-hooks that compute weights
(``weight_norm``, ``spectral_norm``, pruning) always run.

The pieces: :mod:`grokfast_metrics.dropin.plan` (:class:`Plan`, the cut check, the affine-tail warning),
:mod:`grokfast_metrics.dropin.split` (the chain, split and hook tails) and :mod:`grokfast_metrics.dropin.hooks`
(inputs, names, outputs, hooks, layouts).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..compute.core import LMNResult
from ..foundation.runtime import keyword_only
from .hooks import OutputSelector
from .plan import Plan

__all__ = ["check_cut", "lmn_at"]


@keyword_only("check_cut(model, inputs, at='<layer name>', to=None, output=None, batch_dim=0, input_batch_dim=None)")
def check_cut(
    model: nn.Module,
    inputs: Any,
    at: str,
    *,
    to: str | None = None,
    output: OutputSelector = None,
    batch_dim: int = 0,
    input_batch_dim: int | None = None,
) -> float:
    """Check that the rest of ``model`` (or the sub-network up to ``to``) depends on ``inputs`` only through ``at``.

    For ``k = min(N, 8)`` samples, sample ``i - 1``'s input is run with sample ``i``'s activation at
    ``at`` swapped in; the logits must reproduce sample ``i``'s to ``1e-4`` (fp32; ``1e-9`` fp64,
    ``4 eps`` fp16/bf16) of the largest logit. Only the *selected* logits count: with
    ``output=lambda out: out[-1]``, a sub-layer whose bypass never reaches the last position is a
    cut. Runs in eval mode without grad; mode and RNG are restored.

    Returns:
        the relative error (``max |diff| / max |logits|``).

    Raises:
        ValueError: ``at`` is not a cut (the message names an enclosing module that is, if any),
            or any of the input errors of :func:`lmn_at`.

    >>> import torch, grokfast_metrics as gm
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.SiLU(), torch.nn.Linear(8, 8), torch.nn.SiLU(),
    ...                             torch.nn.Linear(8, 3))
    >>> gm.check_cut(model, torch.randn(6, 4), "1")   # a child of a plain Sequential is a cut: exact
    0.0
    """
    plan = Plan(model, inputs, at, to, output, batch_dim, input_batch_dim, path="hooks")
    with plan.running():
        y, act = plan.forward()
        return plan.enforce_cut(act, y)


@keyword_only("lmn_at(model, inputs, at='<layer name>', to=None, output=None, batch_dim=0, n_lambda=21, ...)")
def lmn_at(
    model: nn.Module,
    inputs: Any,
    at: str,
    *,
    to: str | None = None,
    output: OutputSelector = None,
    batch_dim: int = 0,
    input_batch_dim: int | None = None,
    n_lambda: int = 21,
    backend: str = "auto",
    check: bool = True,
    path: str = "auto",
    user_hooks: bool = False,
    chunk_bytes: int | None = None,
    warn_affine: bool = True,
    compile: bool = False,
) -> LMNResult:
    """Linear mapping number at the output of the submodule ``at`` of ``model``, over the probe ``inputs``.

    ``h`` is ``at``'s output with each sample's activation flattened (``(N, D)``, ``D`` the product of
    the per-sample shape, e.g. ``seq * d_model`` for a transformer block); the tail is the rest of the
    model up to the logits selected by ``output`` or, with ``to``, the sub-network up to module
    ``to``'s output (flattened per sample, or selected by ``output``).

    Args:
        model: any ``nn.Module`` (a ``torch.compile``d one is measured through its eager module, and
            its submodule names need no ``_orig_mod.``); left exactly as it was (mode, parameters,
            grads, RNG, hooks).
        inputs: the model's input (a tensor, or a tuple/list of tensors passed positionally) for the
            ``N`` probe samples, batched along ``input_batch_dim``, on the model's device.
        at: name of the submodule whose output is the representation, as in ``model.named_modules()``
            (``"layers.0"``, ``"3"``...). A module returning a tuple contributes element 0.
        to: name of the submodule whose output ends the measured sub-network (default: the model's
            output). An MLP segment of a plain ``nn.Sequential`` takes the fused kernels.
        output: how to get ``(N, O)`` from the model's output (or ``to``'s): ``None`` (it already is;
            ``to``'s output is flattened per sample), an int (tuple element), ``"last"`` (the last sequence
            position: ``out[:, -1]``, or ``out[-1]`` with ``batch_dim=1``; a tuple's first element; picklable,
            :class:`~grokfast_metrics.dropin.hooks.LastPosition`) or a callable, e.g. ``lambda out: out[-1]``.
        batch_dim: the samples' axis in ``at``'s (and ``to``'s) output: 1 for sequence-first blocks
            ``(seq, batch, d)``.
        input_batch_dim: the samples' axis in ``inputs`` (default ``batch_dim``): e.g. 0 for a model
            fed ``(batch, seq)`` tokens whose blocks run sequence-first (``batch_dim=1``).
        n_lambda, backend, chunk_bytes: as in :func:`grokfast_metrics.lmn`; for a tail that is not an
            MLP, ``backend="reference"`` runs the float64 per-pair loop through the module itself and
            ``chunk_bytes`` bounds the interpolated input of one tail forward.
        check: run the cut check (default True; a plain ``nn.Sequential`` child needs none).
        path: ``"auto"`` (chain, else the fx split, else hooks), ``"chain"``, ``"split"`` or ``"hooks"``.
        user_hooks: keep firing the forward hooks registered on the model's modules (default: suspended
            while LMN is computed, so a logging hook on the head does not see the interpolation batches).
        warn_affine: warn (:class:`AffineTailWarning`) when the tail is affine, so LMN is 1 at every step.
        compile: run a split tail that takes the generic path (attention after the cut: not lowered) through
            ``torch.compile`` (inductor), at one batch shape. Opt-in: the first call compiles (tens of seconds on a
            CPU, see docs/dropin.md) and ``last_run_info()["compile"]`` says what it cost; each ``lmn_at`` call
            builds a new plan and compiles again (inductor's disk cache makes the later ones cheaper), so for repeated
            measurements use :class:`~grokfast_metrics.LMNTracker` (one plan, compiled once). Where compiling
            fails, one warning line and the uncompiled tail. Values as without it (the fp32 contract).

    Returns:
        :class:`LMNResult` of ``h`` through the rest of the model.

    Raises:
        ValueError: unknown ``at``/``to`` (lists valid names), ``at`` never called or called more than
            once, ``at`` is not a cut (names an enclosing module that is), logits not 2-D ``(N, O)``,
            the samples not where ``batch_dim``/``input_batch_dim`` say (names the axis that has them),
            the model failing on the probe, inputs on another device than the model, fewer than 2 samples.
        TypeError: ``model``/``inputs``/``output`` of the wrong type; more than ``model, inputs, at`` passed
            positionally, or no ``at`` (it has no default): one line saying how to call it.

    Example (``h`` after the first SiLU, the tail ``model[2:]``; with ``to=``, the sub-network up to ``model[3]``):

    >>> import torch, grokfast_metrics as gm
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.SiLU(), torch.nn.Linear(8, 8), torch.nn.SiLU(),
    ...                             torch.nn.Linear(8, 3))
    >>> x = torch.randn(6, 4)
    >>> res = gm.lmn_at(model, x, "1")
    >>> res.connectivity.shape, abs(res.lmn - gm.lmn(model[:2](x).detach(), model[2:]).lmn) < 1e-6
    (torch.Size([6, 6]), True)
    >>> gm.lmn_at(model, x, "1", to="3").lmn >= 1.0
    True
    """
    plan = Plan(model, inputs, at, to, output, batch_dim, input_batch_dim, path, user_hooks, compile=compile)
    return plan.compute(n_lambda, backend, check=check, chunk_bytes=chunk_bytes, warn_affine=warn_affine)
