"""Sweep files: a TOML file in, a validated static config and the table of runs out.

A sweep file has six tables. `[task]`, `[model]`, `[train]`, `[grokking]` and `[measures]` fix
everything that decides the compiled program (shapes, depth, step budget); `[sweep]` lists the values of the axes
that vary *inside* that one program: four seeds (initialization, data split, minibatch order, and the
direction of an initialization perturbation), weight decay, learning rate, initialization scale and
perturbation size, train fraction, and Grokfast's filter. The runs are the product of the axes; axes
named together in `zip` vary together instead.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import itertools
import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jaxgrok import registry, tasks

# The axes that vary inside one compiled program, in the order runs are enumerated (last fastest).
AXES = ("grokfast_alpha", "grokfast_lambda", "train_fraction", "init_scale", "learning_rate", "weight_decay",
        "init_noise", "data_seed", "batch_seed", "noise_seed", "seed")
# The sources of randomness: seed draws the initialization, data_seed the train/validation split,
# batch_seed the minibatch order (by default the model seed's, as before it was an axis), and
# noise_seed the direction of the initialization perturbation of size init_noise.
SEED_AXES = ("seed", "data_seed", "batch_seed", "noise_seed")
REQUIRED_AXES = ("learning_rate", "weight_decay", "train_fraction")  # papers disagree: say them
AXIS_DEFAULTS = {"seed": 0, "data_seed": 0, "init_scale": 1.0}
# Axes added after the first results were written. At their default they are left out of the run
# hash, so that runs which do not use them keep the hash (and the stored results) they had.
LATER_AXES = {"init_noise": 0.0, "noise_seed": 0, "grokfast_lambda": 0.0, "grokfast_alpha": 0.98}
AXIS_DEFAULTS |= LATER_AXES
# Likewise [train] keys added later: left out of the run hash at their default.
LATER_TRAIN = {"precision": "float32"}
PRECISIONS = ("float32", "tf32", "bfloat16")
OPTIMIZERS = ("adamw", "adam", "sgd")


SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")  # a folder name under results/, nowhere else
MAX_STEPS = 10**9
MAX_EVALUATIONS = 10**6  # per run: the curves are kept on the host


def max_runs() -> int:
    """The most runs one sweep may have: $JAXGROK_MAX_RUNS, or a million."""
    text = os.environ.get("JAXGROK_MAX_RUNS", "1000000")
    if not text.isdigit() or int(text) < 1:
        raise SweepError(f"JAXGROK_MAX_RUNS: must be a positive integer, got {text!r}")
    return int(text)


def _safe_name(stem: str) -> str:
    """A file's stem as a default sweep name: characters outside the safe set become _."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", stem)[:100].lstrip(".")
    return name or "sweep"


class SweepError(ValueError):
    """A sweep file (or a --set override) that cannot be run; the message is one line."""


def _check(pred, msg):
    return {"check": (pred, msg)}


@dataclass(frozen=True)
class TaskConfig:
    op: str = field(metadata=_check(lambda v: v in tasks.OPS, f"unknown task; one of {', '.join(tasks.OPS)}"))
    p: int = field(default=0, metadata=_check(lambda v: v == 0 or v >= 2, "must be ≥ 2"))


@dataclass(frozen=True)
class MLPConfig:
    """Two token embeddings, concatenated, one hidden layer: the model that groks on a CPU."""

    kind: str = "mlp"
    d_embed: int = field(default=32, metadata=_check(lambda v: v > 0, "must be > 0"))
    d_hidden: int = field(default=128, metadata=_check(lambda v: v > 0, "must be > 0"))
    activation: str = field(default="relu", metadata=_check(lambda v: v in ("relu", "gelu"), "must be relu or gelu"))
    # devinterp's grokking MLP: one embedding table shared by both operands, no output bias.
    tie_embeddings: bool = False
    output_bias: bool = True


@dataclass(frozen=True)
class TransformerConfig:
    """Decoder-only transformer on the tokens "a b =", logits read at the last position."""

    kind: str = "transformer"
    n_layers: int = field(default=1, metadata=_check(lambda v: v in (1, 2, 3, 4), "must be 1 to 4"))
    d_model: int = field(default=128, metadata=_check(lambda v: v > 0, "must be > 0"))
    n_heads: int = field(default=4, metadata=_check(lambda v: v > 0, "must be > 0"))
    d_mlp: int = field(default=512, metadata=_check(lambda v: v > 0, "must be > 0"))
    activation: str = field(default="relu", metadata=_check(lambda v: v in ("relu", "gelu"), "must be relu or gelu"))
    layer_norm: bool = False


