"""The layer order of the package, read by ``tests/project/test_layers.py`` (the one place it is written).

A module may import modules of its own layer (never in a cycle) and of the layers below it; a layer's
index is its place in :data:`LAYERS`, bottom first. ``kernels/`` is installed as ``grokfast_metrics.kernels``.
The package's root modules (``__init__``, ``__main__``, ``_moved``, this one) form the top layer: they name
the public API and the old module paths, and only import lazily.
"""

from __future__ import annotations

#: bottom first: each entry is one layer (the subpackages of ``grokfast_metrics`` in it)
LAYERS: tuple[tuple[str, ...], ...] = (
    ("foundation",),  # errors, the tail spec, policy, runtime, the directory lock
    ("kernels",),  # the fused C++ and Triton kernels (top-level folder kernels/)
    ("compute",),  # L and LMN: core (dispatch), torch paths, generic path, float64 references
    ("dropin",),  # lmn_at / check_cut at any layer of any model: plan, split, hooks, prune, lower
    ("tracking",),  # tracker, torchmetrics metric, asynchronous eigen step, schedule
    ("experiment",),  # tasks, models, trainer, config, run directory, checkpoints
    ("figures",),  # figures of finished runs
    ("sweep",),  # grids of runs
    ("bench",),  # benchmarks
    ("cli",),  # the grokfast-metrics command
    ("",),  # the package's root modules
)


def layer_of(module: str) -> int:
    """Index in :data:`LAYERS` of a module of the package (``grokfast_metrics.compute.core`` -> 2)."""
    parts = module.split(".")
    if parts[0] != "grokfast_metrics":
        raise ValueError(f"{module} is not a module of grokfast_metrics")
    sub = parts[1] if len(parts) > 2 or (len(parts) == 2 and not parts[1].startswith("_")) else ""
    for i, layer in enumerate(LAYERS):
        if sub in layer:
            return i
    raise ValueError(f"{module}: subpackage {sub!r} is in no layer of grokfast_metrics._layers.LAYERS")
