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
    inputs: np.ndarray  # int32 [N, 2]: operand ids in [0, n_symbols)
    targets: np.ndarray  # int32 [N]: answer ids in [0, n_classes)
    n_symbols: int  # operand vocabulary (the transformer adds one token for "=")
    n_classes: int


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
    """The full table of a TaskConfig (op, p)."""
    return _table(task.op, task.p)


def n_pairs(task) -> int:
    """The table's size, counted without building it (a sweep is sized before anything is built)."""
    if task.op in GROUP_OPS:
        return 120 * 120
    return task.p * (task.p - 1) if task.op in NEEDS_PRIME else task.p**2


def n_symbols(task) -> int:
    """Operand vocabulary = answer classes of a task, without building its table."""
    return 120 if task.op in GROUP_OPS else task.p
