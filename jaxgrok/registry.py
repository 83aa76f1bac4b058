"""Tasks and models by name: jaxgrok's own and yours, in one table, swept alike.

A **task** is a frozen dataclass of its parameters with a method `table(self) -> jaxgrok.Table`:
every example of the task, `inputs` int32[N, L] (L tokens per example, each in [0, n_symbols)) and
`targets` int32[N] (each in [0, n_classes)). Each run splits the table into training and validation
examples by its train_fraction and data_seed, as for the built-in tasks (where L = 2: the pair a, b).

A **model** is a frozen dataclass of its parameters with a method
`build(self, n_symbols, n_classes, n_inputs) -> jaxgrok.Model`, a tuple of pure functions:
`init(key) -> params` (a pytree of float32 arrays), `apply(params, inputs int32[N, L]) -> logits
float32[N, n_classes]`, `forward_flops(N)` and `activations(N)` (matmul FLOPs of one forward pass over
N examples, and the floats it keeps for the backward pass: the batch sizing reads them), and optionally
`embedding(params) -> float32[n_symbols, D]` (the operands' embeddings, for the Fourier measures) and
`features(params, inputs) -> (h float32[N, D], W_out float32[D, n_classes] or [n_classes, D])` (the
penultimate features and the output layer's weight, logits = h·W_out + bias: for relative flatness).

Register them in Python (`@jaxgrok.register_task("sparse_parity")`, `@jaxgrok.register_model(...)`)
or, from an installed package, through the entry-point groups `jaxgrok.tasks` and `jaxgrok.models`
(found by `jaxgrok run` without any import). A sweep file names the task by `[task] op = NAME` and the
model by `[model] kind = NAME`; every other key of the table is a field of the dataclass, checked like a
built-in key: its type from the annotation (int, float, str or bool), anything else by the class's
`__post_init__` raising ValueError("KEY: what is wrong").

jaxgrok's own tasks (tasks.py) and models (models.py) register here too, through `builtin`, when their
module is imported. They differ from yours in two ways only: one class may serve several names (the
name is one of its fields), and jaxgrok trusts them (they are not traced on registration, and the run
hash does not name their code). This module imports nothing of jaxgrok's: everything else imports it.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import re
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

GROUPS = {"task": "jaxgrok.tasks", "model": "jaxgrok.models"}
NAME_KEY = {"task": "op", "model": "kind"}  # the sweep-file key that names one
METHOD = {"task": "table", "model": "build"}
SCALARS = {"int", "float", "str", "bool"}
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.+-]{0,63}")

_registered: dict[str, dict[str, type]] = {"task": {}, "model": {}}  # name -> class, jaxgrok's and yours
_builtin: dict[str, dict[str, type]] = {"task": {}, "model": {}}  # those of them that are jaxgrok's own


class Table(NamedTuple):
    """What a task's `table()` returns: every example of the task."""

    inputs: np.ndarray  # int32 [N, L]: token ids in [0, n_symbols); L = 2 (a, b) for the built-in tasks
    targets: np.ndarray  # int32 [N]: answer ids in [0, n_classes)
    n_symbols: int  # operand vocabulary (the transformer adds one token for "=")
    n_classes: int


class Model(NamedTuple):
    """What a model's `build()` returns: the model as pure functions."""

    init: Callable  # key -> params
    apply: Callable  # (params, inputs int32[N, L]) -> logits float32[N, n_classes]; L = 2 (a, b) for the built-in tasks
    forward_flops: Callable  # n_pairs -> matmul FLOPs of one forward pass (2·m·n·k each)
    activations: Callable  # n_pairs -> floats one forward pass keeps for the backward pass
    # params -> float32[n_symbols, D]: the operands' embeddings, for the Fourier measures (None: the
    # model has none, and those measures are off)
    embedding: Callable | None = None
    # (params, inputs int32[N, L]) -> (h float32[N, D], W_out float32[D, n_classes] or [n_classes, D]): the
    # penultimate features and the last linear map's weight (its bias, if any, left out), logits = h·W_out
    # + bias, for relative flatness (None: the model has none, and that measure is off)
    features: Callable | None = None


def register_task(name: str):
    """Class decorator: the frozen dataclass becomes the task `[task] op = name`."""
    return lambda cls: _register("task", name, cls)


def register_model(name: str):
    """Class decorator: the frozen dataclass becomes the model `[model] kind = name`."""
    return lambda cls: _register("model", name, cls)


