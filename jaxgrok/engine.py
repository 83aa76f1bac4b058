"""Drives the compiled program over a sweep: batches of runs, chunks of steps, curves back to host.

The only host-device synchronisation is one metrics transfer per chunk, and it overlaps with the
next chunk: JAX dispatches chunk k+1 before we block on chunk k's metrics. With a `Store`, finished
batches become part files, the batch in progress is checkpointed every few chunks and on SIGTERM or
SIGINT, and a restarted sweep picks up exactly where the last checkpoint left it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import jax
import numpy as np

from jaxgrok import grokking, results, train
from jaxgrok.store import Interrupted, Store
from jaxgrok.sweep import Sweep


@dataclass
class Progress:
    """What the progress display gets after each chunk."""

    steps_done: int  # model-steps completed, summed over runs
    steps_total: int
    memorised: int
    grokked: int
    model_steps_per_s: float  # trained by this process since it started
    batch: int
    n_batches: int


@dataclass
class SweepResult:
    sweep: Sweep
    index: np.ndarray  # run ids trained by this call, positions in sweep.runs
    steps: np.ndarray  # [evals]: the step of each evaluation
    curves: dict[str, np.ndarray]  # metric -> float32[runs, evals]
    outcomes: dict[str, np.ndarray]  # grokking.analyse()
    compile_s: float
    train_s: float

    def runs_table(self):
        return _runs_table(self.sweep, self.index, self.curves, self.outcomes)

    def curves_table(self):
        return results.curves_table(self.index, self.steps, self.curves, self.sweep.resolved)


def _runs_table(sweep, index, curves, outcomes):
    return results.runs_table(sweep, index, outcomes, {m: c[:, -1] for m, c in curves.items()})


def _plan(sweep: Sweep, index: np.ndarray, per_batch: int, store: Store | None) -> tuple[list[np.ndarray], bool]:
    """The batches to train: a checkpointed batch first (exactly its runs), then the pending runs."""
    todo = index if store is None else store.pending(index)
    batches, resume = [], False
    if store is not None and (hashes := store.checkpointed_hashes()):
        position = {h: i for i, h in enumerate(sweep.run_hashes())}
        rows = np.array([position.get(h, -1) for h in hashes])
        if len(rows) <= per_batch and (rows >= 0).all() and np.isin(rows, todo).all():
            batches.append(rows)
            todo = todo[~np.isin(todo, rows)]
            resume = True
        else:  # from another sweep or another batch size: it covers nothing we will train
            store.clear_checkpoints()
    batches += [todo[k:k + per_batch] for k in range(0, len(todo), per_batch)]
    return batches, resume


def train_sweep(
    sweep: Sweep,
    index: np.ndarray | None = None,
    devices=None,
    on_chunk: Callable[[Progress], None] | None = None,
    vectorize: bool | None = None,
    store: Store | None = None,
) -> SweepResult:
    """Train the runs `index` of a sweep (all by default) and return their curves and outcomes.
    `devices` and `vectorize` go to train.make_program. With a `store`, runs it already holds are
    skipped, progress is checkpointed, and Interrupted is raised after a checkpoint on a signal."""
    static = sweep.static
    index = np.arange(sweep.n_runs) if index is None else np.asarray(index)
    program = train.make_program(static, devices, vectorize)
    # Sized from the whole request, not from what is left: the same on every restart.
    per_batch = train.runs_per_batch(static, program, len(index))
    batches, resume = _plan(sweep, index, per_batch, store)
    n_evals = static.train.steps // static.train.eval_every
    n_chunks = n_evals // program.evals_per_chunk
    steps = np.arange(1, n_evals + 1, dtype=np.int64) * static.train.eval_every
    hashes = sweep.run_hashes()
    thr = static.grokking.threshold

    def batch_hparams(rows):
        # Every batch has the same shape (the last is padded with copies) so nothing recompiles.
        padded = np.concatenate([rows, np.full(per_batch - len(rows), rows[-1])])
        return jax.device_put(train.hparams_for(sweep, padded), program.sharding)

    done_curves: list[np.ndarray] = []
    compile_s, start = 0.0, time.perf_counter()
    if batches:
        # Compile both programs once, ahead of time, and time that apart from training.
        hp = batch_hparams(batches[0])
        init = program.init.lower(hp).compile()
        chunk = program.chunk.lower(init(hp), hp).compile()
        compile_s = time.perf_counter() - start
    start, trained_here = time.perf_counter(), 0
    total = sum(len(r) for r in batches) * static.train.steps

    for b, rows in enumerate(batches):
        hp = batch_hparams(rows)
        state = init(hp)
        curves = np.full((len(rows), n_evals, len(train.METRICS)), np.nan, np.float32)
        first = 0
        if b == 0 and resume and (got := store.restore(state, len(rows), n_evals, len(train.METRICS))):
            state, curves, _, first = got

        def collect(c, metrics):
            nonlocal trained_here
            # Host sync: blocks until chunk c is done (chunk c+1 is already queued behind it).
            done = (c + 1) * program.evals_per_chunk
            curves[:, c * program.evals_per_chunk:done] = np.asarray(jax.device_get(metrics))[: len(rows)]
            trained_here += len(rows) * program.evals_per_chunk * static.train.eval_every
            if on_chunk:
                counts = [grokking.progress_counts(c_[..., 1], c_[..., 3], thr) for c_ in done_curves + [curves[:, :done]]]
                steps_done = sum(len(c_) for c_ in done_curves) * static.train.steps + len(rows) * done * static.train.eval_every
                on_chunk(Progress(steps_done, total, sum(m for m, _ in counts), sum(g for _, g in counts),
                                  trained_here / max(time.perf_counter() - start, 1e-9), b, len(batches)))

        pending = None
        for c in range(first, n_chunks):
            state, metrics = chunk(state, hp)
            if pending is not None:
                collect(*pending)
            pending = (c, metrics)
            if store is not None and c + 1 < n_chunks and (
                    store.stop_signal is not None or (c + 1 - first) % store.checkpoint_every == 0):
                collect(*pending)
                pending = None
                store.save(state, curves, [hashes[i] for i in rows], c + 1)
                if store.stop_signal is not None:
                    raise Interrupted(store.stop_signal)
        if pending is not None:
            collect(*pending)
        del state
        if store is not None:
            named = {m: curves[..., i] for i, m in enumerate(train.METRICS)}
            outcomes = grokking.analyse(named, steps, static.grokking)
            store.write_batch(_runs_table(sweep, rows, named, outcomes),
                              results.curves_table(rows, steps, named, sweep.resolved, [hashes[i] for i in rows]))
        done_curves.append(curves)

    trained = np.concatenate(batches) if batches else np.zeros(0, np.int64)
    all_curves = np.concatenate(done_curves) if done_curves else np.zeros((0, n_evals, len(train.METRICS)), np.float32)
    named = {m: all_curves[..., i] for i, m in enumerate(train.METRICS)}
    outcomes = grokking.analyse(named, steps, static.grokking)
    return SweepResult(sweep, trained, steps, named, outcomes, compile_s, time.perf_counter() - start)
