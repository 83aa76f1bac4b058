"""Drives the compiled program over a sweep: batches of runs, chunks of steps, curves back to host.

The only host-device synchronisation is one metrics transfer per chunk, and it overlaps with the
next chunk: JAX dispatches chunk k+1 before we block on chunk k's metrics.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import jax
import numpy as np

from jaxgrok import grokking, results, train
from jaxgrok.sweep import Sweep


@dataclass
class Progress:
    """What the progress display gets after each chunk."""

    steps_done: int  # model-steps completed, summed over runs
    steps_total: int
    memorised: int
    grokked: int
    elapsed: float
    batch: int
    n_batches: int

    @property
    def model_steps_per_s(self) -> float:
        return self.steps_done / max(self.elapsed, 1e-9)


@dataclass
class SweepResult:
    sweep: Sweep
    index: np.ndarray  # run ids, positions in sweep.runs
    steps: np.ndarray  # [evals]: the step of each evaluation
    curves: dict[str, np.ndarray]  # metric -> float32[runs, evals]
    outcomes: dict[str, np.ndarray]  # grokking.analyse()
    compile_s: float
    train_s: float

    def runs_table(self):
        finals = {m: c[:, -1] for m, c in self.curves.items()}
        return results.runs_table(self.sweep, self.index, self.outcomes, finals)

    def curves_table(self):
        return results.curves_table(self.index, self.steps, self.curves, self.sweep.resolved)


def train_sweep(
    sweep: Sweep,
    index: np.ndarray | None = None,
    devices=None,
    on_chunk: Callable[[Progress], None] | None = None,
    vectorize: bool | None = None,
) -> SweepResult:
    """Train the runs `index` of a sweep (all by default) and return their curves and outcomes.
    `devices` and `vectorize` go to train.make_program."""
    static = sweep.static
    index = np.arange(sweep.n_runs) if index is None else np.asarray(index)
    program = train.make_program(static, devices, vectorize)
    per_batch = train.runs_per_batch(static, program, len(index))
    n_batches = -(-len(index) // per_batch)
    n_chunks = static.train.steps // static.train.eval_every // program.evals_per_chunk

    n_evals = static.train.steps // static.train.eval_every
    steps = np.arange(1, n_evals + 1, dtype=np.int64) * static.train.eval_every
    curves = np.full((len(index), n_evals, len(train.METRICS)), np.nan, np.float32)

    def batch_hparams(b):
        rows = np.arange(b * per_batch, min((b + 1) * per_batch, len(index)))
        # Every batch has the same shape (the last is padded with copies) so nothing recompiles.
        padded = np.concatenate([rows, np.full(per_batch - len(rows), rows[-1])])
        return rows, jax.device_put(train.hparams_for(sweep, index[padded]), program.sharding)

    # Compile both programs once, ahead of time, and time that apart from training.
    t0 = time.perf_counter()
    _, hp = batch_hparams(0)
    init = program.init.lower(hp).compile()
    chunk = program.chunk.lower(init(hp), hp).compile()
    compile_s = time.perf_counter() - t0

    start = time.perf_counter()
    for b in range(n_batches):
        rows, hp = batch_hparams(b)
        state = init(hp)

        def collect(c, metrics):
            # Host sync: blocks until chunk c is done (chunk c+1 is already queued behind it).
            done = (c + 1) * program.evals_per_chunk
            curves[rows, c * program.evals_per_chunk:done] = np.asarray(jax.device_get(metrics))[: len(rows)]
            if on_chunk:
                earlier = curves[: rows[0]]
                now = curves[rows, :done]
                thr = static.grokking.threshold
                m0, g0 = grokking.progress_counts(earlier[..., 1], earlier[..., 3], thr)
                m1, g1 = grokking.progress_counts(now[..., 1], now[..., 3], thr)
                on_chunk(Progress(rows[0] * static.train.steps + len(rows) * done * static.train.eval_every,
                                  len(index) * static.train.steps, m0 + m1, g0 + g1,
                                  time.perf_counter() - start, b, n_batches))

        pending = None
        for c in range(n_chunks):
            state, metrics = chunk(state, hp)
            if pending is not None:
                collect(*pending)
            pending = (c, metrics)
        collect(*pending)
        del state

    named = {m: curves[..., i] for i, m in enumerate(train.METRICS)}
    outcomes = grokking.analyse(named, steps, static.grokking)
    return SweepResult(sweep, index, steps, named, outcomes, compile_s, time.perf_counter() - start)