def builtin(what: str, names, cls: type) -> type:
    """Registers one of jaxgrok's own classes under each of `names` (its `op` or `kind` field says
    which); the order of registration is the order `known` lists them in."""
    for name in names:
        held = _registered[what].get(name)
        if held is not None and held is not cls:  # registered by a user before jaxgrok's own module loaded
            raise ValueError(f"{what} {name!r}: built into jaxgrok; {held.__module__}.{held.__qualname__} "
                             f"must choose another name")
        _registered[what][name] = _builtin[what][name] = cls
    return cls


def _register(what: str, name: str, cls: type) -> type:
    where = f"{what} {name!r}"
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ValueError(f"{where}: a name is letters, digits and _ . + - (at most 64), starting with a letter or _")
    if name in _builtin[what]:
        raise ValueError(f"{where}: built into jaxgrok; choose another name")
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen):
        raise TypeError(f"{where}: must be a frozen dataclass (@dataclass(frozen=True)), got {cls!r}")
    if not callable(getattr(cls, METHOD[what], None)):
        raise TypeError(f"{where}: {cls.__qualname__} has no method {METHOD[what]}()")
    for f in dataclasses.fields(cls):
        typename = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if typename not in SCALARS:
            raise TypeError(f"{where}: field {f.name}: a sweep file sets int, float, str or bool, not {typename}")
        if f.name == NAME_KEY[what]:
            raise TypeError(f"{where}: field {f.name}: reserved (the sweep file's {NAME_KEY[what]} names the {what})")
    for other, c in _registered[what].items():
        if c is cls and other != name:  # its name is an attribute of the class: one name each
            raise ValueError(f"{where}: {cls.__qualname__} is registered as {other!r} already")
    old = _registered[what].get(name)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        # The same class again (a notebook cell run twice) replaces it; another one is a clash.
        raise ValueError(f"{where}: already registered by {old.__module__}.{old.__qualname__}")
    setattr(cls, NAME_KEY[what], name)  # so that cfg.op / cfg.kind name it, as for the built-in ones
    _registered[what][name] = cls
    check_model.cache_clear()  # a class registered anew (a notebook cell re-run) is built anew
    return cls


def _entry_points(what: str) -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=GROUPS[what])}


def lookup(what: str, name: str) -> type | None:
    """The class of a task or model name, loading an installed package's entry point for it on
    first use; None if nothing registers it. A broken entry point is one ValueError line."""
    if name in _registered[what]:
        return _registered[what][name]
    ep = _entry_points(what).get(name)
    if ep is None:
        return None
    try:
        cls = ep.load()  # importing the module may register it with the decorator
        if name not in _registered[what]:
            _register(what, name, cls)
    except Exception as e:  # noqa: BLE001 - whatever the package raises, say it in one line
        raise ValueError(f"entry point {GROUPS[what]}: {name} = {ep.value}: cannot load ({_said(e)})") from None
    return _registered[what][name]


def _said(e: Exception) -> str:
    """An exception from a registered class's own code, in one line."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def known(what: str) -> list[str]:
    """Every name a sweep file may use: built in, registered, or offered by an installed package."""
    yours = (set(_registered[what]) - set(_builtin[what])) | set(_entry_points(what))
    return [*_builtin[what], *sorted(yours)]


def is_builtin(cfg) -> bool:
    """Whether a task's or model's config is of one of jaxgrok's own classes."""
    return type(cfg) in _builtin["task"].values() or type(cfg) in _builtin["model"].values()


def origins(task, model) -> dict[str, str]:
    """Where a sweep's registered task and model classes are defined ("module.Class"), for the run hash: two
    classes registered under one name (a notebook's and a package's) never share results. jaxgrok's
    own classes are left out: their code is jaxgrok's version. The hash cannot see the code itself:
    after changing what a registered task or model computes, train afresh (--restart, or another --out)."""
    return {NAME_KEY[what]: f"{type(c).__module__}.{type(c).__qualname__}"
            for what, c in (("task", task), ("model", model)) if not is_builtin(c)}


def checked(pred: Callable, message: str) -> dict:
    """A dataclass field's metadata for a check the sweep reader makes before the class is built:
    `field(default=..., metadata=checked(lambda v: v > 0, "must be > 0"))`."""
    return {"check": (pred, message)}


def as_dict(cfg, what: str) -> dict:
    """A task's or model's parameters as the sweep file says them, its name first."""
    return {NAME_KEY[what]: getattr(cfg, NAME_KEY[what]), **dataclasses.asdict(cfg)}


# ---------------------------------------------------------------------------------------------
# Holding a registered task or model to its contract, before anything is built or written


