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

    digest = np.frombuffer(hashlib.sha256(value.encode()).digest()[:8], np.int64)
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


def _runs_table(sweep, index, curves, outcomes, energies, energies0):
    share = sweep.static.measures.key_freq_share
    key_freqs = measures.key_frequencies(energies, share) if sweep.static.measures.fourier else None
    p = tasks.sizes(sweep.static.task).n_symbols
    ticket = measures.initial_key_share(energies0, key_freqs, p) if key_freqs is not None else None
    return results.runs_table(sweep, index, outcomes, {m: c[:, -1] for m, c in curves.items()}, key_freqs, ticket)


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


def _plan(sweep: Sweep, index: np.ndarray, per_batch: int, store: Store | None) -> tuple[list[np.ndarray], bool]:
    """The batches to train: a checkpointed batch first (exactly its runs), then the pending runs.
    A checkpoint that a changed sweep file no longer covers stops the sweep with one line; one that
    cannot be taken back as it is (another batch size, an older format) is said and dropped: its
    runs train from step 0, as in a fresh run."""
    todo = index if store is None else store.pending(index)
    batches, resume = [], False
    if store is not None and (cursor := store.checkpointed_batch()):
        position = {h: i for i, h in enumerate(sweep.run_hashes)}
        if set(cursor["run_hashes"]) <= store.done_hashes():
            # Killed after the batch's parts were committed and before its checkpoints were
            # deleted: the parts hold all its runs, so the checkpoint says nothing more.
            store.clear_checkpoints()
            return _plan(sweep, index, per_batch, store)
        rows = np.array([position.get(h, -1) for h in cursor["run_hashes"]])
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
            curves, rows, energies, energies0 = _train_batch(ctx, compiled, plan, tally, b)
        except Exception as error:  # XLA's out-of-memory error has no class of its own
            if not memory.out_of_memory(error) or compiled.per_batch == ctx.program.sharding.mesh.size:
                raise
            compiled, plan, seconds = _halved(ctx, compiled, plan, b)
            compile_s += seconds
            continue
        _batch_done(ctx, tally, curves, rows, (energies, energies0), len(plan.batches[b]))
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

    @property
    def n_evals(self) -> int:
        """Evaluations of each run."""
        return self.sweep.static.train.steps // self.sweep.static.train.eval_every

    @property
    def steps(self) -> np.ndarray:
        """The step of each evaluation."""
        return np.arange(1, self.n_evals + 1, dtype=np.int64) * self.sweep.static.train.eval_every

    def catch_up(self, n: int):
        """A chunk of `n` evaluations: a checkpoint saved between two chunks of another chunk_steps
        is brought to a chunk boundary by one shorter chunk (compiled once, on such a resume only)."""
        return train.make_program(self.sweep.static, self.devices, self.vectorize, evals=n).chunk


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
    """What this call has trained so far: the finished batches' runs, and the display's counts."""

    start: float  # when training began (after compiling)
    total: int  # model-steps to train, all processes
    trained_here: int = 0  # model-steps done, scaled to all processes
    finished: int = 0  # runs of finished batches, all processes
    curves: list[np.ndarray] = field(default_factory=list)
    energies: list[np.ndarray] = field(default_factory=list)
    rows: list[np.ndarray] = field(default_factory=list)


@dataclass
class _Batch:
    """The batch in training: its runs, its padded Hparams, and its curves so far."""

    b: int  # its position in the plan
    rows: np.ndarray  # its runs (all processes')
    hp: train.Hparams
    local: np.ndarray  # the rows of the padded batch that this process holds
    mine: np.ndarray  # ...and of those, the real runs
    curves: np.ndarray  # float32[per_batch, evals, len(METRICS)], NaN where not yet trained


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


