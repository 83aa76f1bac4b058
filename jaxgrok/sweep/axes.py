"""The axes of a sweep: the values that vary inside one compiled program, each declared once.

An axis is one entry of `TABLE`: its name, whether it is a seed or another integer or a float, its default
(None: the sweep file must give it), its check, its place in the enumeration of runs and among the
columns of runs.parquet, and how it enters the run hash. Everything that names the axes is derived
from the table: reading `[sweep]` (below), the compiled program's per-run arguments (train.Hparams),
the axis columns of runs.parquet (results.RUNS_SCHEMA) and the run hash (hashing.py). A new axis is
one entry here and the code that uses it.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


class SweepError(ValueError):
    """A sweep file (or a --set override) that cannot be run; the message is one line."""


@dataclass(frozen=True)
class Axis:
    """One swept value of a run."""

    name: str
    seed: bool  # an integer seed (int64 in runs.parquet, int32 in the program); else a float (float64, float32)
    default: int | float | None  # None: required (papers disagree: say it)
    check: tuple[Callable, str]  # (predicate, what the value must be)
    rank: int  # runs are enumerated in rank order, the highest fastest: a cell's seeds sit side by side
    column: int  # its place among the axis columns of runs.parquet
    # Added after the first results were written: left out of the run hash at its default, so that
    # runs which do not use it keep their hash (and their stored results).
    later: bool = False
    # An axis that by default takes another's values (the minibatch order is the model seed's unless
    # said), left out of the run hash, and of the swept axes, wherever it equals that axis.
    follows: str | None = None
    # Where the program takes not the value but a count made from it on the host: train_fraction
    # enters as n_train = round(train_fraction · N) (Sweep.n_train).
    counted_as: str | None = None
    # An integer that is not a seed (int64 in runs.parquet, int32 in the program).
    integer: bool = False
    # An axis that is also a [train] key (batch_size): where it takes one value it is that key, and a
    # run's hash holds its own value as that key, so a swept run hashes as the same run set alone.
    train_key: bool = False

    @property
    def is_int(self) -> bool:
        """Whether its values are integers (seeds and counts)."""
        return self.seed or self.integer

    @property
    def arg(self) -> str:
        """Its name among the compiled program's per-run arguments (train.Hparams)."""
        return self.counted_as or self.name

    @property
    def arg_dtype(self) -> type:
        """Its dtype there: seeds and counts int32, the rest float32."""
        return np.int32 if self.is_int or self.counted_as else np.float32


SEED_RANGE = (lambda v: 0 <= v < 2**31, "must be in [0, 2³¹)")

# In the order of the compiled program's per-run arguments (train.Hparams).
TABLE = (
    Axis("seed", True, 0, SEED_RANGE, rank=10, column=0),  # the model initialization
    Axis("data_seed", True, 0, SEED_RANGE, rank=7, column=1),  # the train/validation split
    Axis("batch_seed", True, None, SEED_RANGE, rank=8, column=2, follows="seed"),  # the minibatch order
    # The direction of the initialization perturbation of size init_noise.
    Axis("noise_seed", True, 0, SEED_RANGE, rank=9, column=3, later=True),
    Axis("learning_rate", False, None, (lambda v: v > 0, "must be > 0"), rank=4, column=5),
    Axis("weight_decay", False, None, (lambda v: v >= 0, "must be ≥ 0"), rank=5, column=4),
    # α: every initial weight is multiplied by it (Omnigrok).
    Axis("init_scale", False, 1.0, (lambda v: v > 0, "must be > 0"), rank=3, column=6),
    # ε: the initialization perturbation, relative to the initializer's own scale.
    Axis("init_noise", False, 0.0, (lambda v: v >= 0, "must be ≥ 0"), rank=6, column=7, later=True),
    # Grokfast's amplification of the slow gradient (0: no filter), and its EMA momentum.
    Axis("grokfast_lambda", False, 0.0, (lambda v: v >= 0, "must be ≥ 0 (0 = no filter)"), rank=1, column=9, later=True),
    Axis("grokfast_alpha", False, 0.98, (lambda v: 0 <= v < 1, "must be in [0, 1)"), rank=0, column=10, later=True),
    Axis("train_fraction", False, None, (lambda v: 0 < v < 1, "must be in (0, 1)"), rank=2, column=8,
         counted_as="n_train"),
    # ⊥Grad (Prieto et al. 2025): 1 removes from each parameter tensor's gradient its component along
    # the weights, keeping its norm; 0 leaves it alone.
    Axis("orthograd", False, 0.0, (lambda v: v in (0, 1), "must be 0 or 1"), rank=-1, column=11, later=True),
    # Omnigrok's constrained runs (Liu et al. 2023): 1 rescales the weights after every step to the
    # global L2 norm they started with (init_scale included); 0 leaves them alone.
    Axis("constrain_norm", False, 0.0, (lambda v: v in (0, 1), "must be 0 or 1"), rank=-2, column=12, later=True),
    # The minibatch size (0: the full batch), [train] batch_size where it is not swept: each run draws
    # its own, padded to the sweep's largest with the rest weighted zero.
    Axis("batch_size", False, 0, (lambda v: 0 <= v < 2**31, "must be in [0, 2³¹) (0 = full batch)"), rank=-3, column=13, later=True,
         integer=True, train_key=True),
)
BY_NAME = {a.name: a for a in TABLE}
AXES = tuple(a.name for a in sorted(TABLE, key=lambda a: a.rank))  # the order runs are enumerated in
COLUMNS = tuple(sorted(TABLE, key=lambda a: a.column))  # the order of runs.parquet's axis columns
SEED_AXES = tuple(a.name for a in TABLE if a.seed)
INT_AXES = tuple(a.name for a in TABLE if a.is_int)
REQUIRED_AXES = tuple(a.name for a in TABLE if a.default is None and a.follows is None)
AXIS_DEFAULTS = {a.name: a.default for a in TABLE if a.default is not None}
LATER_AXES = {a.name: a.default for a in TABLE if a.later}


