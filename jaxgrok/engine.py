"""Drives the compiled program over a sweep: batches of runs, chunks of steps, curves back to host.

The only host-device synchronisation is one metrics transfer per chunk, and it overlaps with the
next chunk: JAX dispatches chunk k+1 before we block on chunk k's metrics. With a `Store`, finished
batches become part files, the batch in progress is checkpointed every few chunks and on SIGTERM or
SIGINT, and a restarted sweep picks up exactly where the last checkpoint left it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
import time
from dataclasses import dataclass
from typing import Callable

import jax
import numpy as np

from jaxgrok import grokking, measures, results, train
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


def _runs_table(sweep, index, curves, outcomes, energies):
    share = sweep.static.measures.key_freq_share
    key_freqs = measures.key_frequencies(energies, share) if sweep.static.measures.fourier else None
    return results.runs_table(sweep, index, outcomes, {m: c[:, -1] for m, c in curves.items()}, key_freqs)


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


def _out_of_memory(error: Exception) -> bool:
    """Whether an XLA error says the device ran out of memory (at allocation or while running). A
    failed write (a full disk says RESOURCE_EXHAUSTED too, through tensorstore) never does."""
    if isinstance(error, OSError):
        return False
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def _compile(program: train.Program, per_batch: int):
    """Both programs compiled ahead for batches of `per_batch` runs, from shapes alone: nothing is
    allocated on the device before we know that the batch fits."""
    hp, state = train.abstract_inputs(program, per_batch)
    init = program.init.lower(hp).compile()
    chunk = program.chunk.lower(state, hp, np.int32(0)).compile()
    return init, chunk


def _metrics_bytes(program: train.Program, runs_per_device: int) -> int:
    """The bytes of one chunk's metrics on a device."""
    return runs_per_device * program.evals_per_chunk * len(train.METRICS) * 4