@dataclass(frozen=True)
class GromovConfig:
    """Gromov 2023: one-hot (a, b) -> W1 -> x² -> W2, no biases, trained with MSE."""

    kind: str = "gromov"
    d_hidden: int = field(default=500, metadata=_check(lambda v: v > 0, "must be > 0"))


MODELS = {"mlp": MLPConfig, "transformer": TransformerConfig, "gromov": GromovConfig}


@dataclass(frozen=True)
class TrainConfig:
    steps: int = field(metadata=_check(lambda v: v > 0, "must be > 0"))
    eval_every: int = field(default=100, metadata=_check(lambda v: v > 0, "must be > 0"))
    batch_size: int = field(default=0, metadata=_check(lambda v: v >= 0, "must be ≥ 0 (0 = full batch)"))
    warmup_steps: int = field(default=10, metadata=_check(lambda v: v >= 0, "must be ≥ 0"))
    beta1: float = field(default=0.9, metadata=_check(lambda v: 0 <= v < 1, "must be in [0, 1)"))
    beta2: float = field(default=0.98, metadata=_check(lambda v: 0 <= v < 1, "must be in [0, 1)"))
    # adamw: decoupled weight decay (Loshchilov & Hutter); adam: torch.optim.Adam's weight_decay,
    # an L2 term added to the gradient before the moments (devinterp's and Grokfast's code use it);
    # sgd: plain (minibatch or full-batch) gradient descent, weight decay as torch.optim.SGD's L2
    # term, no momentum (Gromov 2023; Barak et al. 2022). beta1 and beta2 are Adam's only.
    optimizer: str = field(default="adamw", metadata=_check(lambda v: v in OPTIMIZERS, "must be adamw, adam or sgd"))
    loss: str = field(default="auto", metadata=_check(lambda v: v in ("auto", "cross_entropy", "mse"), "must be auto, cross_entropy or mse"))
    chunk_steps: int = field(default=1000, metadata=_check(lambda v: v > 0, "must be > 0"))
    max_runs_per_batch: int = field(default=0, metadata=_check(lambda v: v >= 0, "must be ≥ 0 (0 = fit to memory)"))
    # float32: true float32 matmuls (GPUs would otherwise use TF32); tf32: TensorFloat-32 matmuls;
    # bfloat16: the forward and backward pass in bfloat16, parameters, optimizer state and losses
    # in float32. Part of the run hash: a mixed-precision run is never mistaken for a float32 one.
    precision: str = field(default="float32", metadata=_check(lambda v: v in PRECISIONS, "must be float32, tf32 or bfloat16"))


@dataclass(frozen=True)
class GrokkingConfig:
    threshold: float = field(default=0.99, metadata=_check(lambda v: 0 < v <= 1, "must be in (0, 1]"))
    # Liu et al. 2022 draw the phases from the steps to 0.9 accuracy and call it grokking when
    # validation lags training by more than 10³ steps.
    phase_accuracy: float = field(default=0.9, metadata=_check(lambda v: 0 < v <= 1, "must be in (0, 1]"))
    phase_gap: int = field(default=1000, metadata=_check(lambda v: v >= 0, "must be ≥ 0"))


@dataclass(frozen=True)
class MeasuresConfig:
    """Progress measures computed inside the compiled program at every evaluation (measures/)."""

    dist_from_init: bool = True  # ‖θ − θ₀‖
    fourier: bool = True  # fourier_gini, n_key_freqs, top_freq_share; key_freqs in runs.parquet
    key_freq_share: float = field(default=0.9, metadata=_check(lambda v: 0 < v <= 1, "must be in (0, 1]"))
    circularity: bool = True  # Zhong et al. 2023
    restricted_loss: bool = True  # Nanda et al. 2023: restricted and excluded loss (x+y, x-y)
    restricted_freqs: int = field(default=5, metadata=_check(lambda v: v >= 1, "must be ≥ 1"))
    # The local learning coefficient by SGLD (Lau et al. 2025; devinterp). Off unless asked: it
    # costs chains × (burn_in + draws) minibatch gradient steps per estimate.
    llc: bool = False
    llc_every: int = field(default=30, metadata=_check(lambda v: v >= 1, "must be ≥ 1 (evaluations between estimates)"))
    llc_epsilon: float = field(default=3e-3, metadata=_check(lambda v: 0 < v < 1, "must be in (0, 1)"))
    llc_gamma: float = field(default=5.0, metadata=_check(lambda v: v >= 0, "must be ≥ 0"))
    llc_nbeta: float = field(default=2.0, metadata=_check(lambda v: v > 0, "must be > 0"))
    llc_chains: int = field(default=4, metadata=_check(lambda v: 1 <= v <= 64, "must be 1 to 64"))
    llc_draws: int = field(default=50, metadata=_check(lambda v: 1 <= v <= 100_000, "must be 1 to 100000"))
    llc_burn_in: int = field(default=0, metadata=_check(lambda v: 0 <= v <= 100_000, "must be 0 to 100000"))
    llc_batch_size: int = field(default=128, metadata=_check(lambda v: v >= 0, "must be ≥ 0 (0 = the whole training set)"))