def max_runs() -> int:
    """The most runs one sweep may have: $JAXGROK_MAX_RUNS, or a million."""
    text = os.environ.get("JAXGROK_MAX_RUNS", "1000000")
    if not text.isdigit() or int(text) < 1:
        raise SweepError(f"JAXGROK_MAX_RUNS: must be a positive integer, got {text!r}")
    return int(text)


def typename(t) -> str:
    """How a message names a TOML type."""
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[t]


def coerce(value, typ, where):
    """`value` as `typ` (an integer is a number too), or one SweepError line."""
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is int and isinstance(value, bool) or not isinstance(value, typ):
        raise SweepError(f"{where}: must be {typename(typ)}, got {value!r}")
    return value


def axis_values(axis: Axis, value, where) -> list:
    """The values a `[sweep]` key gives one axis: one value, a list, or (a seed) {count, start}."""
    if isinstance(value, dict) and axis.seed:
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
    typ = int if axis.is_int else float
    values = [coerce(v, typ, where) for v in values]
    pred, message = axis.check
    for v in values:
        if typ is float and not np.isfinite(v):
            raise SweepError(f"{where}: must be finite, got {v!r}")
        if not pred(v):
            raise SweepError(f"{where}: {message}, got {v!r}")
    return values


def _groups(zips, values: dict, where: str) -> list[tuple[str, ...]]:
    """The axes that vary together (a zip group, or one axis alone), in the order runs enumerate them."""
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
    groups.sort(key=lambda g: min(AXES.index(a) for a in g))
    return groups


def expand(table: dict, where: str) -> dict[str, np.ndarray]:
    """`[sweep]` as the table of runs: the product of the axes (a zip group's axes vary together),
    one column per axis (int64 seeds and counts, float64 values), one entry per run."""
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
    # An axis that follows another is one placeholder value until it is given that axis's values.
    values = {a: axis_values(BY_NAME[a], table.get(a, AXIS_DEFAULTS.get(a, 0)), f"{where}.{a}") for a in AXES}
    groups = _groups(zips, values, where)
    n_runs = int(np.prod([len(values[g[0]]) for g in groups], dtype=object))
    if n_runs > max_runs():
        # Name the axes that multiply up (a zip group's together), so the message says what to change.
        counts = " × ".join(" and ".join("sweep." + a for a in g) + f" {len(values[g[0]]):,}"
                            for g in groups if len(values[g[0]]) > 1)
        raise SweepError(f"{where}: {n_runs:,} runs ({counts}), more than the maximum of {max_runs():,} (JAXGROK_MAX_RUNS)")
    per_group = [list(zip(*(values[a] for a in g))) for g in groups]
    cols: dict[str, list] = {a: [] for a in AXES}
    for combo in itertools.product(*per_group):
        for g, vals in zip(groups, combo):
            for a, v in zip(g, vals):
                cols[a].append(v)
    out = {a: np.asarray(cols[a], dtype=np.int64 if BY_NAME[a].is_int else np.float64) for a in AXES}
    for axis in TABLE:
        if axis.follows and axis.name not in table:
            out[axis.name] = out[axis.follows].copy()
    return out


def varying(runs: dict[str, np.ndarray]) -> list[str]:
    """The axes that take more than one value; one that follows another only where it differs from it."""
    out = [a for a in AXES if len(np.unique(runs[a])) > 1]
    for axis in TABLE:
        if axis.follows and axis.name in out and np.array_equal(runs[axis.name], runs[axis.follows]):
            out.remove(axis.name)
    return out


def n_train(train_fraction, n_pairs: int) -> np.ndarray:
    """Training pairs per run: round(train_fraction · N) of a task's N pairs."""
    return np.round(np.asarray(train_fraction) * n_pairs).astype(np.int64)
