"""The grid of a sweep: axes of ``train`` options, one :class:`Run` per grid point and seed."""

from __future__ import annotations

import argparse
import itertools
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..experiment.config import TrainConfig

#: fields that cannot be grid axes: the seed has ``--seeds``; lists have no single value per run
_NOT_AXES = {"seed", "lmn_layers", "complexity_eps", "save_connectivity"}


@dataclass(frozen=True)
class Run:
    """One run of a sweep: its grid values, seed, configuration and directory."""

    values: tuple[tuple[str, object], ...]
    seed: int
    config: TrainConfig
    run_dir: Path

    @property
    def name(self) -> str:
        return self.run_dir.name

    def config_dict(self) -> dict:
        """The configuration as a plain dict (picklable, for worker processes and Ray tasks)."""
        return asdict(self.config)


def _action(parser: argparse.ArgumentParser, dest: str) -> argparse.Action | None:
    return next((a for a in parser._actions if a.dest == dest), None)


def parse_axis(spec: str, parser: argparse.ArgumentParser) -> tuple[str, list]:
    """``"name=v1,v2"`` -> ``(field, [typed values])``, converted like the ``train`` option of that field.

    Raises:
        ValueError: no ``=``, an unknown or unsupported field, no values, or a value the option refuses.
    """
    if "=" not in spec:
        raise ValueError(f"a grid axis is name=v1,v2,...; got {spec!r}")
    name, raw = spec.split("=", 1)
    name = name.strip().lstrip("-").replace("-", "_")
    known = {f.name for f in fields(TrainConfig)}
    if name not in known:
        raise ValueError(f"unknown grid axis {name!r}: it must be a train option ({', '.join(sorted(known - _NOT_AXES))})")
    if name in _NOT_AXES:
        hint = "use --seeds" if name == "seed" else "it takes a list per run"
        raise ValueError(f"{name!r} cannot be a grid axis: {hint}")
    texts = [v.strip() for v in raw.split(",") if v.strip()]
    if not texts:
        raise ValueError(f"grid axis {name!r} has no values")
    action = _action(parser, name)
    values = []
    for t in texts:
        if action is not None and action.choices is not None and t not in action.choices:
            raise ValueError(f"grid axis {name}: {t!r} is not one of {', '.join(map(str, action.choices))}")
        try:
            values.append(action.type(t) if action is not None and action.type is not None else t)
        except (TypeError, ValueError) as e:
            raise ValueError(f"grid axis {name}: bad value {t!r} ({e})") from None
    if len(set(map(str, values))) != len(values):
        raise ValueError(f"grid axis {name} repeats a value: {texts}")
    return name, values


def _label(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def run_name(values: tuple[tuple[str, object], ...], seed: int) -> str:
    """Directory name of a run: ``init_scale=0.5_weight_decay=0.2_seed=1``."""
    return "_".join([*(f"{k}={_label(v)}" for k, v in values), f"seed={seed}"])


def plan_runs(base: TrainConfig, axes: list[tuple[str, list]], seeds: list[int], out: Path) -> list[Run]:
    """Every grid point (first axis slowest) for every seed, each validated like a ``train`` run.

    Raises:
        ValueError: an axis repeated, or a grid point ``TrainConfig.validate`` refuses (named).
    """
    names = [name for name, _ in axes]
    if len(set(names)) != len(names):
        raise ValueError(f"a grid axis appears twice: {names}")
    runs = []
    for point in itertools.product(*(values for _, values in axes)):
        values = tuple(zip(names, point))
        for seed in seeds:
            cfg = TrainConfig(**{**asdict(base), **dict(values), "seed": seed})
            try:
                cfg.validate()
            except ValueError as e:
                raise ValueError(f"grid point {run_name(values, seed)}: {e}") from None
            runs.append(Run(values, seed, cfg, Path(out) / run_name(values, seed)))
    return runs