@dataclass(frozen=True)
class Static:
    """Everything that decides the compiled program: hashable, closed over, never traced."""

    task: TaskConfig
    model: MLPConfig | TransformerConfig | GromovConfig
    train: TrainConfig
    grokking: GrokkingConfig
    measures: MeasuresConfig
    n_train_min: int  # smallest training set in the sweep
    n_train_max: int  # largest training set in the sweep: the static length of the train gather
    grokfast: bool = False  # some run filters its gradients (grokfast_lambda > 0)

    @property
    def loss(self) -> str:
        if self.train.loss != "auto":
            return self.train.loss
        return "mse" if self.model.kind == "gromov" else "cross_entropy"


@dataclass(frozen=True)
class Sweep:
    name: str
    paper: str
    description: str
    path: str
    static: Static
    runs: dict[str, np.ndarray]  # one array per axis, one entry per run
    resolved: dict[str, Any]  # the whole config after defaults and overrides, for the metadata

    @property
    def n_runs(self) -> int:
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
        """A stable id per run: the hash of everything that determines its training (how the
        steps are cut into chunks and runs into batches does not)."""
        train = {k: v for k, v in self.resolved["train"].items() if k not in ("chunk_steps", "max_runs_per_batch")
                 and LATER_TRAIN.get(k, object()) != v}
        # The measures are in: a run's recorded columns depend on them (its training does not).
        static = {"task": self.resolved["task"], "model": self.resolved["model"], "train": train,
                  "measures": self.resolved["measures"]}
        if code := registry.origins(self.static.task, self.static.model):  # only where a kind is registered
            static["code"] = code
        static = json.dumps(static, sort_keys=True)
        out = []
        for i in range(self.n_runs):
            hp = {a: self.runs[a][i].item() for a in AXES}
            for a, default in LATER_AXES.items():  # at their default, as before they existed
                if hp[a] == default:
                    del hp[a]
            if hp["batch_seed"] == hp["seed"]:
                del hp["batch_seed"]
            # A full batch is padded to the sweep's largest training set, and the padded length
            # changes how its sums round: a run padded past its own pairs is a different computation.
            if not self.static.train.batch_size and self.n_train[i] < self.static.n_train_max:
                hp["padded_to"] = self.static.n_train_max
            # Likewise a program with a Grokfast filter in it: with λ = 0 the optimizer gets the same
            # gradients, but XLA fuses its arithmetic differently and the last bits differ.
            if self.static.grokfast:
                hp["grokfast_program"] = True
            blob = static + json.dumps(hp, sort_keys=True)
            out.append(hashlib.sha256(blob.encode()).hexdigest()[:16])
        return out


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


def varying(runs: dict[str, np.ndarray]) -> list[str]:
    """The axes that take more than one value; batch_seed only where it is not the model seed's."""
    out = [a for a in AXES if len(np.unique(runs[a])) > 1]
    if "batch_seed" in out and np.array_equal(runs["batch_seed"], runs["seed"]):
        out.remove("batch_seed")
    return out


def n_train(train_fraction, n_pairs: int) -> np.ndarray:
    return np.round(np.asarray(train_fraction) * n_pairs).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Validation


def _typename(t) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[t]


def _coerce(value, typ, where):
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is int and isinstance(value, bool) or not isinstance(value, typ):
        raise SweepError(f"{where}: must be {_typename(typ)}, got {value!r}")
    return value