def _train_batch(ctx: _Context, compiled: _Compiled, plan: _Plan, tally: _Tally, b: int):
    """Train batch `b` of the plan, from its checkpoint if it has one, and return this process's
    (curves, rows, final spectra) of its real runs. With a store, the batch is checkpointed every
    few chunks and on a signal (then Interrupted is raised)."""
    batch, state, first = _begin_batch(ctx, compiled, plan, b)
    cfg, store, epc = ctx.sweep.static.train, ctx.store, ctx.program.evals_per_chunk
    # (first evaluation, evaluations, compiled chunk) for what is left of the run
    todo = [(first, epc - first % epc, ctx.catch_up(epc - first % epc))] if first % epc else []
    todo += [(e0, epc, compiled.chunk) for e0 in range(first + (-first) % epc, ctx.n_evals, epc)]
    pending = None
    for k, (e0, n, run_chunk) in enumerate(todo):
        # The evaluation counter makes the measures' cadence and randomness count from the run's
        # start, whatever the chunking.
        state, metrics = run_chunk(state, batch.hp, _global(train.first_evals(len(batch.curves), e0), ctx.program.sharding))
        if pending is not None:
            _collect(ctx, tally, batch, len(plan.batches), *pending)
        pending = (e0, n, metrics)
        if store is not None and e0 + n < ctx.n_evals and (
                _stop_requested(store) or (k + 1) % store.checkpoint_every == 0):
            _collect(ctx, tally, batch, len(plan.batches), *pending)
            pending = None
            _checkpoint(ctx, batch, state, (e0 + n) * cfg.eval_every)
    if pending is not None:
        _collect(ctx, tally, batch, len(plan.batches), *pending)
    pos, energies = _local(state.energies)  # the final spectrum: each run's key frequencies
    energies = energies[:, :measures.n_frequencies(ctx.sweep.static, ctx.program.table.n_symbols)]  # not the placeholder
    spectrum0 = ctx.program.spectrum0
    energies0 = _local(spectrum0(state.params0))[1] if spectrum0 else np.zeros_like(energies)  # step 0's, of the same runs
    mine = np.isin(pos, batch.mine)  # with several processes, each keeps its own
    return batch.curves[batch.mine], batch.rows[batch.mine], energies[mine], energies0[mine]


def _begin_batch(ctx: _Context, compiled: _Compiled, plan: _Plan, b: int) -> tuple[_Batch, train.RunState, int]:
    """Batch `b`'s initial state, or its checkpointed one on a resume, and the evaluations it has done."""
    rows = plan.batches[b]
    hp = _batch_hparams(ctx.sweep, rows, compiled.per_batch, ctx.program)
    state = compiled.init(hp)
    local, _ = _local(hp.seed)
    curves = np.full((compiled.per_batch, ctx.n_evals, len(train.METRICS)), np.nan, np.float32)
    batch = _Batch(b, rows, hp, local, local[local < len(rows)], curves)
    first = 0  # evaluations done
    if b == 0 and plan.resume and (got := ctx.store.restore(_abstract(state, curves, ctx.program.sharding))):
        state, saved_curves, steps_done = got
        curves[local] = _local(saved_curves)[1]
        first = steps_done // ctx.sweep.static.train.eval_every
    return batch, state, first


def _collect(ctx: _Context, tally: _Tally, batch: _Batch, n_batches: int, e0: int, n: int, metrics) -> None:
    """Take a chunk's metrics into the batch's curves and tell the display."""
    cfg = ctx.sweep.static.train
    # Host sync: blocks until this chunk is done (the next one is already queued behind it).
    pos, data = _local(metrics)
    batch.curves[pos, e0:e0 + n] = data
    # Processes move in step, so this process's share scales to the whole.
    tally.trained_here += len(batch.rows) * n * cfg.eval_every
    if ctx.on_chunk:
        thr = ctx.sweep.static.grokking.threshold
        acc = train.METRICS.index("train_acc"), train.METRICS.index("val_acc")
        counts = [grokking.progress_counts(c_[..., acc[0]], c_[..., acc[1]], thr)
                  for c_ in tally.curves + [batch.curves[batch.mine, :e0 + n]]]
        steps_done = tally.finished * cfg.steps + len(batch.rows) * (e0 + n) * cfg.eval_every
        ctx.on_chunk(Progress(steps_done, tally.total, sum(m for m, _ in counts), sum(g for _, g in counts),
                              tally.trained_here / max(time.perf_counter() - tally.start, 1e-9), batch.b, n_batches))


def _checkpoint(ctx: _Context, batch: _Batch, state, steps_done: int) -> None:
    """Checkpoint the batch in progress; then stop if a signal asked for it."""
    store, curves = ctx.store, batch.curves
    global_curves = jax.make_array_from_process_local_data(ctx.program.sharding, curves[batch.local], curves.shape)
    store.save(state, global_curves, [ctx.sweep.run_hashes[r] for r in batch.rows], steps_done)
    if store.stop_signal is not None:
        raise Interrupted(store.stop_signal)


