"""Drives the compiled program over a sweep: batches of runs, chunks of steps, curves back to host.

The only host-device synchronisation is one metrics transfer per chunk, and it overlaps with the
next chunk: JAX dispatches chunk k+1 before we block on chunk k's metrics. With a `Store`, finished
batches become part files, the batch in progress is checkpointed every few chunks and on SIGTERM or
SIGINT, and a restarted sweep picks up exactly where the last checkpoint left it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import numpy as np

from jaxgrok import grokking, measures, memory, results, tasks, train
from jaxgrok.store import Interrupted, Store
from jaxgrok.sweep import Sweep, SweepError, said_differences


@dataclass
class Progress:
    """What the progress display gets after each chunk."""

    steps_done: int  # model-steps completed, summed over runs
    steps_total: int
    memorised: int  # among this process's runs (counting all processes' would need a collective)
    grokked: int
    model_steps_per_s: float  # all processes together, since this one started
    batch: int
    n_batches: int
    compiled_s: float | None = None  # set once, when compiling is done and training starts
    trained: int = 0  # model-steps trained so far (steps_done counts a retired run's whole budget)


@dataclass
class SweepResult:
    """What train_sweep returns: the curves, outcomes and spectra of the runs it trained, and its timings."""

    sweep: Sweep
    index: np.ndarray  # run ids trained by this call, positions in sweep.runs
    steps: np.ndarray  # [evals]: the step of each evaluation
    curves: dict[str, np.ndarray]  # metric -> float32[runs, evals]
    outcomes: dict[str, np.ndarray]  # grokking.analyse()
    energies: np.ndarray  # float32[runs, K]: each run's final Fourier spectrum (K = 0: none)
    compile_s: float
    train_s: float
    runs_per_batch: int = 0
    batch_bytes: int | None = None  # per device, as XLA reports it for the compiled programs (None: not reported)
    stopped_at: np.ndarray | None = None  # [runs]: where a retired run's curves end (NaN: its whole budget)
    trained_steps: int = 0  # model-steps trained (fewer than runs × steps where runs retired)


def _global(tree, sharding):
    """Global arrays from host data that every process holds in full (the sweep's hyperparameters)."""
    return jax.tree.map(lambda a: jax.make_array_from_callback(a.shape, sharding, lambda i: a[i]), tree)


def _local(x) -> tuple[np.ndarray, np.ndarray]:
    """(row positions, rows) of the part of a run-sharded array that this process holds."""
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    pos = np.concatenate([np.arange(*s.index[0].indices(x.shape[0])) for s in shards])
    return pos, np.concatenate([np.asarray(s.data) for s in shards])


def _agree(value: str) -> bool:
    """Whether every process computed the same `value` (trivially true for one process)."""
    if jax.process_count() == 1:
        return True
    from jax.experimental import multihost_utils

    # int32: without x64 JAX gathers an int64 as int32, and the truncated digests never compare equal
    digest = np.frombuffer(hashlib.sha256(value.encode()).digest()[:8], np.int32)
    return bool((multihost_utils.process_allgather(digest) == digest).all())


def _abstract(state, curves: np.ndarray, sharding):
    """Shapes, dtypes and shardings of what a checkpoint holds, for orbax to restore into."""
    import orbax.checkpoint as ocp

    shapes = jax.tree.map(ocp.utils.to_shape_dtype_struct, state._replace(key=jax.random.key_data(state.key)))
    return {"state": shapes, "curves": jax.ShapeDtypeStruct(curves.shape, curves.dtype, sharding=sharding)}


def _in_precision(fn):
    """`fn(sweep, ...)` inside its sweep's precision context (train.x64)."""
    @functools.wraps(fn)
    def wrapped(sweep, *args, **kwargs):
        with train.x64(sweep.static):
            return fn(sweep, *args, **kwargs)
    return wrapped


def _runs_table(sweep, index, curves, outcomes, energies, energies0, ends):
    """The runs table of finished runs; `ends`: the evaluations each has (fewer where it retired)."""
    share = sweep.static.measures.key_freq_share
    key_freqs = measures.key_frequencies(energies, share) if sweep.static.measures.fourier else None
    p = tasks.sizes(sweep.static.task).n_symbols
    ticket = measures.initial_key_share(energies0, key_freqs, p) if key_freqs is not None else None
    last = np.maximum(ends, 1) - 1
    finals = {m: c[np.arange(len(c)), last] for m, c in curves.items()}
    cfg = sweep.static.train
    stopped_at = np.where(ends < cfg.steps // cfg.eval_every, (last + 1) * cfg.eval_every, np.nan)
    return results.runs_table(sweep, index, outcomes, finals, key_freqs, ticket, stopped_at)


def _batch_hparams(sweep: Sweep, rows: np.ndarray, per_batch: int, program: train.Program):
    """The Hparams of a batch: every batch has the same shape (the last is padded with copies of
    its last run) so that nothing recompiles."""
    padded = np.concatenate([rows, np.full(per_batch - len(rows), rows[-1])])
    return _global(train.hparams_for(sweep, padded), program.sharding)


def _stop_requested(store: Store) -> bool:
    """Whether any process was asked to stop: all must checkpoint together (orbax saves collectively)."""
    asked = store.stop_signal is not None
    if jax.process_count() == 1:
        return asked
    from jax.experimental import multihost_utils

    # One tiny all-gather per chunk, only with several processes, next to the metrics transfer.
    signals = multihost_utils.process_allgather(np.array(store.stop_signal or 0))
    store.stop_signal = store.stop_signal or int(signals.max()) or None
    return bool(signals.any())


def _slots_of(cursor: dict) -> list[tuple[str | None, int]]:
    """A checkpoint's slots: (its run's hash, None where idle; the steps that run has done). A cursor
    from before slots names the runs of a batch that moved in step, its padding at the end."""
    if "slots" in cursor:
        return [(h, int(n)) for h, n in cursor["slots"]]
    hashes = list(cursor["run_hashes"])
    return [(h, int(cursor.get("steps_done", 0))) for h in hashes] + [(None, 0)] * (
        int(cursor.get("runs_per_batch", len(hashes))) - len(hashes))


def _plan(sweep: Sweep, index: np.ndarray, per_batch: int, store: Store | None) -> tuple[list[np.ndarray], bool]:
    """The batches to train: a checkpointed batch first (exactly its runs that are not done), then
    the pending runs. A checkpoint that a changed sweep file no longer covers stops the sweep with
    one line; one that cannot be taken back as it is (another batch size, an older format) is said
    and dropped: its runs train from step 0, as in a fresh run."""
    continued = store.carry_over(index)[1] if store is not None else {}
    todo = index if store is None else store.pending(index)
    batches, resume = [], False
    if store is not None and (cursor := store.checkpointed_batch()):
        done = store.done_hashes()
        live = [h for h, _ in _slots_of(cursor) if h is not None and h not in done]
        if not live:
            # Killed after the last runs of the batch were committed and before its checkpoints
            # were deleted: the parts hold them all, so the checkpoint says nothing more.
            store.clear_checkpoints()
            return _plan(sweep, index, per_batch, store)
        position = {h: i for i, h in enumerate(sweep.run_hashes)}
        rows = np.array([position.get(h, -1) for h in live])
        where = store.manager.directory
        if not ((rows >= 0).all() and np.isin(rows, todo).all()):
            said = said_differences(cursor.get("sweep", {}), sweep.resolved) or "its runs"
            raise SweepError(f"{where}: holds a batch in progress of runs that {sweep.path} no longer has "
                             f"(changed since: {said}); run the file as it was to finish that batch, "
                             f"or --restart to discard it and everything in {store.out}")
        why = ""
        if "steps_done" not in cursor:
            why = "it was saved by an older jaxgrok, which counted chunks, not steps"
        elif cursor.get("runs_per_batch") != per_batch:
            why = f"it holds a batch of {cursor.get('runs_per_batch')} runs and batches are now of {per_batch}"
        if why:  # the saved arrays hold a whole padded batch: only a batch of that size takes them back
            print(f"jaxgrok: {where}: {why}; its {len(rows)} runs train again from step 0", file=sys.stderr)
            store.clear_checkpoints()
        else:
            batches.append(rows)
            todo = todo[~np.isin(todo, rows)]
            resume = True
    # Runs continued from a smaller budget first, each batch of runs at one evaluation count, so that
    # its slots move in step (then the fresh ones).
    start = np.array([continued.get(int(r), -1) for r in todo])
    for e in sorted(set(start.tolist()), reverse=True):
        group = todo[start == e]
        batches += [group[k:k + per_batch] for k in range(0, len(group), per_batch)]
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
    skipped, progress is checkpointed, and Interrupted is raised after a checkpoint on a signal.
    A batch that runs out of device memory is halved and trained again (nothing finished is lost)."""
    return _train_sweep(sweep, index, devices, on_chunk, vectorize, store)


@_in_precision
def _train_sweep(sweep, index, devices, on_chunk, vectorize, store) -> SweepResult:
    index = np.arange(sweep.n_runs) if index is None else np.asarray(index)
    ctx = _Context(sweep, train.make_program(sweep.static, devices, vectorize), store, on_chunk, devices, vectorize)
    start = time.perf_counter()
    # Sized from the whole request, not from what is left: the same on every restart.
    compiled = _Compiled(*memory.fit(ctx.program, sweep.static, len(index), memory.memory_budget(), sweep.path))
    compile_s = time.perf_counter() - start  # timed apart from training
    plan = _agreed_plan(ctx, index, compiled.per_batch, compile_s)
    tally = _Tally(time.perf_counter(), sum(len(r) for r in plan.batches) * sweep.static.train.steps)
    b = 0
    while b < len(plan.batches):
        try:
            _train_batch(ctx, compiled, plan, tally, b)
        except Exception as error:  # XLA's out-of-memory error has no class of its own
            if not memory.out_of_memory(error) or compiled.per_batch == ctx.program.sharding.mesh.size:
                raise
            compiled, plan, seconds = _halved(ctx, compiled, plan, tally, b)
            compile_s += seconds
            continue
        b += 1
    return _result(ctx, tally, compile_s, compiled)


@dataclass(frozen=True)
class _Context:
    """What every batch of one train_sweep call shares."""

    sweep: Sweep
    program: train.Program
    store: Store | None
    on_chunk: Callable[[Progress], None] | None
    devices: object
    vectorize: bool | None
    shorter: dict = field(default_factory=dict, compare=False)  # chunks of fewer evaluations, by length

    @property
    def n_evals(self) -> int:
        """Evaluations of each run."""
        return self.sweep.static.train.steps // self.sweep.static.train.eval_every

    @property
    def steps(self) -> np.ndarray:
        """The step of each evaluation."""
        return np.arange(1, self.n_evals + 1, dtype=np.int64) * self.sweep.static.train.eval_every

    def catch_up(self, n: int):
        """A chunk of `n` evaluations, to bring a run to its next chunk boundary: after a resume from a
        checkpoint saved between two chunks of another chunk_steps, or a run continued from a smaller
        budget (compiled once per length, and only then)."""
        if n not in self.shorter:
            self.shorter[n] = train.make_program(self.sweep.static, self.devices, self.vectorize, evals=n).chunk
        return self.shorter[n]


@dataclass
class _Compiled:
    """Both programs compiled for batches of `per_batch` runs, and the bytes per device XLA says they need."""

    per_batch: int
    init: Callable
    chunk: Callable
    need: int | None


@dataclass
class _Plan:
    batches: list[np.ndarray]  # the runs of each batch, positions in sweep.runs
    resume: bool  # the first batch continues from a checkpoint


@dataclass
class _Tally:
    """What this call has trained so far: its finished runs, and the display's counts."""

    start: float  # when training began (after compiling)
    total: int  # model-steps a fixed budget costs, all processes
    trained: int = 0  # model-steps the finished runs trained (to their end), all processes
    finished: int = 0  # runs finished, all processes
    memorised: int = 0  # of this process's finished runs
    grokked: int = 0
    runs: list[_Finished] = field(default_factory=list)  # this process's finished runs
    unwritten: list[_Finished] = field(default_factory=list)  # ...of which not yet in parts/
    ended: set[int] = field(default_factory=set)  # every process's finished runs (positions in sweep.runs)


@dataclass
class _Finished:
    """A run that has finished: its whole budget, or retired (its curves end at evaluation `end`)."""

    row: int  # its position in sweep.runs
    curves: np.ndarray  # float32[evals, len(METRICS)], NaN past `end`
    end: int  # the evaluations it has
    energies: np.ndarray  # float32[K]: its final spectrum
    energies0: np.ndarray  # float32[K]: its step-0 spectrum
    state: dict | None = None  # its final train state's leaves, where it trained its whole budget (and is stored)


@dataclass
class _Batch:
    """The batch in training, slot by slot: each slot holds a run until it finishes or retires,
    then (with stop_after_grokking) the next pending run."""

    b: int  # its position in the plan
    slots: np.ndarray  # int64[per_batch]: each slot's run (a position in sweep.runs); -1: idle
    hp_rows: np.ndarray  # int64[per_batch]: the run whose Hparams each slot holds (an idle slot keeps its last)
    evals: np.ndarray  # int64[per_batch]: the evaluations each slot's run has done
    start: np.ndarray  # int64[per_batch]: ...of which before it entered the slot (a resume's checkpoint)
    hp: train.Hparams
    local: np.ndarray  # the slots that this process holds
    curves: np.ndarray  # float32[per_batch, evals, len(METRICS)]: each slot's run's so far, NaN where not yet trained

    def live(self) -> np.ndarray:
        """The slots whose run still has evaluations to do."""
        return (self.slots >= 0) & (self.evals < self.curves.shape[1])


def _agreed_plan(ctx: _Context, index: np.ndarray, per_batch: int, compile_s: float) -> _Plan:
    """The plan (see _plan), the same on every process; the display hears that compiling took `compile_s`."""
    batches, resume = _plan(ctx.sweep, index, per_batch, ctx.store)
    if ctx.on_chunk:  # compiled: the display says training has begun, before the first chunk ends
        ctx.on_chunk(Progress(0, 0, 0, 0, 0.0, 0, 0, compiled_s=compile_s))
    if not _agree(repr([b.tolist() for b in batches]) + str(resume)):
        # Processes saw different checkpoints: drop them all and start those runs afresh.
        ctx.store.clear_checkpoints()
        batches, resume = _plan(ctx.sweep, index, per_batch, ctx.store)
    return _Plan(batches, resume)


def _train_batch(ctx: _Context, compiled: _Compiled, plan: _Plan, tally: _Tally, b: int) -> None:
    """Train batch `b` of the plan, from its checkpoint if it has one, until each of its slots is
    done; with stop_after_grokking, slots that retired runs leave take the plan's next runs. With a
    store, finished runs become part files and the batch is checkpointed every few chunks and on
    a signal (then Interrupted is raised)."""
    batch, state = _begin_batch(ctx, compiled, plan, b)
    store, epc, k, pending = ctx.store, ctx.program.evals_per_chunk, 0, None
    retiring = ctx.sweep.static.train.stop_after_grokking > 0
    while (live := batch.live()).any():
        # To the nearest chunk boundary of any run: every run ends its budget exactly at the end of a
        # chunk (slots that moved in step share their boundaries; others take shorter chunks).
        n = int((epc - batch.evals[live] % epc).min())
        e_ref = int(batch.evals[live][0])
        run_chunk = compiled.chunk if n == epc else ctx.catch_up(n)
        # An idle slot counts with a live one: no measure's branch is taken for it alone.
        first = np.where(batch.slots >= 0, batch.evals, e_ref).astype(np.int32)
        state, metrics = run_chunk(state, batch.hp, _global(first, ctx.program.sharding))
        if pending is not None:  # collected behind the chunk just queued: the device keeps working
            _collect(ctx, tally, batch, len(plan.batches), *pending)
        pending = (batch.slots.copy(), batch.evals.copy(), n, metrics)
        batch.evals = np.where(batch.slots >= 0, batch.evals + n, batch.evals)
        k += 1
        ending = (~batch.live() & (batch.slots >= 0)).any()
        ahead = batch.live().any() or (retiring and _queued(plan, b))
        checkpoint = store is not None and ahead and (_stop_requested(store) or k % store.checkpoint_every == 0)
        if retiring or ending or checkpoint:  # decided on this chunk's curves: collect it now
            _collect(ctx, tally, batch, len(plan.batches), *pending)
            pending = None
            _settle(ctx, tally, batch, state, retiring)
            if retiring:
                state = _refill(ctx, compiled, plan, batch, state)
        if checkpoint and batch.live().any():
            _checkpoint(ctx, tally, batch, state)
    if pending is not None:
        _collect(ctx, tally, batch, len(plan.batches), *pending)
        _settle(ctx, tally, batch, state, retiring)
    _commit(ctx, tally, last=True)


def _queued(plan: _Plan, b: int) -> bool:
    """Whether runs wait in the batches after `b`."""
    return any(len(rows) for rows in plan.batches[b + 1:])


def _take(plan: _Plan, b: int, n: int) -> np.ndarray:
    """Up to `n` runs from the front of the batches after `b`, now batch `b`'s (so that a batch that
    runs out of memory hands them back)."""
    taken, wanted = [], n
    for j in range(b + 1, len(plan.batches)):
        got = plan.batches[j][:wanted]
        plan.batches[j] = plan.batches[j][len(got):]
        taken.append(got)
        wanted -= len(got)
    plan.batches[b + 1:] = [rows for rows in plan.batches[b + 1:] if len(rows)]
    taken = np.concatenate(taken) if taken else np.zeros(0, np.int64)
    plan.batches[b] = np.concatenate([plan.batches[b], taken])
    return taken


def _begin_batch(ctx: _Context, compiled: _Compiled, plan: _Plan, b: int) -> tuple[_Batch, train.RunState]:
    """Batch `b`'s initial state, or its checkpointed one on a resume (its slots as they were)."""
    rows, per_batch = plan.batches[b], compiled.per_batch
    n_evals, every = ctx.n_evals, ctx.sweep.static.train.eval_every
    curves = np.full((per_batch, n_evals, len(train.METRICS)), np.nan, np.float32)
    slots, evals, got = np.full(per_batch, -1, np.int64), np.zeros(per_batch, np.int64), None
    slots[:len(rows)] = rows
    if b == 0 and plan.resume:
        probe = compiled.init(_global(train.hparams_for(ctx.sweep, np.resize(rows, per_batch)), ctx.program.sharding))
        got = ctx.store.restore(_abstract(probe, curves, ctx.program.sharding))
    if got is not None:  # the slots of the checkpoint that was read (perhaps older than the one planned)
        state, saved_curves, cursor = got
        position, done = {h: i for i, h in enumerate(ctx.sweep.run_hashes)}, ctx.store.done_hashes()
        saved = _slots_of(cursor)
        queued = np.concatenate([rows, *plan.batches[b + 1:]])
        slots = np.array([position.get(h, -1) if h is not None and h not in done else -1 for h, _ in saved])
        slots = np.where(np.isin(slots, queued), slots, -1)  # only runs that this call is to train
        hp_rows = np.array([position.get(h, -1) if h is not None else -1 for h, _ in saved])
        evals = np.array([n // every for _, n in saved], np.int64)
        # Runs that the plan gave this batch and the checkpoint read does not hold go back to the queue.
        queued = queued[~np.isin(queued, slots)]
        plan.batches[b] = slots[slots >= 0]
        plan.batches[b + 1:] = [queued[j:j + per_batch] for j in range(0, len(queued), per_batch)]
    else:
        hp_rows = slots.copy()
    fill = slots[slots >= 0][0] if (slots >= 0).any() else max(hp_rows.max(), 0)
    hp_rows = np.where(hp_rows >= 0, hp_rows, fill)  # padding: copies of a run, so that nothing recompiles
    hp = _global(train.hparams_for(ctx.sweep, hp_rows), ctx.program.sharding)
    local, _ = _local(hp.seed)
    batch = _Batch(b, slots, hp_rows, evals, evals.copy(), hp, local, curves)
    if got is None:
        return batch, _continued(ctx, batch, compiled.init(hp), np.flatnonzero(slots >= 0))
    curves[local] = _local(saved_curves)[1]
    curves[slots < 0] = np.nan
    return batch, state


def _continued(ctx: _Context, batch: _Batch, state, slots: np.ndarray):
    """`state` with the runs in `slots` that continue from a smaller budget (Store.carry_over) at
    their stored final state, their curves so far and their evaluations done; the others as they are."""
    if ctx.store is None or not len(slots):
        return state
    leaves = train.state_leaves(state)
    got = ctx.store.continuation(batch.slots[slots], list(leaves), list(train.METRICS))
    if not _agree(repr(sorted((r, v[2]) for r, v in got.items()))):  # every process read the same states
        raise SweepError(f"{ctx.store.out / 'parts'}: the processes read different stored states of the runs "
                         f"they continue (a file read by some and not others); run again")
    if not got:
        return state
    mask = np.zeros(len(batch.slots), bool)
    host = {name: np.zeros(leaf.shape, leaf.dtype) for name, leaf in leaves.items()}
    for slot in slots:
        if (row := int(batch.slots[slot])) in got:
            values, curves, evals = got[row]
            for name, value in values.items():
                host[name][slot] = value
            batch.curves[slot, :evals] = curves
            batch.evals[slot] = batch.start[slot] = evals
            mask[slot] = True
    sharding = ctx.program.sharding
    loaded = train.from_leaves(state, {name: _global(v, sharding) for name, v in host.items()})
    return ctx.program.refill(_global(mask, sharding), loaded, state)


def _collect(ctx: _Context, tally: _Tally, batch: _Batch, n_batches: int, slots, evals, n: int, metrics) -> None:
    """Take a chunk's metrics into each slot's curves (`slots` and `evals`: as the chunk began) and
    tell the display."""
    cfg = ctx.sweep.static.train
    # Host sync: blocks until this chunk is done (the next one may already be queued behind it).
    pos, data = _local(metrics)
    for e0 in np.unique(evals[pos][slots[pos] >= 0]):  # slots that moved in step: one copy
        at = (slots[pos] >= 0) & (evals[pos] == e0)
        m = min(n, ctx.n_evals - int(e0))  # a run that ends inside the chunk keeps its own evaluations
        batch.curves[pos[at], e0:e0 + m] = data[at, :m]
    if ctx.on_chunk:
        live = batch.local[batch.slots[batch.local] >= 0]
        memorised, grokked = _counts(ctx, batch.curves[live], np.minimum(batch.evals[live], ctx.n_evals))
        steps_done = (tally.finished * cfg.steps
                      + int(np.minimum(batch.evals[batch.slots >= 0], ctx.n_evals).sum()) * cfg.eval_every)
        trained = tally.trained + _trained(batch, batch.slots >= 0, np.minimum(batch.evals, ctx.n_evals), cfg.eval_every)
        ctx.on_chunk(Progress(steps_done, tally.total, tally.memorised + memorised, tally.grokked + grokked,
                              trained / max(time.perf_counter() - tally.start, 1e-9), batch.b, n_batches,
                              trained=trained))


def _trained(batch: _Batch, slots: np.ndarray, to: np.ndarray, eval_every: int) -> int:
    """The model-steps the runs in `slots` (a mask) have trained in this call, to evaluation `to`
    (an array over slots): a retired run counts to where it retired, not to its chunk's end."""
    return int(((to - batch.start) * slots).sum()) * eval_every


def _counts(ctx: _Context, curves: np.ndarray, done: np.ndarray) -> tuple[int, int]:
    """grokking.progress_counts of runs with these curves [runs, evals, M], `done` evaluations each."""
    train_acc, val_acc = (curves[..., train.METRICS.index(m)] for m in ("train_acc", "val_acc"))
    return grokking.progress_counts(train_acc, val_acc, ctx.sweep.static.grokking.threshold, done)


def _settle(ctx: _Context, tally: _Tally, batch: _Batch, state, retiring: bool) -> None:
    """After a collected chunk: the slots whose run has done its budget, or (`retiring`) has retired
    by grokking.retire, hand their run over as finished (to be written) and fall idle."""
    cfg, n_evals = ctx.sweep.static.train, ctx.n_evals
    keep = np.zeros(len(batch.slots), np.int64)  # the evaluations a finished run keeps
    if retiring:
        mine = batch.local[batch.slots[batch.local] >= 0]
        c = batch.curves[mine]
        losses = c[..., train.METRICS.index("train_loss")] + c[..., train.METRICS.index("val_loss")]
        keep[mine] = grokking.retire(c[..., train.METRICS.index("val_acc")], losses,
                                     np.minimum(batch.evals[mine], n_evals), cfg.eval_every,
                                     ctx.sweep.static.grokking.threshold, cfg.stop_after_grokking)
        keep = _agreed_max(keep)  # each process decides for its own slots
    budget = (batch.slots >= 0) & (batch.evals >= n_evals)
    keep = np.where(budget & (keep == 0), n_evals, keep)
    ended = (batch.slots >= 0) & (keep > 0)
    if not ended.any():
        return
    pos, energies = _local(state.energies)  # the spectrum where each run stopped (a retired run is frozen)
    energies = energies[:, :measures.n_frequencies(ctx.sweep.static, ctx.program.table.n_symbols)]  # not the placeholder
    spectrum0 = ctx.program.spectrum0
    energies0 = _local(spectrum0(state.params0))[1] if spectrum0 else np.zeros_like(energies)  # step 0's, of the same runs
    # The final states of runs that trained their whole budget, for a larger one (store/extend.py)
    final = {}
    if ctx.store is not None and (ended & (keep == n_evals)).any():
        final = {name: _local(leaf)[1] for name, leaf in train.state_leaves(state).items()}
    for i, slot in enumerate(pos):
        if ended[slot]:
            curves = batch.curves[slot].copy()
            curves[keep[slot]:] = np.nan
            kept = {name: v[i] for name, v in final.items()} if final and keep[slot] == n_evals else None
            done = _Finished(int(batch.slots[slot]), curves, int(keep[slot]), energies[i], energies0[i], kept)
            tally.unwritten.append(done)
            memorised, grokked = _counts(ctx, curves[None], np.array([done.end]))
            tally.memorised, tally.grokked = tally.memorised + memorised, tally.grokked + grokked
    tally.finished += int(ended.sum())
    tally.ended |= set(batch.slots[ended].tolist())
    tally.trained += _trained(batch, ended, keep, cfg.eval_every)
    batch.slots = np.where(ended, -1, batch.slots)
    batch.curves[ended] = np.nan


def _agreed_max(values: np.ndarray) -> np.ndarray:
    """The elementwise maximum of `values` over processes (each fills in its own slots)."""
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(values).max(0)


def _refill(ctx: _Context, compiled: _Compiled, plan: _Plan, batch: _Batch, state):
    """Give the idle slots the plan's next runs, each from its initial state (the same on every
    process: the plan and the idle slots are)."""
    idle = np.flatnonzero(batch.slots < 0)
    new = _take(plan, batch.b, len(idle))
    if not len(new):
        return state
    slots = idle[:len(new)]
    batch.slots[slots], batch.hp_rows[slots], batch.evals[slots], batch.start[slots] = new, new, 0, 0
    batch.hp = _global(train.hparams_for(ctx.sweep, batch.hp_rows), ctx.program.sharding)
    mask = np.zeros(len(batch.slots), bool)
    mask[slots] = True
    state = ctx.program.refill(_global(mask, ctx.program.sharding), compiled.init(batch.hp), state)
    return _continued(ctx, batch, state, slots)


def _checkpoint(ctx: _Context, tally: _Tally, batch: _Batch, state) -> None:
    """Write the finished runs, then checkpoint the batch in progress; then stop if a signal asked for it."""
    _commit(ctx, tally, last=False)
    store, curves, every = ctx.store, batch.curves, ctx.sweep.static.train.eval_every
    global_curves = jax.make_array_from_process_local_data(ctx.program.sharding, curves[batch.local], curves.shape)
    hashes = [ctx.sweep.run_hashes[r] if r >= 0 else None for r in batch.slots]
    store.save(state, global_curves, list(zip(hashes, (batch.evals * every).tolist())))
    if store.stop_signal is not None:
        raise Interrupted(store.stop_signal)


def _halved(ctx: _Context, compiled: _Compiled, plan: _Plan, tally: _Tally, b: int) -> tuple[_Compiled, _Plan, float]:
    """After batch `b` ran out of memory: programs compiled for half the batch, and a plan that
    trains that batch's unfinished runs and the rest again in the smaller batches (finished runs are
    kept, and a checkpoint of the failed one, sized for the old batch, is dropped); and the compile time."""
    n_dev = ctx.program.sharding.mesh.size
    per_batch = compiled.per_batch // n_dev // 2 * n_dev
    t = time.perf_counter()
    init, chunk = memory.compile_batch(ctx.program, per_batch)
    seconds = time.perf_counter() - t
    need = memory.batch_bytes(init, chunk, memory.metrics_bytes(ctx.program, per_batch // n_dev))
    _commit(ctx, tally, last=False)  # the runs that finished before it ran out are kept
    rest = np.concatenate(plan.batches[b:])
    rest = rest[~np.isin(rest, list(tally.ended))]  # the same on every process
    batches = plan.batches[:b] + [rest[k:k + per_batch] for k in range(0, len(rest), per_batch)]
    if ctx.store is not None and plan.resume and b == 0:
        ctx.store.clear_checkpoints()
    return _Compiled(per_batch, init, chunk, need), _Plan(batches, False), seconds


def _commit(ctx: _Context, tally: _Tally, last: bool) -> None:
    """Keep the finished runs, and with a store write them as part files (`last`: the batch is
    done, and its checkpoints go)."""
    done, tally.unwritten = tally.unwritten, []
    tally.runs += done
    if ctx.store is None or not (done or last):
        return
    if done:
        sweep, steps = ctx.sweep, ctx.steps
        rows, ends = np.array([f.row for f in done]), np.array([f.end for f in done])
        curves = np.stack([f.curves for f in done])
        named = {m: curves[..., i] for i, m in enumerate(train.METRICS)}
        outcomes = grokking.analyse(named, steps, sweep.static.grokking, ends)
        spectra = np.stack([f.energies for f in done]), np.stack([f.energies0 for f in done])
        final = [f for f in done if f.state is not None]
        state = ([sweep.run_hashes[f.row] for f in final], sweep.static.train.steps,
                 {name: np.stack([f.state[name] for f in final]) for name in final[0].state}) if final else None
        ctx.store.write_batch(_runs_table(sweep, rows, named, outcomes, *spectra, ends),
                              results.curves_table(rows, steps, named, sweep.resolved,
                                                   [sweep.run_hashes[i] for i in rows], ends), clear=last, state=state)
    elif last:
        ctx.store.clear_checkpoints()


def _result(ctx: _Context, tally: _Tally, compile_s: float, compiled: _Compiled) -> SweepResult:
    runs = tally.runs
    trained = np.array([f.row for f in runs], np.int64)
    all_curves = (np.stack([f.curves for f in runs]) if runs
                  else np.zeros((0, ctx.n_evals, len(train.METRICS)), np.float32))
    ends = np.array([f.end for f in runs], np.int64)
    named = {m: all_curves[..., i] for i, m in enumerate(train.METRICS)}
    outcomes = grokking.analyse(named, ctx.steps, ctx.sweep.static.grokking, ends)
    k = measures.n_frequencies(ctx.sweep.static, ctx.program.table.n_symbols)
    energies = np.stack([f.energies for f in runs]) if runs else np.zeros((0, k), np.float32)
    return SweepResult(ctx.sweep, trained, ctx.steps, named, outcomes, energies, compile_s,
                       time.perf_counter() - tally.start, compiled.per_batch, compiled.need,
                       stopped_at=np.where(ends < ctx.n_evals, ctx.steps[np.maximum(ends, 1) - 1], np.nan),
                       trained_steps=tally.trained)


def _replay_program(sweep: Sweep, runs: np.ndarray):
    """A program of one evaluation interval per chunk with the measures off (they do not touch
    training), over every device as the sweep's own, and the Hparams of `runs`, the last repeated to
    fill the devices: on CPU it trains them bit for bit as the sweep did. (On one device of a
    two-core machine XLA rounds the transformer's first step differently: measured.)"""
    cfg = sweep.static.train
    off = {f.name: False for f in dataclasses.fields(sweep.static.measures) if f.type in (bool, "bool")}
    static = dataclasses.replace(sweep.static, train=dataclasses.replace(cfg, chunk_steps=cfg.eval_every),
                                 measures=dataclasses.replace(sweep.static.measures, **off))
    program = train.make_program(static)
    n = program.sharding.mesh.size
    padded = np.concatenate([runs, np.repeat(runs[-1:], -len(runs) % n)])
    return program, jax.device_put(train.hparams_for(sweep, padded), program.sharding)


@_in_precision
def params_at(sweep: Sweep, run: int, steps) -> dict[int, dict]:
    """{step: parameters} of one run of a sweep after each of `steps` (0 or multiples of
    eval_every), retrained alone: on CPU bit for bit the run the sweep trained. For figures of how
    an embedding forms."""
    program, hp = _replay_program(sweep, np.array([run]))
    state, n = program.init(hp), hp.seed.shape[0]
    wanted, out = sorted(set(int(s) for s in steps)), {}
    take = lambda: jax.tree.map(lambda x: np.asarray(x)[0], state.params)  # noqa: E731
    if 0 in wanted:
        out[0] = take()
    for c in range(max(wanted) // sweep.static.train.eval_every):
        state, _ = program.chunk(state, hp, train.first_evals(n, c))
        if (c + 1) * sweep.static.train.eval_every in wanted:
            out[(c + 1) * sweep.static.train.eval_every] = take()
    return out


@_in_precision
def replay(sweep: Sweep, runs: np.ndarray, measure: Callable) -> tuple[np.ndarray, np.ndarray]:
    """Retrain `runs` of a sweep together and read `measure(state) -> float32[runs, M]` (a jitted
    function of the batched RunState) after every evaluation interval: (values [runs, evals, M],
    the metrics the replay recorded [runs, evals, len(METRICS)], to hold against the sweep's curves).
    On CPU the replay is the runs the sweep trained, bit for bit."""
    program, hp = _replay_program(sweep, runs)
    state, values, metrics, n = program.init(hp), [], [], len(runs)
    for c in range(sweep.static.train.steps // sweep.static.train.eval_every):
        state, m = program.chunk(state, hp, train.first_evals(hp.seed.shape[0], c))
        values.append(np.asarray(measure(jax.tree.map(lambda x: x[:n], state))))  # the padding left out
        metrics.append(np.asarray(m)[:n, 0])
    return np.stack(values, 1), np.stack(metrics, 1)


@_in_precision
def dry_run(sweep: Sweep, devices=None, vectorize: bool | None = None) -> dict:
    """What `jaxgrok run` would do, with nothing written: the batches it would train (sized as the
    run sizes them), the memory they need, and an estimate of the training time from one timed
    evaluation interval of the first batch on this machine."""
    static, cfg = sweep.static, sweep.static.train
    program = train.make_program(static, devices, vectorize)
    t = time.perf_counter()
    per_batch, init, _, need = memory.fit(program, static, sweep.n_runs, memory.memory_budget(), sweep.path)
    compile_s = time.perf_counter() - t
    hp = _batch_hparams(sweep, np.arange(min(per_batch, sweep.n_runs)), per_batch, program)
    one = train.make_program(static, devices, vectorize, evals=1).chunk  # one evaluation interval
    state, metrics = one(init(hp), hp, train.first_evals(per_batch))  # compiles, and warms up
    jax.block_until_ready(metrics)
    t = time.perf_counter()
    state, metrics = one(state, hp, train.first_evals(per_batch, 1))
    jax.block_until_ready(metrics)
    interval_s = time.perf_counter() - t
    n_batches = -(-sweep.n_runs // per_batch)
    n_evals = cfg.steps // cfg.eval_every
    return {"runs": sweep.n_runs, "steps": cfg.steps, "model_steps": sweep.n_runs * cfg.steps,
            "devices": program.sharding.mesh.size, "platform": program.sharding.mesh.devices.flat[0].platform,
            "runs_per_batch": per_batch, "batches": n_batches, "chunk_steps": program.evals_per_chunk * cfg.eval_every,
            "bytes_per_run": memory.bytes_per_run(static, program), "batch_bytes": need,
            "budget": memory.memory_budget(), "compile_s": compile_s, "interval_s": interval_s,
            "train_s": interval_s * n_evals * n_batches}