def _build(cls, table: dict, where: str):
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
        value = _coerce(table[name], typ, f"{where}.{name}")
        if "check" in f.metadata:
            pred, msg = f.metadata["check"]
            if not pred(value):
                raise SweepError(f"{where}.{name}: {msg}, got {value!r}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:  # a registered class's own checks (__post_init__)
        raise SweepError(f"{where}: {e}") from None


def _axis_values(name, value, where) -> list:
    if isinstance(value, dict) and name in SEED_AXES:
        extra = set(value) - {"count", "start"}
        if extra or "count" not in value:
            raise SweepError(f"{where}: a seed range is {{count = N, start = S}}")
        count, start = value["count"], value.get("start", 0)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (count, start)):
            raise SweepError(f"{where}: count and start must be integers")
        if count > max_runs():
            raise SweepError(f"{where}: count: {count:,} runs, more than the maximum of {max_runs():,} (JAXGROK_MAX_RUNS)")
        values = list(range(start, start + count))
    else:
        values = value if isinstance(value, list) else [value]
    if not values:
        raise SweepError(f"{where}: empty axis")
    typ = int if name in SEED_AXES else float
    values = [_coerce(v, typ, where) for v in values]
    seed_range = (lambda v: 0 <= v < 2**31, "must be in [0, 2³¹)")
    bad = {
        "weight_decay": (lambda v: v >= 0, "must be ≥ 0"),
        "learning_rate": (lambda v: v > 0, "must be > 0"),
        "init_scale": (lambda v: v > 0, "must be > 0"),
        "init_noise": (lambda v: v >= 0, "must be ≥ 0"),
        "train_fraction": (lambda v: 0 < v < 1, "must be in (0, 1)"),
        "grokfast_lambda": (lambda v: v >= 0, "must be ≥ 0 (0 = no filter)"),
        "grokfast_alpha": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    }.get(name, seed_range)
    for v in values:
        if typ is float and not np.isfinite(v):
            raise SweepError(f"{where}: must be finite, got {v!r}")
        if not bad[0](v):
            raise SweepError(f"{where}: {bad[1]}, got {v!r}")
    return values


def _expand(table: dict, where: str) -> dict[str, np.ndarray]:
    """The product of the axes (zip groups vary together) as one column per axis."""
    if not isinstance(table, dict):
        raise SweepError(f"{where}: must be a table")
    zips = table.get("zip", [])
    if not isinstance(zips, list) or not all(isinstance(z, list) and all(isinstance(a, str) for a in z) for z in zips):
        raise SweepError(f"{where}.zip: must be a list of lists of axis names")
    for key in table:
        if key != "zip" and key not in AXES:
            raise SweepError(f"{where}.{key}: unknown key (axes: {', '.join(AXES)}; and zip)")
    for axis in REQUIRED_AXES:
        if axis not in table:
            raise SweepError(f"{where}.{axis}: missing required key")
    # Without its own axis the minibatch order follows the model seed (as before batch_seed existed).
    values = {a: _axis_values(a, table.get(a, AXIS_DEFAULTS.get(a, 0)), f"{where}.{a}") for a in AXES}

    groups: list[tuple[str, ...]] = []
    zipped: set[str] = set()
    for z in zips:
        if not z:
            raise SweepError(f"{where}.zip: an empty group")
        for a in z:
            if a not in AXES:
                raise SweepError(f"{where}.zip: {a!r} is not an axis")
            if a in zipped:
                raise SweepError(f"{where}.zip: {a!r} appears in two groups")
            zipped.add(a)
        lengths = {len(values[a]) for a in z}
        if len(lengths) > 1:
            raise SweepError(f"{where}.zip: axes {', '.join(z)} have different lengths {sorted(lengths)}")
        groups.append(tuple(z))
    groups += [(a,) for a in AXES if a not in zipped]
    # Enumerate in AXES order so that the seeds of a cell sit next to each other.
    groups.sort(key=lambda g: min(AXES.index(a) for a in g))
    n_runs = int(np.prod([len(values[g[0]]) for g in groups], dtype=object))
    if n_runs > max_runs():
        raise SweepError(f"{where}: {n_runs:,} runs, more than the maximum of {max_runs():,} (JAXGROK_MAX_RUNS)")
    per_group = [list(zip(*(values[a] for a in g))) for g in groups]
    cols: dict[str, list] = {a: [] for a in AXES}
    for combo in itertools.product(*per_group):
        for g, vals in zip(groups, combo):
            for a, v in zip(g, vals):
                cols[a].append(v)
    out = {a: np.asarray(cols[a], dtype=np.int64 if a in SEED_AXES else np.float64) for a in AXES}
    if "batch_seed" not in table:
        out["batch_seed"] = out["seed"].copy()
    return out


