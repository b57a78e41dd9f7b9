""":class:`TrainConfig`: everything that defines a training run, and the one source of its defaults.

Each field carries its command-line help in ``metadata`` (``help``, and where it applies ``choices``
from the registries of tasks, filters, embeddings, layers and LMN backends, ``flag``, ``group``,
``sep``, ``action``); ``grokfast-metrics train`` generates its options from them (:mod:`grokfast_metrics.cli.main`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from ..compute.core import BACKENDS
from ..foundation.policy import check_n_lambda
from ..foundation.runtime import resolve_device
from ..tracking.schedule import SNAPSHOT_EVENTS, complexity_steps
from .grokfast import FILTERS, make_filter
from .model import DEFAULT_LAYER, EMBEDDINGS, LAYERS, check_layer_spec
from .tasks import ADD_MODULUS, TASKS
from .transformer import TRANSFORMER_LAYER, TRANSFORMER_LAYERS

#: default ``save_connectivity``: init, the two phase boundaries and the end
SNAPSHOT_DEFAULT = ("0", "memorization", "generalization", "final")
#: training precisions (``--dtype``)
DTYPES = ("float32", "float64")
#: default fraction of training samples whose correct-class probability is exactly 1 that counts as a numerical collapse
COLLAPSE_FRACTION = 0.1
#: default factor of a train-loss spike over the lowest train loss so far that counts as a numerical collapse
COLLAPSE_SPIKE = 1e3
#: the trained networks (``--model``): the paper's MLP (the default) and a Nanda-style one-layer transformer
MODELS = ("mlp", "transformer")
#: the defaults of the fields left ``None``, per model. The transformer's grok on a 2-core CPU in minutes
#: (``--p 113 --d-model 128 --d-mlp 512 --train-fraction 0.3 --lr 1e-3`` is Nanda's setup, for a GPU)
MODEL_DEFAULTS = {
    "mlp": {"steps": 20_000, "lr": 1e-3, "weight_decay": 0.2, "train_fraction": 0.8, "p": ADD_MODULUS, "lmn_layers": [DEFAULT_LAYER]},
    "transformer": {
        "steps": 2_500,
        "lr": 3e-3,
        "weight_decay": 1.0,
        "train_fraction": 0.5,
        "p": ADD_MODULUS,
        "lmn_layers": [TRANSFORMER_LAYER],
    },
}
#: the seeds torch accepts (``torch.manual_seed``)
SEED_RANGE = (-(2**63), 2**64 - 1)
#: option groups of ``grokfast-metrics train``, in help order
GROUPS = ("task and model", "optimization", "LMN tracking", "other complexity measures", "output")


def _meta(help: str, group: str, **extra) -> dict:
    """A field's CLI metadata: ``help``, ``group`` and optional ``choices``, ``flag``, ``sep``, ``action``, ``sweep_help``
    (the help ``sweep`` shows where ``help`` speaks of one run's ``--resume`` / ``--overwrite``)."""
    return {"help": help, "group": group, **extra}


_MODEL, _OPT, _LMN, _CX, _OUT = GROUPS


@dataclass
class TrainConfig:
    """Everything that defines a run. ``None`` fields are resolved from the device (see :meth:`resolved`).

    Every field is documented by its ``help`` metadata (``grokfast-metrics train --help`` shows it with
    the default). Step ``s`` is the model after ``s`` optimizer updates.
    """

    task: str = field(default="add", metadata=_meta("add: (a+b) mod p (--p); s4: composition in S4; xor: 5-bit XOR", _MODEL, choices=TASKS))
    model: str = field(
        default="mlp",
        metadata=_meta(
            "mlp: the paper's 3-layer SiLU MLP; transformer: a Nanda-style one-layer transformer (token + positional "
            "embedding, attention, ReLU MLP, unembedding, no LayerNorm; input 'a b =', logits at the last position). "
            "Fields marked 'per model' take that model's default",
            _MODEL,
            choices=MODELS,
        ),
    )
    p: int | None = field(default=None, metadata=_meta("modulus of the add task (default 31; Nanda's transformer setup: 113)", _MODEL))
    steps: int | None = field(
        default=None, metadata=_meta("full-batch AdamW steps (per model: 20000 for the mlp, 2500 for the transformer)", _OPT)
    )
    lr: float | None = field(default=None, metadata=_meta("learning rate (per model: 1e-3 for the mlp, 3e-3 for the transformer)", _OPT))
    weight_decay: float | None = field(
        default=None, metadata=_meta("AdamW weight decay (per model: 0.2 for the mlp, 1 for the transformer)", _OPT)
    )
    adam_eps: float = field(
        default=1e-6,
        metadata=_meta(
            "AdamW epsilon. 1e-6 (not torch's 1e-8) keeps float32 runs clear of the late softmax collapse, which "
            "stops S4 short of generalizing; the paper does not state its eps",
            _OPT,
        ),
    )
    train_fraction: float | None = field(
        default=None,
        metadata=_meta("fraction of all inputs used for training, in (0, 1) (per model: 0.8 for the mlp, 0.5 for the transformer)", _MODEL),
    )
    seed: int = field(default=0, metadata=_meta("seed of the split and the initialization", _MODEL))
    init_scale: float = field(default=1.0, metadata=_meta("Omnigrok alpha: multiply initial parameters by it", _MODEL))
    embed_dim: int = field(default=32, metadata=_meta("mlp: embedding width per operand", _MODEL))
    hidden: int = field(default=100, metadata=_meta("mlp: hidden width", _MODEL))
    embedding: str = field(
        default="separate",
        metadata=_meta("mlp: one table per operand (the paper's setup) or one table shared by both operands", _MODEL, choices=EMBEDDINGS),
    )
    d_model: int = field(default=32, metadata=_meta("transformer: residual stream width (Nanda: 128)", _MODEL))
    d_mlp: int = field(default=128, metadata=_meta("transformer: MLP hidden width (Nanda: 512)", _MODEL))
    n_heads: int = field(default=4, metadata=_meta("transformer: attention heads (d_model must be a multiple)", _MODEL))
    dtype: str = field(
        default="float32",
        metadata=_meta(
            "training precision of the parameters and activations (LMN is computed on the model as it is)", _OPT, choices=DTYPES
        ),
    )
    grokfast: str = field(default="none", metadata=_meta("Grokfast gradient filter", _OPT, choices=FILTERS))
    ema_alpha: float = field(default=0.98, metadata=_meta("grokfast ema momentum", _OPT))
    ema_lamb: float = field(default=2.0, metadata=_meta("grokfast ema amplification", _OPT))
    ma_window: int = field(default=100, metadata=_meta("grokfast ma window", _OPT))
    ma_lamb: float = field(default=5.0, metadata=_meta("grokfast ma amplification", _OPT))
    collapse_fraction: float = field(
        default=COLLAPSE_FRACTION,
        metadata=_meta(
            "numerical collapse when this fraction of the training samples has correct-class probability exactly 1 in the training dtype",
            _OPT,
        ),
    )
    collapse_spike: float = field(
        default=COLLAPSE_SPIKE,
        metadata=_meta("numerical collapse when the train loss exceeds this factor times its lowest value so far", _OPT),
    )
    device: str = field(default="auto", metadata=_meta("auto (CUDA if available), cpu, cuda, cuda:N", _LMN))
    lmn_every: int | None = field(default=None, metadata=_meta("LMN every k steps, 0 = off (default: 1 on CUDA, 100 on CPU)", _LMN))
    lmn_early: bool = field(
        default=True,
        metadata=_meta(
            "skip the extra log-spaced LMN steps floor(1.5 ** k) (1, 2, 3, 5, ...) below --lmn-every (about 11 at every=100; "
            "they resolve the memorization phase on a log axis)",
            _LMN,
            flag="--no-lmn-early",
        ),
    )
    probe: str | int | None = field(
        default=None,
        metadata=_meta(
            "LMN samples: all, train, test or a seeded subset size n (default: all on CUDA; on CPU 256 for the mlp, 128 for the "
            "transformer)",
            _LMN,
        ),
    )
    probe_seed: int = field(default=0, metadata=_meta("seed of the probe subset (its own generator)", _LMN))
    lmn_layers: list[str] | None = field(
        default=None,
        metadata=_meta(
            f"reading to track: a layer ({', '.join(LAYERS)}) to the logits, or FROM:TO for the segment between two layers "
            "(TO may be 'logits'); repeat for several, the first is the 'lmn' column; 'all' = every layer to the logits, "
            f"'fig3' = the paper's three layers to the logits and to the next layer. Transformer: {' or '.join(TRANSFORMER_LAYERS)} "
            f"('all' = both). Per model: {DEFAULT_LAYER} for the mlp, {TRANSFORMER_LAYER} for the transformer",
            _LMN,
            flag="--lmn-layer",
            action="append",
        ),
    )
    n_lambda: int = field(default=21, metadata=_meta("interpolation points per pair", _LMN))
    lmn_backend: str = field(default="auto", metadata=_meta("LMN backend passed to grokfast_metrics.lmn", _LMN, choices=BACKENDS))
    lmn_async: bool = field(
        default=False,
        metadata=_meta(
            "compute the eigen step of LMN on a host worker thread while training goes on (L itself stays in the training "
            "thread); rows wait until their LMN lands, so the logs are the same as without it",
            _LMN,
        ),
    )
    spectral_entropy_weight: float = field(
        default=0.0,
        metadata=_meta(
            "add this times the spectral entropy of every Linear weight to the loss (0 = off; train_loss in the logs stays "
            "the cross-entropy)",
            _CX,
        ),
    )
    complexity: str = field(
        default="log",
        metadata=_meta("compression-based complexity schedule: off, log (0 and powers of two) or every k steps; the last step always", _CX),
    )
    complexity_eps: list[float] = field(
        default_factory=lambda: [1e-3, 1e-2, 1e-1],
        metadata=_meta("loss tolerances of the compression complexity (one complexity_bits_eps<e> column each)", _CX),
    )
    save_connectivity: list[str] = field(
        default_factory=lambda: list(SNAPSHOT_DEFAULT),
        metadata=_meta(
            "steps at which to save L of the first tracked layer for Figure 4: comma-separated integers and/or memorization, "
            "generalization, final; '' = none",
            _CX,
            sep=",",
        ),
    )
    checkpoint_every: int = field(
        default=0,
        metadata=_meta(
            "write checkpoint.pt (model, optimizer, filter, RNG, tracker state) every k steps, for --resume; 0 = never",
            _OUT,
            sweep_help="write checkpoint.pt in each run directory every k steps (train --resume <run dir> continues one); 0 = never",
        ),
    )
    log_every: int | None = field(
        default=None, metadata=_meta("log a row every k steps; LMN, complexity and key steps always (default: 1 on CUDA, 10 on CPU)", _OUT)
    )
    threads: int | None = field(
        default=None,
        metadata=_meta(
            "torch CPU threads during the run, restored afterwards (default: 1 on CPU, where 2 threads measured 6-20x slower "
            "on the tiny model; unchanged on CUDA)",
            _OUT,
        ),
    )

    def __post_init__(self) -> None:
        """Fill the fields left ``None`` that have a per-model default (:data:`MODEL_DEFAULTS`; ``p`` for ``add`` only)."""
        for name, value in MODEL_DEFAULTS.get(self.model, {}).items():
            if getattr(self, name) is None and (name != "p" or self.task == "add"):
                setattr(self, name, list(value) if isinstance(value, list) else value)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        self._validate_training()
        self._validate_tracking()
        if resolve_device(self.device).type not in ("cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {self.device!r}")

    def _validate_numbers(self) -> None:
        """Every float field finite (``collapse_spike`` may be ``inf``: no spike rule); seeds in torch's range."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value) and not (f.name == "collapse_spike" and value > 0):
                raise ValueError(f"{f.name.replace('_', ' ')} must be a finite number; got {value}")
        for name in ("seed", "probe_seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
                raise ValueError(
                    f"{name.replace('_', ' ')} must be an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}] (torch's seed range); got {value}"
                )

    def _validate_training(self) -> None:
        self._validate_numbers()
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose one of {', '.join(MODELS)}")
        if self.p is not None and self.task != "add":
            raise ValueError(f"p is the modulus of the add task; the {self.task} task has none (leave it unset)")
        if self.p is not None and (not isinstance(self.p, int) or self.p < 2):
            raise ValueError(f"p must be an integer >= 2; got {self.p}")
        for name in ("d_model", "d_mlp", "n_heads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")
        if self.model == "transformer" and self.spectral_entropy_weight > 0:
            raise ValueError("spectral entropy weight: the transformer has no nn.Linear layers to penalize (use --model mlp)")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1; got {self.steps}")
        if not 0.0 < self.train_fraction < 1.0:
            raise ValueError(f"train fraction must be in (0, 1); got {self.train_fraction}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        if not 0.0 < self.collapse_fraction <= 1.0:
            raise ValueError(f"collapse fraction must be in (0, 1]; got {self.collapse_fraction}")
        if not (self.collapse_spike > 1.0):
            raise ValueError(f"collapse spike must be > 1; got {self.collapse_spike}")
        for name, value, positive in (
            ("lr", self.lr, True),
            ("weight decay", self.weight_decay, False),
            ("adam eps", self.adam_eps, True),
            ("init scale", self.init_scale, True),
            ("spectral entropy weight", self.spectral_entropy_weight, False),
        ):
            if not ((value > 0 if positive else value >= 0) and math.isfinite(value)):
                raise ValueError(f"{name} must be {'a positive number' if positive else '>= 0'}; got {value}")
        if self.embedding not in EMBEDDINGS:
            raise ValueError(f"embedding must be one of {', '.join(EMBEDDINGS)}; got {self.embedding!r}")
        if self.grokfast not in FILTERS:
            raise ValueError(f"grokfast filter must be one of {', '.join(FILTERS)}; got {self.grokfast!r}")
        make_filter(self.grokfast, ema_alpha=self.ema_alpha, ema_lamb=self.ema_lamb, ma_window=self.ma_window, ma_lamb=self.ma_lamb)
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be an integer >= 0 (0 = no checkpoints); got {self.checkpoint_every}")
        for name in ("lmn_every", "log_every", "threads"):
            value, least = getattr(self, name), 0 if name == "lmn_every" else 1
            if value is not None and value < least:
                raise ValueError(f"{name} must be >= {least}{' (0 disables tracking)' if least == 0 else ''}; got {value}")

    def _validate_tracking(self) -> None:
        if not self.lmn_layers:
            raise ValueError("lmn_layers is empty; give at least one layer")
        for layer in self.lmn_layers:
            if self.model == "transformer":
                if layer not in TRANSFORMER_LAYERS:
                    raise ValueError(
                        f"LMN layer {layer!r} is not a reading of the transformer; choose from {', '.join(TRANSFORMER_LAYERS)}"
                    )
            else:
                check_layer_spec(layer)
        if len(set(self.lmn_layers)) != len(self.lmn_layers):
            raise ValueError(f"lmn_layers has duplicates: {self.lmn_layers}")
        try:
            check_n_lambda(self.n_lambda)
        except TypeError as e:
            raise ValueError(str(e)) from None
        complexity_steps(self.complexity)
        if not self.complexity_eps or any(not (e >= 0 and math.isfinite(e)) for e in self.complexity_eps):
            raise ValueError(f"complexity eps must be a non-empty list of numbers >= 0; got {self.complexity_eps}")
        for s in self.save_connectivity:
            if s not in SNAPSHOT_EVENTS and not (str(s).isdigit()):
                raise ValueError(f"save-connectivity steps must be integers >= 0 or one of {', '.join(SNAPSHOT_EVENTS)}; got {s!r}")
        if self.lmn_backend not in BACKENDS:
            raise ValueError(f"LMN backend must be one of {', '.join(BACKENDS)}; got {self.lmn_backend!r}")
        parse_probe(self.probe if self.probe is not None else "all")
        if self.model == "transformer" and self.lmn_async:
            raise ValueError("lmn_async is not supported with the transformer (its LMN runs through lmn_at); leave it off")

    def resolved(self) -> TrainConfig:
        """A copy with device-dependent defaults filled in (after :meth:`validate`)."""
        dev = resolve_device(self.device)
        cuda = dev.type == "cuda"
        out = TrainConfig(**asdict(self))
        out.device = str(dev)
        if out.lmn_every is None:
            out.lmn_every = 1 if cuda else 100
        if out.probe is None:
            out.probe = "all" if cuda else 128 if self.model == "transformer" else 256
        out.probe = parse_probe(out.probe)
        if out.log_every is None:
            out.log_every = 1 if cuda else 10
        if out.threads is None and not cuda:
            out.threads = 1
        return out


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
