"""The algorithmic datasets of Power et al. 2022: every pair (a, b) of a binary operation's table.

A task is the full table: `inputs` [N, 2] operand ids and `targets` [N] answer ids. The split into
training and validation pairs is not made here: it is drawn per run, inside the compiled program,
from the run's data seed and train fraction (see train.py).
"""

from __future__ import annotations

import functools
import itertools
from typing import NamedTuple

import numpy as np


def _mod_inverse(b, p):
    return pow(int(b), p - 2, p)  # Fermat: p prime


# Operations modulo p from Power et al. 2022, Table 1 / Appendix A.1.
MODULAR = {
    "x+y": lambda a, b, p: (a + b) % p,
    "x-y": lambda a, b, p: (a - b) % p,
    "x*y": lambda a, b, p: (a * b) % p,
    "x/y": lambda a, b, p: (a * np.array([_mod_inverse(v, p) for v in b])) % p,
    "x/y_if_odd_else_x-y": lambda a, b, p: np.where(
        b % 2 == 1, (a * np.array([_mod_inverse(v, p) for v in b])) % p, (a - b) % p
    ),
    "x^2+y^2": lambda a, b, p: (a**2 + b**2) % p,
    "x^2+xy+y^2": lambda a, b, p: (a**2 + a * b + b**2) % p,
    "x^2+xy+y^2+x": lambda a, b, p: (a**2 + a * b + b**2 + a) % p,
    "x^3+xy": lambda a, b, p: (a**3 + a * b) % p,
    "x^3+xy^2+y": lambda a, b, p: (a**3 + a * b**2 + b) % p,
}
MODULAR_OPS = tuple(MODULAR)
# Answers that are a residue of a ± b: Nanda's restricted loss reads the logits along cos/sin(w(a ± b)).
SUM_OPS = ("x+y", "x-y")
NEEDS_PRIME = ("x/y", "x/y_if_odd_else_x-y")  # division needs every nonzero y to be invertible
GROUP_OPS = ("s5",)  # composition x∘y in the symmetric group S5 (120 elements)
OPS = MODULAR_OPS + GROUP_OPS


class Table(NamedTuple):
    inputs: np.ndarray  # int32 [N, L]: token ids in [0, n_symbols); L = 2 (a, b) for the built-in tasks
    targets: np.ndarray  # int32 [N]: answer ids in [0, n_classes)
    n_symbols: int  # operand vocabulary (the transformer adds one token for "=")
    n_classes: int


class Sizes(NamedTuple):
    n_pairs: int  # N, the examples of the table (pairs, for the built-in tasks)
    n_symbols: int
    n_classes: int
    n_inputs: int  # L, tokens per example


def is_prime(n: int) -> bool:
    """Miller–Rabin with the first 12 primes as bases: exact below 3.3·10²⁴ (trial division would
    take minutes on a 19-digit modulus)."""
    bases = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
    if n < 2:
        return False
    if n in bases:
        return True
    if any(n % b == 0 for b in bases):
        return False
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in bases:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


@functools.lru_cache(maxsize=32)
def _table(op: str, p: int) -> Table:
    if op == "s5":
        perms = list(itertools.permutations(range(5)))
        index = {q: i for i, q in enumerate(perms)}
        pairs = np.array(list(itertools.product(range(len(perms)), repeat=2)), dtype=np.int64)
        # (x∘y)(i) = x(y(i))
        answers = [index[tuple(perms[x][j] for j in perms[y])] for x, y in pairs]
        return Table(pairs.astype(np.int32), np.array(answers, np.int32), len(perms), len(perms))
    a, b = np.meshgrid(np.arange(p, dtype=np.int64), np.arange(p, dtype=np.int64), indexing="ij")
    a, b = a.ravel(), b.ravel()
    if op in NEEDS_PRIME:
        a, b = a[b != 0], b[b != 0]  # x/y is undefined at y = 0
    c = MODULAR[op](a, b, p)
    return Table(np.stack([a, b], 1).astype(np.int32), c.astype(np.int32), p, p)


def make_table(task) -> Table:
    """The full table of a task: a built-in TaskConfig (op, p) or a registered task (registry.py)."""
    return _table(task.op, task.p) if task.op in OPS else _registered_table(task)


def sizes(task) -> Sizes:
    """The table's sizes; a built-in table's counted without building it (a sweep is sized before
    anything is built)."""
    if task.op in OPS:
        n = 120 if task.op in GROUP_OPS else task.p
        n_pairs = 120 * 120 if task.op in GROUP_OPS else task.p * (task.p - 1) if task.op in NEEDS_PRIME else task.p**2
        return Sizes(n_pairs, n, n, 2)
    t = _registered_table(task)
    return Sizes(len(t.targets), t.n_symbols, t.n_classes, t.inputs.shape[1])


@functools.lru_cache(maxsize=32)
def _registered_table(task) -> Table:
    """A registered task's table, built once and held to the contract: one ValueError line if not."""
    where = f"task {task.op!r}"
    try:
        t = task.table()
    except Exception as e:  # noqa: BLE001 - the task's own code: say what it raised, in one line
        from jaxgrok.registry import _said

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