# ---------------------------------------------------------------------------------------------
# Overrides and loading


def _parse_value(text: str):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word: a string


def _tables_with(key: str, raw: dict) -> list[str]:
    """The tables where a bare `--set KEY=...` could belong: where the file has it, else the schema."""
    present = [t for t, v in raw.items() if isinstance(v, dict) and key in v]
    if present:
        return present

    def named(what, builtin, default):  # the class of the file's task or model, if it names a known one
        name = raw.get(what, {}).get(registry.NAME_KEY[what]) if isinstance(raw.get(what), dict) else None
        if not isinstance(name, str):
            return default
        try:
            return builtin.get(name) or registry.lookup(what, name) or default
        except ValueError:  # a broken entry point: said when the sweep is validated
            return default

    schema = {
        "task": named("task", dict.fromkeys(tasks.OPS, TaskConfig), TaskConfig), "train": TrainConfig,
        "grokking": GrokkingConfig, "measures": MeasuresConfig, "model": named("model", MODELS, MLPConfig),
    }
    found = [t for t, cls in schema.items() if key in {f.name for f in dataclasses.fields(cls)}]
    return found + (["sweep"] if key in AXES else [])


def _split_override(item) -> tuple[str, object]:
    """("KEY", value) from "KEY=VALUE" (the value read as TOML), or from a (key, value) pair (Python)."""
    if isinstance(item, tuple):
        return str(item[0]).strip(), item[1]
    key, sep, text = str(item).partition("=")
    if not sep or not key.strip():
        raise SweepError(f"--set {item}: expected KEY=VALUE")
    return key.strip(), _parse_value(text)


def overrides_id(overrides) -> str:
    """A short name for a set of overrides (their order aside): an overridden sweep's own folder."""
    pairs = sorted((k, json.dumps(v, sort_keys=True, default=str)) for k, v in map(_split_override, overrides))
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()[:8]


def apply_overrides(raw: dict, overrides: list, where: str) -> dict:
    """`--set train.steps=500`, or `--set steps=500` when the key belongs to one table only. An
    override is "KEY=VALUE" (VALUE in TOML) or, from Python, a (KEY, value) pair."""
    try:
        raw = json.loads(json.dumps(raw))  # a deep copy of plain TOML data
    except (TypeError, ValueError) as e:  # a dict from Python holding something TOML cannot say
        raise SweepError(f"{where}: not plain TOML data ({e})") from None
    for item in overrides:
        try:
            key, value = _split_override(item)
        except SweepError as e:
            raise SweepError(f"{where}: {e}") from None
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?", key):
            raise SweepError(f"{where}: --set {item}: KEY is NAME or TABLE.NAME (letters, digits, _)")
        if "." in key:
            table, key = key.split(".", 1)
        elif key in ("name", "paper", "description"):
            table = None
        else:
            owners = _tables_with(key, raw)
            if len(owners) != 1:
                problem = "no such key" if not owners else f"ambiguous ({', '.join(owners)})"
                raise SweepError(f"{where}: --set {key}: {problem}; write TABLE.KEY")
            table = owners[0]
        target = raw if table is None else raw.setdefault(table, {})
        if not isinstance(target, dict):
            raise SweepError(f"{where}: --set {table}.{key}: {table} is not a table")
        target[key] = value
        _no_dates(target[key], where, f"--set {key}")
    return raw


def _no_dates(value, where: str, key: str = "") -> None:
    """TOML has dates and times; no key of a sweep takes one. `where` names the file."""
    if isinstance(value, (datetime.date, datetime.time)):
        raise SweepError(f"{where}: {key}: must not be a date or a time, got {value.isoformat()}")
    if isinstance(value, dict):
        for k, v in value.items():
            _no_dates(v, where, f"{key}.{k}" if key else k)
    elif isinstance(value, list):
        for v in value:
            _no_dates(v, where, key)