def _halved(ctx: _Context, compiled: _Compiled, plan: _Plan, b: int) -> tuple[_Compiled, _Plan, float]:
    """After batch `b` ran out of memory: programs compiled for half the batch, and a plan that
    trains that batch's runs and the rest again in the smaller batches (finished batches are kept,
    and a checkpoint of the failed one, sized for the old batch, is dropped); and the compile time."""
    n_dev = ctx.program.sharding.mesh.size
    per_batch = compiled.per_batch // n_dev // 2 * n_dev
    t = time.perf_counter()
    init, chunk = memory.compile_batch(ctx.program, per_batch)
    seconds = time.perf_counter() - t
    need = memory.batch_bytes(init, chunk, memory.metrics_bytes(ctx.program, per_batch // n_dev))
    rest = np.concatenate(plan.batches[b:])
    batches = plan.batches[:b] + [rest[k:k + per_batch] for k in range(0, len(rest), per_batch)]
    if ctx.store is not None and plan.resume and b == 0:
        ctx.store.clear_checkpoints()
    return _Compiled(per_batch, init, chunk, need), _Plan(batches, False), seconds


def _batch_done(ctx: _Context, tally: _Tally, curves, rows, spectra, n_runs: int) -> None:
    """Keep a finished batch's runs, and with a store commit them as part files. `spectra`: the runs'
    final and initial embedding spectra."""
    energies, energies0 = spectra
    if ctx.store is not None:
        sweep, steps = ctx.sweep, ctx.steps
        named = {m: curves[..., i] for i, m in enumerate(train.METRICS)}
        outcomes = grokking.analyse(named, steps, sweep.static.grokking)
        ctx.store.write_batch(_runs_table(sweep, rows, named, outcomes, energies, energies0),
                              results.curves_table(rows, steps, named, sweep.resolved, [sweep.run_hashes[i] for i in rows]))
    tally.curves.append(curves)
    tally.energies.append(energies)
    tally.rows.append(rows)
    tally.finished += n_runs


def _result(ctx: _Context, tally: _Tally, compile_s: float, compiled: _Compiled) -> SweepResult:
    trained = np.concatenate(tally.rows) if tally.rows else np.zeros(0, np.int64)
    all_curves = (np.concatenate(tally.curves) if tally.curves
                  else np.zeros((0, ctx.n_evals, len(train.METRICS)), np.float32))
    named = {m: all_curves[..., i] for i, m in enumerate(train.METRICS)}
    outcomes = grokking.analyse(named, ctx.steps, ctx.sweep.static.grokking)
    energies = np.concatenate(tally.energies) if tally.energies else np.zeros((0, 0), np.float32)
    return SweepResult(ctx.sweep, trained, ctx.steps, named, outcomes, energies, compile_s,
                       time.perf_counter() - tally.start, compiled.per_batch, compiled.need)


@_in_precision
def params_at(sweep: Sweep, run: int, steps) -> dict[int, dict]:
    """{step: parameters} of one run of a sweep after each of `steps` (0 or multiples of
    eval_every), retrained alone on one device with the measures off (they do not touch training):
    on CPU bit for bit the run the sweep trained. For figures of how an embedding forms."""
    cfg = sweep.static.train
    off = {f.name: False for f in dataclasses.fields(sweep.static.measures) if f.type in (bool, "bool")}
    static = dataclasses.replace(sweep.static, train=dataclasses.replace(cfg, chunk_steps=cfg.eval_every),
                                 measures=dataclasses.replace(sweep.static.measures, **off))
    program = train.make_program(static, jax.devices()[:1])
    hp = jax.device_put(train.hparams_for(sweep, np.array([run])), program.sharding)
    state = program.init(hp)
    wanted, out = sorted(set(int(s) for s in steps)), {}
    take = lambda: jax.tree.map(lambda x: np.asarray(x)[0], state.params)  # noqa: E731
    if 0 in wanted:
        out[0] = take()
    for c in range(max(wanted) // cfg.eval_every):
        state, _ = program.chunk(state, hp, train.first_evals(1, c))
        if (c + 1) * cfg.eval_every in wanted:
            out[(c + 1) * cfg.eval_every] = take()
    return out


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
