"""The configuration tables of a sweep file, and the Sweep they resolve into.

`[train]`, `[grokking]` and `[measures]` are the dataclasses here (`[task]` and `[model]` are those of
tasks.py, models.py or a registered class); each field's type and check is read by `build`, which
turns a table of a sweep file into its dataclass with one SweepError line for anything wrong.
`Static` gathers what decides the compiled program; `Sweep` adds the runs (sweep/axes.py).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jaxgrok import measures, tasks
from jaxgrok.registry import checked
from jaxgrok.sweep import hashing
from jaxgrok.sweep.axes import TABLE, SweepError, coerce, n_train, varying

PRECISIONS = ("float32", "tf32", "bfloat16", "float64")
# Every integer of a sweep file: the compiled program counts steps, evaluations, seeds and sizes in
# int32, and a larger value would overflow inside a jitted call (after the results directory exists).
INT_LIMIT = 2**31 - 1
OPTIMIZERS = ("adamw", "adam", "sgd")
LOSSES = ("auto", "cross_entropy", "mse", "stablemax")


@dataclass(frozen=True)
class TrainConfig:
    """[train]: the step budget, the evaluation cadence, the optimizer recipe and the precision."""

    steps: int = field(metadata=checked(lambda v: v > 0, "must be > 0"))
    eval_every: int = field(default=100, metadata=checked(lambda v: v > 0, "must be > 0"))
    batch_size: int = field(default=0, metadata=checked(lambda v: v >= 0, "must be ≥ 0 (0 = full batch)"))
    warmup_steps: int = field(default=10, metadata=checked(lambda v: v >= 0, "must be ≥ 0"))
    beta1: float = field(default=0.9, metadata=checked(lambda v: 0 <= v < 1, "must be in [0, 1)"))
    beta2: float = field(default=0.98, metadata=checked(lambda v: 0 <= v < 1, "must be in [0, 1)"))
    # adamw: decoupled weight decay (Loshchilov & Hutter); adam: torch.optim.Adam's weight_decay,
    # an L2 term added to the gradient before the moments (devinterp's and Grokfast's code use it);
    # sgd: plain (minibatch or full-batch) gradient descent, weight decay as torch.optim.SGD's L2
    # term, no momentum (Gromov 2023; Barak et al. 2022). beta1 and beta2 are Adam's only.
    optimizer: str = field(default="adamw", metadata=checked(lambda v: v in OPTIMIZERS, "must be adamw, adam or sgd"))
    # stablemax: Prieto et al. 2025's cross-entropy through s(x) = x + 1 (x ≥ 0), 1/(1 − x) (x < 0)
    # in place of exp, which cannot round a probability to exactly 1 ("softmax collapse").
    loss: str = field(default="auto", metadata=checked(lambda v: v in LOSSES, "must be auto, cross_entropy, mse or stablemax"))
    chunk_steps: int = field(default=1000, metadata=checked(lambda v: v > 0, "must be > 0"))
    max_runs_per_batch: int = field(default=0, metadata=checked(lambda v: v >= 0, "must be ≥ 0 (0 = fit to memory)"))
    # float32: true float32 matmuls (GPUs would otherwise use TF32); tf32: TensorFloat-32 matmuls;
    # bfloat16: the forward and backward pass in bfloat16, parameters, optimizer state and losses
    # in float32; float64: everything in float64 (JAX's x64 mode, for that sweep's program only; CPU
    # and GPU, not TPU): the arm of Prieto et al. 2025 that softmax collapse does not reach. Part of
    # the run hash: a mixed-precision run is never mistaken for a float32 one.
    precision: str = field(default="float32", metadata=checked(lambda v: v in PRECISIONS, "must be float32, tf32, bfloat16 or float64"))
    # Retire a run once its validation accuracy has stayed at or above [grokking] threshold for this
    # many steps after its t_val (or at once when it diverges), and give its slot to a pending run;
    # 0: every run trains its whole budget. A run that has not grokked is never retired.
    stop_after_grokking: int = field(default=0, metadata=checked(lambda v: v >= 0, "must be ≥ 0 (steps; 0 = off)"))
    # Grokfast's filter where grokfast_lambda > 0 (Lee et al. 2024): ema (momentum grokfast_alpha) or
    # ma, the mean of the last grokfast_window gradients (the paper's MA: window 100, λ 5).
    grokfast_filter: str = field(default="ema", metadata=checked(lambda v: v in ("ema", "ma"), "must be ema or ma"))
    grokfast_window: int = field(default=100, metadata=checked(lambda v: v >= 1, "must be ≥ 1 (gradients averaged)"))


@dataclass(frozen=True)
class GrokkingConfig:
    """[grokking]: when a run counts as having memorised, generalised, and grokked."""

    threshold: float = field(default=0.99, metadata=checked(lambda v: 0 < v <= 1, "must be in (0, 1]"))
    # Liu et al. 2022 draw the phases from the steps to 0.9 accuracy and call it grokking when
    # validation lags training by more than 10³ steps.
    phase_accuracy: float = field(default=0.9, metadata=checked(lambda v: 0 < v <= 1, "must be in (0, 1]"))
    phase_gap: int = field(default=1000, metadata=checked(lambda v: v >= 0, "must be ≥ 0"))


def _measures_fields():
    for m in measures.MEASURES:
        yield m.switch, bool, field(default=m.on)
        yield from ((o.name, o.type, field(default=o.default, metadata=checked(*o.check))) for o in m.options)


# [measures]: each measure's switch and options, as jaxgrok/measures declares them.
MeasuresConfig = dataclasses.make_dataclass("MeasuresConfig", list(_measures_fields()), frozen=True)
MeasuresConfig.__doc__ = "[measures]: which progress measures the program computes, and how (jaxgrok/measures)."


@dataclass(frozen=True)
class Static:
    """Everything that decides the compiled program: hashable, closed over, never traced."""

    task: Any  # tasks.TaskConfig or a registered task
    model: Any  # a config of models.py or a registered model
    train: TrainConfig
    grokking: GrokkingConfig
    measures: MeasuresConfig
    n_train_min: int  # smallest training set in the sweep
    n_train_max: int  # largest training set in the sweep: the static length of the train gather
    grokfast: bool = False  # some run filters its gradients (grokfast_lambda > 0)
    orthograd: bool = False  # some run projects its gradients (orthograd = 1)
    constrain_norm: bool = False  # some run holds its weight norm (constrain_norm = 1)
    batch_varies: bool = False  # the runs draw minibatches of different sizes (train.batch_size: the largest)

    @property
    def loss(self) -> str:
        """The loss the runs train on: [train] loss, or for "auto" the model's own (cross-entropy
        unless its class says otherwise, as Gromov's MSE)."""
        if self.train.loss != "auto":
            return self.train.loss
        return getattr(type(self.model), "default_loss", "cross_entropy")


