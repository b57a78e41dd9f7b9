"""Runtime helpers every part of the library shares: device strings, device sync, eval mode, environment, call style.

Each decision here is made once: :func:`resolve_device` is the one parser of device strings
(trainer, benchmarks, CLI), :func:`synchronize` the one device sync (timers),
:func:`eval_mode` the one way a computation runs a module without changing its mode or the RNG,
:func:`env` the one reader of the library's environment variables (all ``GROKFAST_METRICS_*``, listed in
``docs/environment.md``) and :func:`keyword_only` the one check of the public call style (``model, inputs, at``
positional, the rest by keyword).
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA if available else CPU; otherwise ``torch.device(device)``, checked to exist.

    Raises:
        ValueError: unparsable device, or CUDA asked for but not available.
    """
    if isinstance(device, torch.device):
        dev = device
    elif device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except RuntimeError as e:
            raise ValueError(f"bad device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asked for but CUDA is not available; use --device cpu")
    return dev


def synchronize(device: torch.device | str | None) -> None:
    """Wait for queued work on ``device`` (a no-op off CUDA), so a timer measures finished work."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Run ``module`` in eval mode and leave every submodule's mode as it was; the global RNG is forked."""
    modes = [(m, m.training) for m in module.modules()]
    cuda_up = torch.cuda.is_available() and torch.cuda.is_initialized()  # type: ignore[no-untyped-call]  # torch leaves it unannotated
    devices = [torch.cuda.current_device()] if cuda_up else []
    with torch.random.fork_rng(devices=devices):
        module.eval()
        try:
            yield
        finally:
            for m, mode in modes:
                m.training = mode


def triton_available() -> bool:
    """True when the ``triton`` package imports."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` is set (it takes effect only if set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


#: the one prefix of the library's environment variables (docs/environment.md)
ENV_PREFIX = "GROKFAST_METRICS_"
#: the library's variables (name after the prefix -> what it does); docs/environment.md documents each
ENV_VARS = {
    "CPU_KERNEL": "0 / false / False turns the fused C++ CPU kernel off (backend='auto' then runs torch ops)",
    "CPU_AVX512": "0 / false / False: the C++ kernel's GEMMs in AVX2 registers where the CPU has AVX-512F (same L)",
    "TRITON_KERNEL": "v1 or v2: the Triton kernel variant of every call (default: v2 where it applies, else v1)",
}
#: old names a user could have set, still read (with a DeprecationWarning) when the new one is unset
ENV_OLD_NAMES = {"TRITON_KERNEL": "GM_TRITON_KERNEL"}


def env(name: str) -> str | None:
    """The value of ``$GROKFAST_METRICS_<name>`` (``None`` when unset or empty); the one place the library reads one.

    An old name of :data:`ENV_OLD_NAMES` (``GM_TRITON_KERNEL``) is read when the new one is unset, with a
    ``DeprecationWarning`` that names the new one.

    Raises:
        KeyError: ``name`` is not one of :data:`ENV_VARS` (a typo in the library, not a user error).
    """
    if name not in ENV_VARS:
        raise KeyError(f"{ENV_PREFIX}{name} is not a documented variable (see docs/environment.md)")
    value = os.environ.get(ENV_PREFIX + name)
    if not value and name in ENV_OLD_NAMES and os.environ.get(ENV_OLD_NAMES[name]):
        old = ENV_OLD_NAMES[name]
        warnings.warn(f"the environment variable {old} is deprecated; set {ENV_PREFIX}{name} instead", DeprecationWarning, stacklevel=3)
        value = os.environ[old]
    return value or None


def cpu_kernel_switched_off() -> bool:
    """True when ``GROKFAST_METRICS_CPU_KERNEL`` is ``0``, ``false`` or ``False`` (the fused CPU kernel is off)."""
    return env("CPU_KERNEL") in ("0", "false", "False")


F = TypeVar("F", bound=Callable[..., Any])


def keyword_only(call: str, name: str | None = None) -> Callable[[F], F]:
    """One line saying how to call the wrapped function when a call breaks its keyword-only style.

    The wrapped function's positional-or-keyword parameters (after ``self``) are the ones that may be passed
    positionally, the rest are keyword-only. A call with too many positional arguments, or without one of the
    required ones, raises a ``TypeError`` ending in ``call it as <call>`` (``call``: e.g.
    ``"lmn_at(model, inputs, at='<layer name>', to=None, ...)"``), instead of Python's generic message. The signature is
    unchanged (``inspect.signature`` follows ``__wrapped__``); a well-formed call costs one length check. ``name``: what
    the message calls it (default: the function's, or the class's for ``__init__``).
    """

    def wrap(fn: F) -> F:
        params = list(inspect.signature(fn).parameters.values())
        first = 1 if params and params[0].name == "self" else 0
        positional = [p for p in params[first:] if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        required = [p.name for p in positional if p.default is inspect.Parameter.empty]
        label = name or fn.__qualname__.removesuffix(".__init__")

        @functools.wraps(fn)
        def checked(*args: Any, **kwargs: Any) -> Any:
            given = len(args) - first
            if given > len(positional):
                raise TypeError(
                    f"{label}() takes {', '.join(p.name for p in positional)} positionally, the rest by "
                    f"keyword ({given} positional arguments given); call it as {call}"
                )
            missing = [p for p in required[max(given, 0) :] if p not in kwargs]
            if missing:
                raise TypeError(f"{label}() needs {', '.join(missing)} (no default); call it as {call}")
            return fn(*args, **kwargs)

        return checked  # type: ignore[return-value]

    return wrap


def drop_checkout_from_path() -> None:
    """Take this repository's root off ``sys.path`` (``python -m grokfast_metrics`` run from a checkout).

    ``python -m`` puts the working directory first on ``sys.path``. In a checkout of this repository that
    makes its top-level ``kernels/`` folder (installed as ``grokfast_metrics.kernels``) answer for
    ``import kernels``, the name of Hugging Face's package that ``transformers`` 5 imports. Only an entry
    that is this checkout's root is removed (recognised by ``kernels/cpu_fused.cpp`` beside ``setup.py``).
    """

    def is_checkout(entry: str) -> bool:
        root = Path(entry or os.getcwd())
        return (root / "setup.py").is_file() and (root / "kernels" / "cpu_fused.cpp").is_file()

    sys.path[:] = [e for e in sys.path if not is_checkout(e)]
