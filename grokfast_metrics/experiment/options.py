"""The ``train`` command-line options, generated from the fields of :class:`~grokfast_metrics.experiment.config.TrainConfig`
(help, choices and defaults in one place), and the config of parsed options. ``grokfast-metrics train`` and
``grokfast-metrics sweep`` (each run's options) both read them."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, Field, fields
from typing import get_args, get_origin, get_type_hints

from .config import GROUPS, TrainConfig
from .model import DEFAULT_LAYER, FIG3_READINGS, LAYERS, canonical_spec
from .transformer import TRANSFORMER_LAYERS


def add_train_arguments(p: argparse.ArgumentParser, sweep: bool = False) -> None:
    """One option per :class:`~grokfast_metrics.experiment.config.TrainConfig` field (from its metadata), then the run options.

    ``sweep``: the options as ``sweep`` has them (each run's settings; ``--out`` is the sweep directory, no
    ``--overwrite`` / ``--resume``, whose text is about one run); ``sweep`` adds its own options after these.
    """
    groups = {name: p.add_argument_group(name) for name in GROUPS}
    hints = get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        kw = _argument(f, hints[f.name])
        if sweep and f.metadata.get("sweep_help"):
            kw["help"] = f.metadata["sweep_help"] + kw["help"][len(f.metadata["help"]) :]
        groups[f.metadata["group"]].add_argument(f.metadata.get("flag", "--" + f.name.replace("_", "-")), **kw)
    g = groups["output"]
    if sweep:
        g.add_argument(
            "--out",
            default=None,
            help="sweep directory (default runs/sweep-<task>-<time>): one run directory "
            "per grid point and seed, plus sweep.csv, sweep.json, phase.png, lmn_predicts.png; a run already "
            "finished there is kept, not re-run",
        )
        g.add_argument("--no-progress", action="store_true", help="no progress bar")
        g.add_argument("--no-plot", action="store_true", help="do not write each run's curves.png")
        g.add_argument(
            "--overwrite",
            action="store_true",
            help="re-run the finished runs in --out that were trained "
            "with other options than this sweep's (without it such a sweep is refused)",
        )
        g.add_argument("--resume", default=None, help=argparse.SUPPRESS)  # refused with its reason (sweep.command)
        return
    g.add_argument(
        "--out",
        default=None,
        help="run directory (default runs/<task>-s<seed>-<time>); one that already holds a run is refused unless --overwrite or --resume",
    )
    g.add_argument("--overwrite", action="store_true", help="replace the run in --out (its run files are removed first)")
    g.add_argument(
        "--resume",
        default=None,
        metavar="DIR",
        help="continue the run in DIR from its checkpoint (--checkpoint-every); its config is kept, --steps may extend it",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--no-plot", action="store_true", help="do not write curves.png")


def _default(f: Field):
    """The dataclass default of field ``f``."""
    return f.default_factory() if f.default is MISSING else f.default


def _argument(f: Field, hint) -> dict:
    """``add_argument`` keywords of a ``TrainConfig`` field: type, default and help from the dataclass.

    ``bool`` fields are switches (``--no-<name>`` when the default is True); list fields take several
    values (``nargs="+"``), a ``sep``-separated string (``sep`` metadata) or a repeated option
    (``action="append"`` metadata, default filled in by :func:`train_config`).
    """
    meta, default = f.metadata, _default(f)
    kw = {"dest": f.name, "help": meta["help"] + _default_help(default, meta.get("sep", " "))}
    if meta.get("choices") is not None:
        kw["choices"] = meta["choices"]
    if hint is bool:
        return {**kw, "action": "store_false" if default else "store_true", "help": meta["help"]}
    if meta.get("action") is not None:
        return {**kw, "action": meta["action"], "default": None}
    if get_origin(hint) is list:
        item = get_args(hint)[0]
        if "sep" in meta:
            return {**kw, "default": default, "type": lambda s: [x.strip() for x in s.split(meta["sep"]) if x.strip()]}
        return {**kw, "default": default, "type": item, "nargs": "+"}
    types = [t for t in get_args(hint) if t is not type(None)] or [hint]  # X | None -> X; str | int -> str
    return {**kw, "default": default, "type": types[0]}


def _default_help(default, sep: str) -> str:
    if default is None:  # device-dependent: the help says what it resolves to
        return ""
    shown = sep.join(map(str, default)) if isinstance(default, list) else str(default)
    return f" (default {shown})".replace("%", "%%")


def train_config(args: argparse.Namespace):
    """The :class:`~grokfast_metrics.experiment.config.TrainConfig` of parsed ``train`` arguments (``all`` layers expanded)."""
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    for f in fields(TrainConfig):
        if f.metadata.get("action") is not None and values[f.name] is None:
            values[f.name] = _default(f)
    if values["lmn_layers"] is not None:
        values["lmn_layers"] = expand_layers(values["lmn_layers"], values["model"])
    return TrainConfig(**values)


def expand_layers(chosen: list[str], model: str = "mlp") -> list[str]:
    """Expand ``all`` to every layer (default layer first) and ``fig3`` to Fig. 3's readings; ``A:logits`` is ``A``;
    keeps the order and drops repeats. For the transformer ``all`` is its readings (``fig3`` is the mlp's)."""
    every = list(TRANSFORMER_LAYERS) if model == "transformer" else [DEFAULT_LAYER, *LAYERS]
    out: list[str] = []
    for layer in chosen:
        expanded = every if layer == "all" else list(FIG3_READINGS) if layer == "fig3" else [layer]
        for name in expanded:
            name = canonical_spec(name)
            if name not in out:
                out.append(name)
    return out


def given_options(args: argparse.Namespace) -> set[str]:
    """The destinations of the options given on the command line (not left at their defaults), for the subcommand
    ``args`` was parsed by (``args._parser`` and ``args._argv``, set by :func:`grokfast_metrics.cli.main.main`); empty when unknown."""
    parser, argv = getattr(args, "_parser", None), getattr(args, "_argv", None)
    if parser is None or argv is None:
        return set()
    rest = argv[argv.index(args.command) + 1 :] if args.command in argv else argv
    saved = {}
    for action in parser._actions:
        saved[action] = action.default
        action.default = argparse.SUPPRESS
    try:
        ns, _ = argparse.ArgumentParser.parse_known_args(parser, rest, argparse.Namespace())
    finally:
        for action, default in saved.items():
            action.default = default
    return {k for k in vars(ns) if not k.startswith("_")}