@functools.lru_cache(maxsize=32)
def check_table(task) -> Table:
    """A registered task's table, built once and held to the contract: one ValueError line if not."""
    where = f"task {task.op!r}"
    try:
        t = task.table()
    except Exception as e:  # noqa: BLE001 - the task's own code: say what it raised, in one line
        raise ValueError(f"{where}: table() raised {_said(e)}") from None
    if not isinstance(t, Table):
        raise ValueError(f"{where}: table() must return a jaxgrok.Table, got {type(t).__name__}")
    inputs, targets = np.asarray(t.inputs), np.asarray(t.targets)
    if inputs.ndim != 2 or inputs.shape[1] < 1 or targets.shape != inputs.shape[:1]:
        raise ValueError(f"{where}: inputs must be [N, L] and targets [N], got {list(inputs.shape)} and {list(targets.shape)}")
    if not (np.issubdtype(inputs.dtype, np.integer) and np.issubdtype(targets.dtype, np.integer)):
        raise ValueError(f"{where}: inputs and targets must be integers (token and class ids), got {inputs.dtype} and {targets.dtype}")
    if not 2 <= len(targets) < 2**31:
        raise ValueError(f"{where}: {len(targets):,} examples; between 2 and 2³¹ − 1")
    for name, ids, n in (("inputs", inputs, t.n_symbols), ("targets", targets, t.n_classes)):
        if not (isinstance(n, (int, np.integer)) and n >= 1):
            raise ValueError(f"{where}: {'n_symbols' if name == 'inputs' else 'n_classes'} must be a positive integer, got {n!r}")
        if ids.min() < 0 or ids.max() >= n:
            raise ValueError(f"{where}: {name} must lie in [0, {n}), got {ids.min()} to {ids.max()}")
    return Table(inputs.astype(np.int32), targets.astype(np.int32), int(t.n_symbols), int(t.n_classes))


@functools.lru_cache(maxsize=32)
def check_model(cfg, n_symbols: int, n_classes: int, n_inputs: int) -> Model:
    """A registered model built and traced on a small batch (nothing is computed): its Model, or one
    ValueError line naming what breaks the contract."""
    import jax
    import jax.numpy as jnp

    where = f"model {cfg.kind!r}"
    try:
        model = cfg.build(n_symbols, n_classes, n_inputs)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{where}: build() raised {_said(e)}") from None
    if not isinstance(model, Model):
        raise ValueError(f"{where}: build() must return a jaxgrok.Model, got {type(model).__name__}")
    try:
        params = jax.eval_shape(model.init, jax.random.key(0))
        logits = jax.eval_shape(model.apply, params, jax.ShapeDtypeStruct((4, n_inputs), jnp.int32))
        emb = jax.eval_shape(model.embedding, params) if model.embedding is not None else None
        feats = (jax.eval_shape(model.features, params, jax.ShapeDtypeStruct((4, n_inputs), jnp.int32))
                 if model.features is not None else None)
        sizes = (int(model.forward_flops(4)), int(model.activations(4)))
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{where}: init, apply, embedding, features, forward_flops or activations on inputs int32[4, {n_inputs}] "
                         f"raised {_said(e)}") from None
    leaves = jax.tree.leaves(params)
    if not leaves or any(leaf.dtype != jnp.float32 or leaf.size == 0 for leaf in leaves):
        raise ValueError(f"{where}: init(key) must return a pytree of non-empty float32 arrays, got "
                         f"{[f'{leaf.dtype}{list(leaf.shape)}' for leaf in leaves][:6] or 'no arrays'}")
    if logits.shape != (4, n_classes) or logits.dtype != jnp.float32:
        raise ValueError(f"{where}: apply(params, inputs int32[4, {n_inputs}]) must give float32[4, {n_classes}], "
                         f"got {logits.dtype}{list(logits.shape)}")
    if emb is not None and (emb.ndim != 2 or emb.shape[0] != n_symbols):
        raise ValueError(f"{where}: embedding(params) must give float32[{n_symbols}, D], got {list(emb.shape)}")
    if feats is not None:
        pair = isinstance(feats, (tuple, list)) and len(feats) == 2 and all(hasattr(x, "ndim") for x in feats)
        h, w = feats if pair else (None, None)
        if (h is None or h.ndim != 2 or h.shape[0] != 4 or w.ndim != 2
                or w.shape not in ((h.shape[1], n_classes), (n_classes, h.shape[1]))):
            got = f"{[list(x.shape) for x in feats]}" if pair else type(feats).__name__
            raise ValueError(f"{where}: features(params, inputs int32[4, {n_inputs}]) must give (h float32[4, D], "
                             f"W_out float32[D, {n_classes}] or [{n_classes}, D]), got {got}")
    if min(sizes) < 0:
        raise ValueError(f"{where}: forward_flops and activations must be ≥ 0, got {sizes}")
    return model