@dataclass(frozen=True)
class Sweep:
    """A validated sweep: its static config, one array per axis (one entry per run), and the whole
    config after defaults and overrides (`resolved`, for the metadata and the run hash)."""

    name: str
    paper: str
    description: str
    path: str
    static: Static
    runs: dict[str, np.ndarray]  # one array per axis, one entry per run
    resolved: dict[str, Any]  # the whole config after defaults and overrides, for the metadata

    @property
    def n_runs(self) -> int:
        """The number of runs."""
        return len(self.runs["seed"])

    @property
    def swept(self) -> list[str]:
        """Axes that take more than one value, seeds included."""
        return varying(self.runs)

    @functools.cached_property
    def n_train(self) -> np.ndarray:
        """Training pairs per run: round(train_fraction · N) of the task's N pairs."""
        return n_train(self.runs["train_fraction"], tasks.sizes(self.static.task).n_pairs)

    @functools.cached_property
    def run_hashes(self) -> list[str]:
        """A stable id per run (sweep/hashing.py)."""
        return hashing.run_hashes(self)

    def program_values(self, index: np.ndarray) -> dict[str, np.ndarray]:
        """The runs `index` as the compiled program takes them (train.Hparams): per axis, its values
        in the program's dtype, or the count made from them (train_fraction: n_train)."""
        return {a.arg: (getattr(self, a.counted_as) if a.counted_as else self.runs[a.name])[index].astype(a.arg_dtype)
                for a in TABLE}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def differences(a: dict, b: dict) -> dict[str, tuple]:
    """{key: (value in a, value in b)} of the resolved sweeps, name and text fields left out."""
    fa, fb = _flatten(a), _flatten(b)
    skip = {"name", "paper", "description", "path"}
    return {k: (fa.get(k), fb.get(k)) for k in sorted(fa.keys() | fb.keys())
            if k not in skip and fa.get(k) != fb.get(k)}


def said_differences(a: dict, b: dict, at_most: int = 4) -> str:
    """What differs between two resolved sweeps, for a one-line message: "train.steps: 600 → 400; …"."""
    changed = list(differences(a, b).items())
    return "; ".join(f"{k}: {va!r} → {vb!r}" for k, (va, vb) in changed[:at_most]) + ("; …" if len(changed) > at_most else "")


# ---------------------------------------------------------------------------------------------
# A table of a sweep file as its dataclass


def build(cls, table: dict, where: str):
    """A table of a sweep file as the dataclass `cls`: each key coerced to its field's type and held
    to its field's check; an unknown, missing or wrong key is one SweepError line naming it."""
    if not isinstance(table, dict):
        raise SweepError(f"{where}: must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in table:
        if key not in fields:
            raise SweepError(f"{where}.{key}: unknown key (known: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        typ = {"int": int, "float": float, "str": str, "bool": bool}[f.type if isinstance(f.type, str) else f.type.__name__]
        if name not in table:
            if f.default is dataclasses.MISSING:
                raise SweepError(f"{where}.{name}: missing required key")
            continue
        value = coerce(table[name], typ, f"{where}.{name}")
        if typ is int and not -INT_LIMIT <= value <= INT_LIMIT:
            raise SweepError(f"{where}.{name}: at most 2³¹ − 1 = {INT_LIMIT:,} in size (the compiled program's "
                             f"integers are int32), got {value:,}")
        if "check" in f.metadata:
            pred, msg = f.metadata["check"]
            if not pred(value):
                raise SweepError(f"{where}.{name}: {msg}, got {value!r}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:  # a registered class's own checks (__post_init__)
        raise SweepError(f"{where}: {e}") from None


