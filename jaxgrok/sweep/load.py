"""A sweep file's tables resolved into a Sweep: every key checked, every problem one SweepError line.

`[task]` and `[model]` name a class of the registry (tasks.py, models.py, or one of yours); the other
tables are the dataclasses of config.py, `[sweep]` the axes of axes.py.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

from jaxgrok import measures, models, registry, tasks  # noqa: F401 - models: its built-in classes registered
from jaxgrok.sweep.axes import SweepError, expand, n_train
from jaxgrok.sweep.config import GrokkingConfig, MeasuresConfig, Static, Sweep, TrainConfig, build
from jaxgrok.sweep.toml import apply_overrides, read_toml, safe_name

SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")  # a folder name under results/, nowhere else
MAX_STEPS = 10**9
MAX_EVALUATIONS = 10**6  # per run: the curves are kept on the host
TOP = {"name", "paper", "description", "task", "model", "train", "grokking", "measures", "sweep"}


def load_sweep(path: str | Path, overrides: list[str] = ()) -> Sweep:
    """Read, override and validate a sweep file; every problem raises one SweepError line."""
    path = Path(path)
    raw = apply_overrides(read_toml(path), list(overrides), str(path))
    return sweep_from_dict(raw, str(path), default_name=safe_name(path.stem))


def sweep_from_dict(raw: dict, where: str = "<sweep>", default_name: str = "sweep") -> Sweep:
    """A sweep from the plain data of a sweep file (`where` names it in messages; `default_name` is
    its name where it gives none): validated, its runs expanded; every problem one SweepError line."""
    _check_top(raw, where)
    task = _task(raw["task"], where)
    try:
        size = tasks.sizes(task)  # a registered task's table is built (and checked) here
    except ValueError as e:
        raise SweepError(f"{where}: {e}") from None
    model = _model(raw["model"], where, size)
    train = _train(raw["train"], where)
    grokking = build(GrokkingConfig, raw.get("grokking", {}), f"{where}: grokking")
    measures = _measures(raw.get("measures", {}), task, model, size, where)

    n_pairs = size.n_pairs
    if n_pairs >= 2**31:  # operand ids and pair indices are int32
        raise SweepError(f"{where}: {'task.p' if registry.is_builtin(task) else 'task'}: a table of {n_pairs:,} pairs, more than 2³¹")
    runs = expand(raw["sweep"], f"{where}: sweep")
    sizes = n_train(runs["train_fraction"], n_pairs)
    if sizes.min() < 1 or sizes.max() >= n_pairs:
        raise SweepError(f"{where}: sweep.train_fraction: leaves an empty training or validation set of {n_pairs} pairs")
    static = Static(task, model, _batch_sizes(raw["sweep"], runs, train, sizes, where), grokking, measures, n_train_min=int(sizes.min()), n_train_max=int(sizes.max()),
                    grokfast=bool((runs["grokfast_lambda"] > 0).any()), orthograd=bool((runs["orthograd"] > 0).any()),
                    constrain_norm=bool((runs["constrain_norm"] > 0).any()),
                    batch_varies=len(np.unique(runs["batch_size"])) > 1)
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


def _batch_sizes(table: dict, runs: dict, train: TrainConfig, sizes, where: str) -> TrainConfig:
    """The minibatch size: [train] batch_size for every run, or swept in [sweep] batch_size, where the
    program draws the largest and each run weighs its own first draws: the program's [train] batch_size
    is that largest (the file's, in `resolved`, stays as it was given)."""
    if "batch_size" not in table:
        runs["batch_size"][:] = train.batch_size
        key = "train.batch_size"
    elif train.batch_size:
        raise SweepError(f"{where}: sweep.batch_size: give the batch size in [train] or in [sweep], not both")
    else:
        key = "sweep.batch_size"
    b = runs["batch_size"]
    if (b == 0).any() and (b > 0).any():
        raise SweepError(f"{where}: sweep.batch_size: 0 (the full batch) cannot be swept with minibatch sizes; "
                         f"give the training set's size ({sizes.min()} pairs) instead")
    if (b > sizes).any():
        i = int(np.argmax(b > sizes))
        raise SweepError(f"{where}: {key}: {b[i]} is larger than a run's training set ({sizes[i]} pairs)")
    return dataclasses.replace(train, batch_size=int(b.max()))


def _check_top(raw, where: str) -> None:
    """The top level of a sweep file: its tables and its three strings."""
    if not isinstance(raw, dict):
        raise SweepError(f"{where}: expected a table of keys, got {type(raw).__name__}")
    for key in raw:
        if key not in TOP:
            raise SweepError(f"{where}: {key}: unknown key (known: {', '.join(sorted(TOP))})")
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


def _named(what: str, table: dict, where: str):
    """[task] or [model] as the dataclass of the class its op or kind names. A class that serves
    several names (jaxgrok's own) has that key as a field; a registered class has it as its name."""
    key = registry.NAME_KEY[what]
    cls = _lookup(what, table[key], where)
    if key not in {f.name for f in dataclasses.fields(cls)}:
        table = {k: v for k, v in table.items() if k != key}
    return build(cls, table, f"{where}: {what}")


def _task(table, where: str):
    """[task]: a built-in operation (op, p) or a registered task (op and its own keys)."""
    if not isinstance(table, dict):
        raise SweepError(f"{where}: task: must be a table")
    op = table.get("op")
    if op is None:
        raise SweepError(f"{where}: task.op: missing required key")
    if not isinstance(op, str):
        raise SweepError(f"{where}: task.op: must be a string, got {op!r}")
    task = _named("task", table, where)
    if registry.is_builtin(task):  # a registered task's table is checked when it is sized
        try:
            task.validate()
        except ValueError as e:
            raise SweepError(f"{where}: task.{e}") from None
    return task


def _model(table, where: str, size: tasks.Sizes):
    """[model]: a built-in model (of two operands) or a registered one, held to its contract."""
    if not isinstance(table, dict) or "kind" not in table:
        raise SweepError(f"{where}: model.kind: missing required key")
    kind = table["kind"]
    if not isinstance(kind, str):
        raise SweepError(f"{where}: model.kind: must be a string, got {kind!r}")
    model = _named("model", table, where)
    if registry.is_builtin(model):
        try:
            model.validate(size)
        except ValueError as e:
            raise SweepError(f"{where}: model.{e}") from None
    else:
        try:
            _registered_model(model, size)
        except ValueError as e:
            raise SweepError(f"{where}: {e}") from None
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


def _train(table, where: str) -> TrainConfig:
    """[train], with the step budget held to what the host can keep."""
    train = build(TrainConfig, table, f"{where}: train")
    if train.steps > MAX_STEPS:
        raise SweepError(f"{where}: train.steps: at most {MAX_STEPS:,}, got {train.steps:,}")
    if train.steps // train.eval_every > MAX_EVALUATIONS:
        raise SweepError(f"{where}: train.eval_every: {train.steps:,} steps / {train.eval_every} = "
                         f"{train.steps // train.eval_every:,} evaluations per run, more than {MAX_EVALUATIONS:,}")
    if train.steps % train.eval_every:
        raise SweepError(f"{where}: train.steps: must be a multiple of eval_every ({train.eval_every}), got {train.steps}")
    return train


def _measures(asked, task, model, size: tasks.Sizes, where: str) -> MeasuresConfig:
    """[measures]: one asked for where it cannot apply is an error; one left on by default is off there."""
    cfg = build(MeasuresConfig, asked, f"{where}: measures")
    modular = task.op in tasks.MODULAR_OPS
    summed = task.op in tasks.SUM_OPS
    # The Fourier measures read the embedding of the residues: a built-in model's (they all have
    # one), or a registered model's `embedding` where it has one.
    embedded = registry.is_builtin(model) or _registered_model(model, size).embedding is not None
    # Relative flatness reads the penultimate features and the output weight: a built-in model's, or a
    # registered model's `features` where it has them.
    featured = registry.is_builtin(model) or _registered_model(model, size).features is not None
    for m in (m for m in measures.MEASURES if m.needs & measures.Needs.RESIDUES and asked.get(m.switch)):
        if not modular:
            raise SweepError(f"{where}: measures.{m.switch}: needs a modular task (residues 0..p-1), not {task.op}")
        if not embedded:
            raise SweepError(f"{where}: measures.{m.switch}: model {model.kind} has no embedding (Model.embedding is None)")
    for m in (m for m in measures.MEASURES if m.needs & measures.Needs.SUM_TASK and asked.get(m.switch)):
        if not summed:
            raise SweepError(f"{where}: measures.{m.switch}: defined for {' and '.join(tasks.SUM_OPS)} only, not {task.op}")
    for m in (m for m in measures.MEASURES if m.needs & measures.Needs.FEATURES and asked.get(m.switch)):
        if not featured:
            raise SweepError(f"{where}: measures.{m.switch}: model {model.kind} has no features (Model.features is None)")

    def applies(m) -> bool:
        return ((not m.needs & measures.Needs.RESIDUES or modular and embedded)
                and (not m.needs & measures.Needs.SUM_TASK or summed)
                and (not m.needs & measures.Needs.FEATURES or featured))

    # Measures that do not apply to the task are off (their columns stay null).
    return dataclasses.replace(cfg, **{m.switch: getattr(cfg, m.switch) and applies(m) for m in measures.MEASURES})