def read_toml(path: Path) -> dict:
    """A TOML file as a dict; every way it can fail is one SweepError line naming the file."""
    where = str(path)
    if not path.exists():
        raise SweepError(f"{where}: no such file")
    if not path.is_file():  # a directory, a FIFO (reading it would block), a device
        raise SweepError(f"{where}: not a regular file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise SweepError(f"{where}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise SweepError(f"{where}: cannot read ({e.strerror})") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        # tomllib says where, not what (a duplicate key is "Cannot overwrite a value"): show the line.
        line = re.search(r"line (\d+)", str(e))
        shown = ""
        if line and 0 < int(line.group(1)) <= len(text.splitlines()):
            shown = f": {text.splitlines()[int(line.group(1)) - 1].strip()[:80]!r}"
        raise SweepError(f"{where}: not valid TOML ({e}){shown}") from None
    _no_dates(raw, where)
    return raw


def _task(table, where: str):
    """[task]: a built-in operation (op, p) or a registered task (op and its own keys)."""
    if not isinstance(table, dict):
        raise SweepError(f"{where}: task: must be a table")
    op = table.get("op")
    if op is None:
        raise SweepError(f"{where}: task.op: missing required key")
    if not isinstance(op, str):
        raise SweepError(f"{where}: task.op: must be a string, got {op!r}")
    if op not in tasks.OPS:
        cls = _lookup("task", op, where)
        return _build(cls, {k: v for k, v in table.items() if k != "op"}, f"{where}: task")
    task = _build(TaskConfig, table, f"{where}: task")
    if task.op in tasks.MODULAR_OPS:
        if task.p == 0:
            raise SweepError(f"{where}: task.p: missing required key for task {task.op}")
        if task.op in tasks.NEEDS_PRIME and not tasks.is_prime(task.p):
            raise SweepError(f"{where}: task.p: {task.op} needs a prime modulus, got {task.p}")
    elif task.p != 0:
        raise SweepError(f"{where}: task.p: task {task.op} takes no modulus")
    return task


def _model(table, where: str, size: tasks.Sizes):
    """[model]: a built-in model (of two operands) or a registered one, held to its contract."""
    if not isinstance(table, dict) or "kind" not in table:
        raise SweepError(f"{where}: model.kind: missing required key")
    kind = table["kind"]
    if not isinstance(kind, str):
        raise SweepError(f"{where}: model.kind: must be a string, got {kind!r}")
    if kind not in MODELS:
        model = _build(_lookup("model", kind, where), {k: v for k, v in table.items() if k != "kind"}, f"{where}: model")
        try:
            _registered_model(model, size)
        except ValueError as e:
            raise SweepError(f"{where}: {e}") from None
        return model
    model = _build(MODELS[kind], table, f"{where}: model")
    if size.n_inputs != 2:
        raise SweepError(f"{where}: model.kind: {kind} reads two operands (a, b); the task's examples have "
                         f"{size.n_inputs} tokens: use a model registered for it")
    if model.kind == "transformer" and model.d_model % model.n_heads:
        raise SweepError(f"{where}: model.n_heads: must divide d_model ({model.d_model}), got {model.n_heads}")
    return model


def _registered_model(model, size: tasks.Sizes):
    return registry.check_model(model, size.n_symbols, size.n_classes, size.n_inputs)  # built once (cached)


def _lookup(what: str, name: str, where: str):
    key = f"{what}.{registry.NAME_KEY[what]}"
    try:
        cls = registry.lookup(what, name)
    except ValueError as e:
        raise SweepError(f"{where}: {key}: {e}") from None
    if cls is None:
        raise SweepError(f"{where}: {key}: unknown {what} {name!r}; one of {', '.join(registry.known(what))} "
                         f"(or register one: see README, Your own model or task)")
    return cls


def load_sweep(path: str | Path, overrides: list[str] = ()) -> Sweep:
    """Read, override and validate a sweep file; every problem raises one SweepError line."""
    path = Path(path)
    raw = apply_overrides(read_toml(path), list(overrides), str(path))
    return sweep_from_dict(raw, str(path), default_name=_safe_name(path.stem))


def sweep_from_dict(raw: dict, where: str = "<sweep>", default_name: str = "sweep") -> Sweep:
    if not isinstance(raw, dict):
        raise SweepError(f"{where}: expected a table of keys, got {type(raw).__name__}")
    top = {"name", "paper", "description", "task", "model", "train", "grokking", "measures", "sweep"}
    for key in raw:
        if key not in top:
            raise SweepError(f"{where}: {key}: unknown key (known: {', '.join(sorted(top))})")
    for key in ("paper", "task", "model", "train", "sweep"):
        if key not in raw:
            raise SweepError(f"{where}: {key}: missing required key")
    for key in ("name", "paper", "description"):
        if key in raw and not isinstance(raw[key], str):
            raise SweepError(f"{where}: {key}: must be a string, got {raw[key]!r}")
    if "name" in raw and not SAFE_NAME.fullmatch(raw["name"]):
        # The name is the default output folder: never a path, never hidden.
        raise SweepError(f"{where}: name: letters, digits, '-', '_' and '.' only, not starting with '.', "
                         f"at most 100; got {raw['name']!r}")

    task = _task(raw["task"], where)
    try:
        size = tasks.sizes(task)  # a registered task's table is built (and checked) here
    except ValueError as e:
        raise SweepError(f"{where}: {e}") from None
    model = _model(raw["model"], where, size)

    train = _build(TrainConfig, raw["train"], f"{where}: train")
    if train.steps > MAX_STEPS:
        raise SweepError(f"{where}: train.steps: at most {MAX_STEPS:,}, got {train.steps:,}")
    if train.steps // train.eval_every > MAX_EVALUATIONS:
        raise SweepError(f"{where}: train.eval_every: {train.steps:,} steps / {train.eval_every} = "
                         f"{train.steps // train.eval_every:,} evaluations per run, more than {MAX_EVALUATIONS:,}")
    if train.steps % train.eval_every:
        raise SweepError(f"{where}: train.steps: must be a multiple of eval_every ({train.eval_every}), got {train.steps}")
    grokking = _build(GrokkingConfig, raw.get("grokking", {}), f"{where}: grokking")
    measures = _build(MeasuresConfig, raw.get("measures", {}), f"{where}: measures")
    asked = raw.get("measures", {})
    modular = task.op in tasks.MODULAR_OPS
    # The Fourier measures read the embedding of the residues: a built-in model's, or a registered
    # model's `embedding` where it has one.
    embedded = model.kind in MODELS or _registered_model(model, size).embedding is not None
    for key in ("fourier", "circularity", "restricted_loss"):
        if asked.get(key) and not modular:
            raise SweepError(f"{where}: measures.{key}: needs a modular task (residues 0..p-1), not {task.op}")
        if asked.get(key) and not embedded:
            raise SweepError(f"{where}: measures.{key}: model {model.kind} has no embedding (Model.embedding is None)")
    if asked.get("restricted_loss") and task.op not in tasks.SUM_OPS:
        raise SweepError(f"{where}: measures.restricted_loss: defined for {' and '.join(tasks.SUM_OPS)} only, not {task.op}")
    # Measures that do not apply to the task are off (their columns stay null).
    measures = dataclasses.replace(measures, fourier=measures.fourier and modular and embedded,
                                   circularity=measures.circularity and modular and embedded,
                                   restricted_loss=measures.restricted_loss and task.op in tasks.SUM_OPS and embedded)

    n_pairs = size.n_pairs
    if n_pairs >= 2**31:  # operand ids and pair indices are int32
        raise SweepError(f"{where}: {'task.p' if task.op in tasks.OPS else 'task'}: a table of {n_pairs:,} pairs, more than 2³¹")
    runs = _expand(raw["sweep"], f"{where}: sweep")
    sizes = n_train(runs["train_fraction"], n_pairs)
    if sizes.min() < 1 or sizes.max() >= n_pairs:
        raise SweepError(f"{where}: sweep.train_fraction: leaves an empty training or validation set of {n_pairs} pairs")
    if train.batch_size and train.batch_size > sizes.min():
        raise SweepError(f"{where}: train.batch_size: larger than the smallest training set ({sizes.min()} pairs)")

    static = Static(task, model, train, grokking, measures, n_train_min=int(sizes.min()), n_train_max=int(sizes.max()),
                    grokfast=bool((runs["grokfast_lambda"] > 0).any()))
    resolved = {
        "name": raw.get("name", default_name),
        "paper": raw["paper"],
        "description": raw.get("description", ""),
        "task": registry.as_dict(task, "task"),
        "model": registry.as_dict(model, "model"),
        "train": dataclasses.asdict(train),
        "grokking": dataclasses.asdict(grokking),
        "measures": dataclasses.asdict(measures),
        "sweep": raw["sweep"],
    }
    return Sweep(resolved["name"], raw["paper"], resolved["description"], where, static, runs, resolved)