def _fit(program: train.Program, static, n_runs: int, budget: int, where: str = "sweep"):
    """(runs per batch, compiled init, compiled chunk, bytes per device) for batches that fit in
    `budget` bytes per device. The analytic estimate gives a first size; then what XLA says the
    compiled program needs (where the backend says it) decides: a line through two sizes' needs
    (fixed costs such as the task table and the code, plus a cost per run) gives the largest batch
    that fits. A few compiles at most, once per sweep."""
    n_dev = program.sharding.mesh.size
    per_device = train.runs_per_batch(static, program, n_runs, budget) // n_dev
    everything = -(-n_runs // n_dev)
    points: list[tuple[int, int]] = []  # (runs per device, bytes it needs)
    while True:
        init, chunk = _compile(program, per_device * n_dev)
        need = train.batch_bytes(init, chunk, _metrics_bytes(program, per_device))
        if need is None or static.train.max_runs_per_batch:
            return per_device * n_dev, init, chunk, need
        if need > budget and per_device == 1:
            raise train.TooLarge(f"{where}: one run needs {train.human_bytes(need)} of device memory, more than the "
                                 f"budget of {train.human_bytes(budget)} per device (JAXGROK_MEMORY_BUDGET, or the device's limit)")
        points.append((per_device, need))
        if len(points) >= 2:
            (n0, b0), (n1, b1) = points[-2:]
            per_run = max((b1 - b0) / (n1 - n0), 1.0)
            target = int((budget - (b1 - per_run * n1)) // per_run)
        else:  # one point: fixed costs counted per run, an underestimate of what fits
            target = int(budget // (need / per_device))
            if need <= budget and target <= per_device < everything:
                target = 2 * per_device  # a second size, to tell fixed costs from costs per run
        target = max(1, min(everything, target))
        if need <= budget and (target <= per_device or len(points) >= 4):
            return per_device * n_dev, init, chunk, need
        per_device = min(target, per_device - 1) if need > budget else target


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
    static = sweep.static
    index = np.arange(sweep.n_runs) if index is None else np.asarray(index)
    program = train.make_program(static, devices, vectorize)
    n_dev = program.sharding.mesh.size
    start = time.perf_counter()
    # Sized from the whole request, not from what is left: the same on every restart.
    per_batch, init, chunk, need = _fit(program, static, len(index), train.memory_budget(), sweep.path)
    compile_s = time.perf_counter() - start  # timed apart from training
    batches, resume = _plan(sweep, index, per_batch, store)
    if on_chunk:  # compiled: the display says training has begun, before the first chunk ends
        on_chunk(Progress(0, 0, 0, 0, 0.0, 0, 0, compiled_s=compile_s))
    if not _agree(repr([b.tolist() for b in batches]) + str(resume)):
        # Processes saw different checkpoints: drop them all and start those runs afresh.
        store.clear_checkpoints()
        batches, resume = _plan(sweep, index, per_batch, store)
    n_evals = static.train.steps // static.train.eval_every
    epc = program.evals_per_chunk
    steps = np.arange(1, n_evals + 1, dtype=np.int64) * static.train.eval_every
    hashes = sweep.run_hashes
    thr = static.grokking.threshold

    def batch_hparams(rows):
        return _batch_hparams(sweep, rows, per_batch, program)

    def catch_up(n: int):
        """A chunk of `n` evaluations: a checkpoint saved between two chunks of another chunk_steps
        is brought to a chunk boundary by one shorter chunk (compiled once, on such a resume only)."""
        return train.make_program(static, devices, vectorize, evals=n).chunk

    done_curves: list[np.ndarray] = []
    done_energies: list[np.ndarray] = []
    trained_rows: list[np.ndarray] = []
    start, trained_here = time.perf_counter(), 0
    total = sum(len(r) for r in batches) * static.train.steps  # over all processes
    finished = 0  # runs of finished batches, all processes

    def train_batch(b: int, rows: np.ndarray):
        nonlocal trained_here
        hp = batch_hparams(rows)
        state = init(hp)
        local, _ = _local(hp.seed)  # the rows of the padded batch that this process holds
        mine = local[local < len(rows)]  # ...and of those, the real runs
        curves = np.full((per_batch, n_evals, len(train.METRICS)), np.nan, np.float32)
        first = 0  # evaluations done
        if b == 0 and resume and (got := store.restore(_abstract(state, curves, program.sharding))):
            state, saved_curves, steps_done = got
            curves[local] = _local(saved_curves)[1]
            first = steps_done // static.train.eval_every

        def collect(e0, n, metrics):
            nonlocal trained_here
            # Host sync: blocks until this chunk is done (the next one is already queued behind it).
            pos, data = _local(metrics)
            curves[pos, e0:e0 + n] = data
            # Processes move in step, so this process's share scales to the whole.
            trained_here += len(rows) * n * static.train.eval_every
            if on_chunk:
                counts = [grokking.progress_counts(c_[..., 1], c_[..., 3], thr)
                          for c_ in done_curves + [curves[mine, :e0 + n]]]
                steps_done = finished * static.train.steps + len(rows) * (e0 + n) * static.train.eval_every
                on_chunk(Progress(steps_done, total, sum(m for m, _ in counts), sum(g for _, g in counts),
                                  trained_here / max(time.perf_counter() - start, 1e-9), b, len(batches)))

        # (first evaluation, evaluations, compiled chunk) for what is left of the run
        todo = [(first, epc - first % epc, catch_up(epc - first % epc))] if first % epc else []
        todo += [(e0, epc, chunk) for e0 in range(first + (-first) % epc, n_evals, epc)]
        pending = None
        for k, (e0, n, run_chunk) in enumerate(todo):
            # The evaluation counter makes the measures' cadence and randomness count from the run's
            # start, whatever the chunking.
            state, metrics = run_chunk(state, hp, np.int32(e0))
            if pending is not None:
                collect(*pending)
            pending = (e0, n, metrics)
            if store is not None and e0 + n < n_evals and (
                    _stop_requested(store) or (k + 1) % store.checkpoint_every == 0):
                collect(*pending)
                pending = None
                global_curves = jax.make_array_from_process_local_data(program.sharding, curves[local], curves.shape)
                store.save(state, global_curves, [hashes[r] for r in rows], (e0 + n) * static.train.eval_every)
                if store.stop_signal is not None:
                    raise Interrupted(store.stop_signal)
        if pending is not None:
            collect(*pending)
        pos, energies = _local(state.energies)  # the final spectrum: each run's key frequencies
        energies = energies[:, :measures.n_frequencies(static, program.table.n_symbols)]  # not the placeholder
        return curves[mine], rows[mine], energies[np.isin(pos, mine)]  # with several processes, each keeps its own

    b = 0
    while b < len(batches):
        try:
            curves, rows, energies = train_batch(b, batches[b])
        except Exception as error:  # XLA's out-of-memory error has no class of its own
            if not _out_of_memory(error) or per_batch == n_dev:
                raise
            # Halve the batch, compile once more, and train this batch's runs and the rest again in
            # the smaller batches; finished batches are kept (and a checkpoint of the failed one,
            # sized for the old batch, is dropped).
            per_batch = per_batch // n_dev // 2 * n_dev
            t = time.perf_counter()
            init, chunk = _compile(program, per_batch)
            compile_s += time.perf_counter() - t
            need = train.batch_bytes(init, chunk, _metrics_bytes(program, per_batch // n_dev))
            rest = np.concatenate(batches[b:])
            batches = batches[:b] + [rest[k:k + per_batch] for k in range(0, len(rest), per_batch)]
            if store is not None and resume and b == 0:
                store.clear_checkpoints()
            resume = False
            continue
        if store is not None:
            named = {m: curves[..., i] for i, m in enumerate(train.METRICS)}
            outcomes = grokking.analyse(named, steps, static.grokking)
            store.write_batch(_runs_table(sweep, rows, named, outcomes, energies),
                              results.curves_table(rows, steps, named, sweep.resolved, [hashes[i] for i in rows]))
        done_curves.append(curves)
        done_energies.append(energies)
        trained_rows.append(rows)
        finished += len(batches[b])
        b += 1

    trained = np.concatenate(trained_rows) if trained_rows else np.zeros(0, np.int64)
    all_curves = np.concatenate(done_curves) if done_curves else np.zeros((0, n_evals, len(train.METRICS)), np.float32)
    named = {m: all_curves[..., i] for i, m in enumerate(train.METRICS)}
    outcomes = grokking.analyse(named, steps, static.grokking)
    energies = np.concatenate(done_energies) if done_energies else np.zeros((0, 0), np.float32)
    return SweepResult(sweep, trained, steps, named, outcomes, energies, compile_s, time.perf_counter() - start,
                       per_batch, need)


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
        state, _ = program.chunk(state, hp, np.int32(c))
        if (c + 1) * cfg.eval_every in wanted:
            out[(c + 1) * cfg.eval_every] = take()
    return out


def dry_run(sweep: Sweep, devices=None, vectorize: bool | None = None) -> dict:
    """What `jaxgrok run` would do, with nothing written: the batches it would train (sized as the
    run sizes them), the memory they need, and an estimate of the training time from one timed
    evaluation interval of the first batch on this machine."""
    static, cfg = sweep.static, sweep.static.train
    program = train.make_program(static, devices, vectorize)
    t = time.perf_counter()
    per_batch, init, _, need = _fit(program, static, sweep.n_runs, train.memory_budget(), sweep.path)
    compile_s = time.perf_counter() - t
    hp = _batch_hparams(sweep, np.arange(min(per_batch, sweep.n_runs)), per_batch, program)
    one = train.make_program(static, devices, vectorize, evals=1).chunk  # one evaluation interval
    state, metrics = one(init(hp), hp, np.int32(0))  # compiles, and warms up
    jax.block_until_ready(metrics)
    t = time.perf_counter()
    state, metrics = one(state, hp, np.int32(1))
    jax.block_until_ready(metrics)
    interval_s = time.perf_counter() - t
    n_batches = -(-sweep.n_runs // per_batch)
    n_evals = cfg.steps // cfg.eval_every
    return {"runs": sweep.n_runs, "steps": cfg.steps, "model_steps": sweep.n_runs * cfg.steps,
            "devices": program.sharding.mesh.size, "platform": program.sharding.mesh.devices.flat[0].platform,
            "runs_per_batch": per_batch, "batches": n_batches, "chunk_steps": program.evals_per_chunk * cfg.eval_every,
            "bytes_per_run": train.bytes_per_run(static, program), "batch_bytes": need,
            "budget": train.memory_budget(), "compile_s": compile_s, "interval_s": interval_s,
            "train_s": interval_s * n_evals * n_batches}
