"""The algorithmic datasets of Power et al. 2022: every pair (a, b) of a binary operation's table.

A task is the full table: `inputs` [N, 2] operand ids and `targets` [N] answer ids. The split into
training and validation pairs is not made here: it is drawn per run, inside the compiled program,
from the run's data seed and train fraction (see train.py). `TaskConfig` is the `[task]` table of
every built-in operation, registered under each operation's name like a task of your own (registry.py).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from jaxgrok import registry
from jaxgrok.registry import Table, checked, register_task  # noqa: F401 - jaxgrok.Table, jaxgrok.register_task


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


class Sizes(NamedTuple):
    """A task table's sizes, known before the table is built."""

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
def _table(op: str, p: int, y_nonzero: bool = False) -> Table:
    if op == "s5":
        perms = list(itertools.permutations(range(5)))
        index = {q: i for i, q in enumerate(perms)}
        pairs = np.array(list(itertools.product(range(len(perms)), repeat=2)), dtype=np.int64)
        # (x∘y)(i) = x(y(i))
        answers = [index[tuple(perms[x][j] for j in perms[y])] for x, y in pairs]
        return Table(pairs.astype(np.int32), np.array(answers, np.int32), len(perms), len(perms))
    a, b = np.meshgrid(np.arange(p, dtype=np.int64), np.arange(p, dtype=np.int64), indexing="ij")
    a, b = a.ravel(), b.ravel()
    if op in NEEDS_PRIME or y_nonzero:
        a, b = a[b != 0], b[b != 0]  # x/y is undefined at y = 0
    c = MODULAR[op](a, b, p)
    return Table(np.stack([a, b], 1).astype(np.int32), c.astype(np.int32), p, p)


@dataclass(frozen=True)
class TaskConfig:
    """A built-in task: an operation of Power et al. 2022 modulo p, or composition in S5 (no p)."""

    op: str = field(metadata=checked(lambda v: v in OPS, f"unknown task; one of {', '.join(OPS)}"))
    p: int = field(default=0, metadata=checked(lambda v: v == 0 or v >= 2, "must be ≥ 2"))
    # y over 1 … p − 1 only, as Lee et al.'s multiplication_mod_p_data (x·y with y = 0 is always 0).
    y_nonzero: bool = False

    def validate(self) -> None:
        """The rules between op and p: ValueError("p: what is wrong") where one is broken."""
        if self.op in MODULAR_OPS:
            if self.p == 0:
                raise ValueError(f"p: missing required key for task {self.op}")
            if self.op in NEEDS_PRIME and not is_prime(self.p):
                raise ValueError(f"p: {self.op} needs a prime modulus, got {self.p}")
        elif self.p != 0:
            raise ValueError(f"p: task {self.op} takes no modulus")
        elif self.y_nonzero:
            raise ValueError(f"y_nonzero: task {self.op} has no y = 0 to leave out")

    def table(self) -> Table:
        """Every pair of the operation's table (built once per op and p)."""
        return _table(self.op, self.p, self.y_nonzero)

    def sizes(self) -> Sizes:
        """The table's sizes, counted without building it (a sweep is sized before anything is built)."""
        n = 120 if self.op in GROUP_OPS else self.p
        n_pairs = 120 * 120 if self.op in GROUP_OPS else self.p * (self.p - 1) if self.op in NEEDS_PRIME or self.y_nonzero else self.p**2
        return Sizes(n_pairs, n, n, 2)


registry.builtin("task", OPS, TaskConfig)


def make_table(task) -> Table:
    """The full table of a task: a built-in TaskConfig (op, p) or a registered task (registry.py),
    the latter held to the contract."""
    return task.table() if registry.is_builtin(task) else registry.check_table(task)


def sizes(task) -> Sizes:
    """The table's sizes; a built-in table's counted without building it."""
    if registry.is_builtin(task):
        return task.sizes()
    t = registry.check_table(task)
    return Sizes(len(t.targets), t.n_symbols, t.n_classes, t.inputs.shape[1])
