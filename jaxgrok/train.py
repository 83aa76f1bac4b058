"""One compiled program trains every run of a sweep: vmap over a run axis, sharded over devices.

`make_program(static)` does all Python-side setup once (the task table, the model, the optimizer
recipe, the progress measures) and returns `init(hparams) -> state` and `chunk(state, hparams,
first_eval) -> (state, metrics)`, both jitted once. `first_eval` is per run (int32[runs]): the
evaluations each run has done, so that a batch may hold runs at different points of training. A chunk is `lax.scan` over evaluations, each
`eval_every` optimizer steps followed by one evaluation on the full table: losses, accuracies and the
measures of jaxgrok/measures; nothing leaves the device inside a chunk. Swept values (seeds, weight
decay, learning rate, init scale, train fraction) are *arguments* with a leading run axis; whatever
changes shapes stays in `static` and decides the compile.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxgrok import measures, models, optim, tasks
from jaxgrok.sweep import Static, Sweep, SweepError, axes

CURVES, METRICS = measures.CURVES, measures.METRICS  # one row of a chunk's metrics per evaluation
TRACES: collections.Counter = collections.Counter()  # trace counts, for the no-recompile test


NOISE_STREAM = 0x6E6F6973  # folded into noise_seed's key: its draws are independent of any model seed's


# The swept values of each run, every field with a leading run axis: one per axis of the sweep
# (sweep/axes.py, in its table's order), seeds int32, the rest float32, train_fraction as n_train
# (int32, the training pairs counted on the host).
Hparams = NamedTuple("Hparams", [(a.arg, jax.Array) for a in axes.TABLE])


class RunState(NamedTuple):
    """One run's training state (a leading run axis in a batch): what a checkpoint holds."""

    params: dict
    params0: dict  # the initial parameters, for dist_from_init
    opt_state: optax.OptState
    order: jax.Array  # int32[N]: a permutation of the pairs; the first n_train are for training
    is_train: jax.Array  # bool[N]
    key: jax.Array  # minibatch sampling
    diverged: jax.Array  # bool: loss or gradient went non-finite; the run is frozen since
    energies: jax.Array  # float32[K]: the embedding's Fourier spectrum at the latest evaluation (K = 0: one unused value)
    streak: jax.Array  # int32: evaluations in a row with validation accuracy ≥ the threshold ([train] stop_after_grokking)
    retired: jax.Array  # bool: that streak lasted stop_after_grokking steps; the run is frozen since


class Program(NamedTuple):
    """A sweep's compiled program: init and chunk, with the model, task table and sharding they were built for."""

    init: Callable  # Hparams -> RunState
    chunk: Callable  # (RunState, Hparams, first_eval int32[runs]) -> (RunState, metrics float32[runs, evals, len(METRICS)])
    model: models.Model
    table: tasks.Table
    sharding: NamedSharding
    evals_per_chunk: int
    spectrum0: Callable | None = None  # params0 -> float32[runs, K]: the step-0 embedding's spectrum (None: K = 0)
    refill: Callable | None = None  # (mask bool[runs], fresh, state) -> state: see refilled


def hparams_for(sweep: Sweep, index: np.ndarray) -> Hparams:
    """The host-side Hparams of the runs `index` of a sweep."""
    return Hparams(**sweep.program_values(index))


# ---------------------------------------------------------------------------------------------
# Precision


def matmul_precision(precision: str):
    """The matmul precision of float32 operands while the program is traced. "float32" asks for
    true float32 explicitly: by default JAX lets recent GPUs use TF32 (and TPUs bfloat16 passes)."""
    return jax.default_matmul_precision("tensorfloat32" if precision == "tf32" else "float32")


def x64(static: Static):
    """The context a sweep's program is traced, compiled and called in: JAX's x64 mode for a float64
    sweep (scoped: other sweeps in the process stay in float32), nothing otherwise."""
    return jax.enable_x64(static.train.precision == "float64")


def with_precision(model: models.Model, precision: str) -> models.Model:
    """The model computing in `precision`: for bfloat16, the forward pass (and so its backward pass)
    on bfloat16 copies of the float32 parameters, the logits back in float32 for the losses. The
    gradient reaches the float32 parameters through the cast; the optimizer never sees bfloat16."""
    if precision == "float64":  # the built-in initializers draw float32: the weights start as those, widened
        return model._replace(init=lambda key: jax.tree.map(lambda w: w.astype(jnp.float64), model.init(key)))
    if precision != "bfloat16":
        return model

    def apply(params, pairs):
        return model.apply(jax.tree.map(lambda w: w.astype(jnp.bfloat16), params), pairs).astype(jnp.float32)

    def features(params, pairs):  # the features as the logits see them; the float32 output weight
        h, _ = model.features(jax.tree.map(lambda w: w.astype(jnp.bfloat16), params), pairs)
        return h.astype(jnp.float32), model.features(params, pairs)[1]  # (its float32 h is never computed)

    return model._replace(apply=apply, features=features if model.features is not None else None)


def depends_on_budget(static: Static) -> bool:
    """Whether a run's training depends on its step budget (a schedule that decays to the end would):
    then a run cannot be extended to a larger budget from its final state. None does today: the
    warm-up is a fixed number of steps and the rate is constant after it."""
    return False


def state_leaves(state: RunState) -> dict[str, jax.Array]:
    """A run state's leaves by name (a typed key as its data): how a final state is stored."""
    state = state._replace(key=jax.random.key_data(state.key))
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}


def from_leaves(like: RunState, leaves: dict[str, jax.Array]) -> RunState:
    """The run state with these leaves (named as state_leaves names them), shaped like `like`."""
    data = like._replace(key=jax.random.key_data(like.key))
    paths, treedef = jax.tree_util.tree_flatten_with_path(data)
    state = jax.tree_util.tree_unflatten(treedef, [leaves[jax.tree_util.keystr(p)] for p, _ in paths])
    return state._replace(key=jax.random.wrap_key_data(state.key, impl=jax.random.key_impl(like.key)))


def first_evals(n_runs: int, first: int = 0) -> np.ndarray:
    """The chunk's `first_eval` for `n_runs` runs that have all done `first` evaluations."""
    return np.full(n_runs, first, np.int32)


def abstract_first_evals(program: Program, n_runs: int) -> jax.ShapeDtypeStruct:
    """The shape and sharding of a batch's `first_eval`, to lower the chunk with (on many processes
    too, where a host array cannot stand for a sharded one)."""
    return jax.ShapeDtypeStruct((n_runs,), jnp.int32, sharding=program.sharding)


def abstract_inputs(program: Program, n_runs: int) -> tuple[Hparams, RunState]:
    """The shapes, dtypes and shardings of a batch's Hparams (those of `hparams_for`) and RunState:
    enough to lower and compile both programs ahead, with nothing allocated."""
    sd = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=program.sharding)  # noqa: E731
    hp = Hparams(**{a.arg: sd((n_runs,), a.arg_dtype) for a in axes.TABLE})
    state = jax.tree.map(lambda a: sd(a.shape, a.dtype), jax.eval_shape(program.init, hp))
    return hp, state


def evals_per_chunk(static: Static) -> int:
    """The largest divisor of the evaluation count that keeps a chunk within `chunk_steps`: every
    chunk then has the same length and the program compiles once."""
    n_evals = static.train.steps // static.train.eval_every
    target = max(1, static.train.chunk_steps // static.train.eval_every)
    return max(d for d in range(1, min(target, n_evals) + 1) if n_evals % d == 0)


def make_program(static: Static, devices=None, vectorize: bool | None = None, evals: int | None = None) -> Program:
    """The compiled program of a sweep's static config over `devices` (all by default). Within a
    device, runs are vmapped (`vectorize`, the default on accelerators) or mapped one at a time
    (the default on CPU). A chunk holds `evals` evaluations (default: evals_per_chunk)."""
    devices = list(devices if devices is not None else jax.devices())
    if static.train.precision == "float64":
        if devices[0].platform == "tpu":
            raise SweepError(f"train.precision: float64 is not supported on {devices[0].platform.upper()}")
        if not jax.config.jax_enable_x64:
            raise RuntimeError("a float64 program is traced, compiled and called inside train.x64(static)")
    if vectorize is None:
        vectorize = devices[0].platform != "cpu"
    s = _setup(static, vectorize)
    n_evals = evals or evals_per_chunk(static)
    mesh = Mesh(np.asarray(devices), ("runs",))
    runs = NamedSharding(mesh, P("runs"))
    init = jax.jit(jax.vmap(partial(init_run, s)), in_shardings=runs, out_shardings=runs)
    sharded = _over_devices(partial(chunk_run, s, n_evals), mesh, vectorize, measures.cadences(static), n_evals)
    chunk = jax.jit(sharded, in_shardings=(runs, runs, runs), out_shardings=(runs, runs), donate_argnums=0)
    refill = jax.jit(refilled, in_shardings=(runs, runs, runs), out_shardings=runs, donate_argnums=2)
    return Program(init, chunk, s.model, s.table, runs, n_evals, _spectrum0(s, mesh, vectorize), refill)


def refilled(mask, fresh: RunState, state: RunState) -> RunState:
    """A batch's `state` with the runs where `mask` is set taken from `fresh` (initial states): the
    slots that retired runs left, given to pending runs. A selection only, so a run's first state is
    bit for bit the one a fresh batch gives it."""
    def pick(new, old):
        if jax.dtypes.issubdtype(new.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(pick(jax.random.key_data(new), jax.random.key_data(old)),
                                            impl=jax.random.key_impl(new))
        return jnp.where(mask.reshape(mask.shape + (1,) * (new.ndim - 1)), new, old)
    return jax.tree.map(pick, fresh, state)


def _spectrum0(s: Setup, mesh: Mesh, vectorize: bool) -> Callable | None:
    """The Fourier spectrum of each run's initial embedding (the lottery ticket: is the circuit there
    at step 0?) over a run-sharded batch of initial parameters, each run on its own as in the chunk
    (so that its value does not depend on its batch); None without a spectrum."""
    if not s.n_freqs:
        return None
    from jaxgrok.measures import fourier

    basis = jnp.asarray(fourier.basis(s.table.n_symbols))
    one = lambda p: fourier.energies(s.model.embedding(p), basis).astype(jnp.float32)  # noqa: E731
    per_device = jax.vmap(one) if vectorize else (lambda ps: jax.lax.map(one, ps))
    sharded = jax.shard_map(per_device, mesh=mesh, in_specs=P("runs"), out_specs=P("runs"))
    runs = NamedSharding(mesh, P("runs"))
    return jax.jit(sharded, in_shardings=runs, out_shardings=runs)


class Setup(NamedTuple):
    """What every part of one run's program closes over, built once on the host from the static
    config: it decides shapes, so it decides the compile."""

    static: Static
    model: models.Model  # in the sweep's precision
    table: tasks.Table
    inputs: jax.Array  # int32[N, inputs]: every pair of the task
    targets: jax.Array  # int32[N]
    n_freqs: int  # K, the length of a run's Fourier spectrum (0: none)
    measure: Callable  # measures.build's measure(inputs) -> (values, energies)
    llc_batch: int  # the LLC's minibatch size; 0: the run's whole training set
    vectorize: bool = False  # runs vmapped (accelerators) rather than mapped one at a time (CPU)


def _setup(static: Static, vectorize: bool) -> Setup:
    table = tasks.make_table(static.task)
    model = with_precision(models.build(static.model, table.n_symbols, table.n_classes, table.inputs.shape[1]),
                           static.train.precision)
    loss = partial(per_example_loss, static.loss, table.n_classes)
    measure = measures.build(static, model, table, loss, vectorize)
    # The LLC's minibatches: llc_batch_size pairs, or the run's whole training set where that is not
    # larger (decided per run, not by the sweep's smallest training set).
    llc_batch = static.measures.llc_batch_size if static.measures.llc_batch_size < static.n_train_max else 0
    return Setup(static, model, table, jnp.asarray(table.inputs), jnp.asarray(table.targets),
                 measures.n_frequencies(static, table.n_symbols), measure, llc_batch, vectorize)


def _over_devices(chunk_run_: Callable, mesh: Mesh, vectorize: bool, cadences: tuple[int, ...],
                  n_evals: int) -> Callable:
    """One run's chunk over a run-sharded batch: each device trains its own shard of the run axis
    and nothing crosses devices. Each run counts its own evaluations (`first_eval`, per run)."""
    if vectorize:  # accelerators: all of a device's runs in one wide kernel
        def per_device(state, hp, e):
            # A measure at its own cadence is computed where *some* run of the device is due (one
            # real branch for all), and kept for the runs that are: a per-run predicate under vmap
            # would compute it at every evaluation.
            at = e[:, None] + jnp.arange(n_evals, dtype=jnp.int32)
            gates = {every: measures.due(at, every).any(0) for every in cadences}
            return jax.vmap(chunk_run_, in_axes=(0, 0, 0, None))(state, hp, e, gates)
    else:
        # CPU: one run after another. XLA's batched CPU kernels (and the scatter-adds that batched
        # gathers turn into) are slower per run than unbatched ones; each core is a device instead.
        # Each run's own evaluation counter decides its measures' branches.
        per_device = lambda state, hp, e: jax.lax.map(lambda a: chunk_run_(*a), (state, hp, e))  # noqa: E731
    return jax.shard_map(per_device, mesh=mesh, in_specs=(P("runs"), P("runs"), P("runs")), out_specs=P("runs"))


# ---------------------------------------------------------------------------------------------
# One run: initialization, a training step, an evaluation, a chunk


def log_stablemax(logits):
    """log s(x)/Σs(x) with s(x) = x + 1 for x ≥ 0 and 1/(1 − x) below (Prieto et al. 2025, utils.py):
    a normaliser that grows linearly, not exponentially, so no probability rounds to exactly 1. (The
    reference computes it in float64; here in the program's float32.)"""
    s = jnp.where(logits < 0, 1 / (1 - jnp.minimum(logits, 0)), logits + 1)
    return jnp.log(s / s.sum(-1, keepdims=True))


def per_example_loss(loss: str, n_classes: int, logits, labels):
    """The loss of each example: cross-entropy, for `loss` "mse" the squared error against one-hot
    targets averaged over classes (torch's MSELoss), for "stablemax" cross-entropy through StableMax."""
    if loss == "mse":
        return ((logits - jax.nn.one_hot(labels, n_classes)) ** 2).mean(-1)
    if loss == "stablemax":
        return -jnp.take_along_axis(log_stablemax(logits), labels[..., None], axis=-1)[..., 0]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def _loss(s: Setup, logits, labels):
    return per_example_loss(s.static.loss, s.table.n_classes, logits, labels)


def _optimizer(s: Setup, hp: Hparams) -> optax.GradientTransformation:
    # Built inside the vmapped function, so each run closes over its own traced values.
    return optim.optimizer(s.static.train, hp, s.static.grokfast, s.static.orthograd)


def init_run(s: Setup, hp: Hparams) -> RunState:
    """One run's initial state from its Hparams (traced, unbatched)."""
    with matmul_precision(s.static.train.precision):
        k_init, _ = jax.random.split(jax.random.key(hp.seed))
        _, k_batch = jax.random.split(jax.random.key(hp.batch_seed))  # = the model seed's by default
        # A perturbation ε·(an independent draw of the same initializer): relative to each tensor's own
        # scale. ε = 0 leaves the weights untouched, bit for bit.
        noise = s.model.init(jax.random.fold_in(jax.random.key(hp.noise_seed), NOISE_STREAM))
        params = jax.tree.map(lambda w, z: jnp.where(hp.init_noise > 0, w + hp.init_noise * z, w) * hp.init_scale,
                              s.model.init(k_init), noise)
        n_pairs = len(s.table.targets)
        order = jax.random.permutation(jax.random.key(hp.data_seed), n_pairs).astype(jnp.int32)
        is_train = jnp.zeros(n_pairs, bool).at[order].set(jnp.arange(n_pairs) < hp.n_train)
        return RunState(params, params, _optimizer(s, hp).init(params), order, is_train, k_batch, jnp.array(False),
                        jnp.zeros(max(s.n_freqs, 1), jnp.float32),  # orbax saves no zero-size arrays
                        jnp.array(0, jnp.int32), jnp.array(False))


def full_batch_loss(s: Setup, params, order, n_train):
    """The mean loss over the run's n_train training pairs, padded to the sweep's largest
    training set: the padded length decides how the sum rounds, so it is part of the run hash
    (sweep.py) wherever it exceeds the run's own."""
    n_max = s.static.n_train_max
    idx, weight = order[:n_max], (jnp.arange(n_max) < n_train).astype(jnp.float32)
    return (weight * _loss(s, s.model.apply(params, s.inputs[idx]), s.targets[idx])).sum() / weight.sum()


def minibatch_loss(s: Setup, params, order, n_train, key, size: int, at_most_n_train: bool = False,
                   run_size=None):
    """The mean loss over `size` distinct training pairs drawn with `key`; with
    `at_most_n_train`, over all of them where the run has fewer than `size` (the draws past its
    training set weigh 0); with `run_size` (a swept batch size), over the first `run_size` draws,
    which are the pairs a draw of `run_size` alone picks (top_k sorts)."""
    n_max = s.static.n_train_max
    noise = jax.random.uniform(key, (n_max,)) + (jnp.arange(n_max) >= n_train).astype(jnp.float32)
    picked, idx = jax.lax.top_k(-noise, size)
    loss = _loss(s, s.model.apply(params, s.inputs[order[idx]]), s.targets[order[idx]])
    if run_size is not None:
        weight = (jnp.arange(size) < run_size).astype(jnp.float32)
    elif at_most_n_train:
        weight = (picked > -1).astype(jnp.float32)  # a padded pair's noise is ≥ 1
    else:
        return loss.mean()
    return (weight * loss).sum() / weight.sum()


def train_step(s: Setup, state: RunState, hp: Hparams) -> RunState:
    """One optimizer step of one run, on its minibatch (or its whole training set)."""
    cfg = s.static.train
    key, sub = jax.random.split(state.key) if cfg.batch_size else (state.key, None)
    if cfg.batch_size:
        run_size = hp.batch_size if s.static.batch_varies else None  # cfg.batch_size: the sweep's largest
        loss, grads = jax.value_and_grad(partial(minibatch_loss, s, run_size=run_size))(
            state.params, state.order, hp.n_train, sub, cfg.batch_size)
    else:
        loss, grads = jax.value_and_grad(partial(full_batch_loss, s))(state.params, state.order, hp.n_train)
    updates, opt_state = _optimizer(s, hp).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if s.static.constrain_norm:  # Omnigrok: params *= ‖params0‖ / ‖params‖ after the step
        scale = optax.tree.norm(state.params0) / optax.tree.norm(params)
        params = jax.tree.map(lambda w: jnp.where(hp.constrain_norm > 0, w * scale, w), params)
    # A run whose loss or gradient is non-finite keeps its last finite weights from then on; so does
    # a retired run.
    diverged = state.diverged | ~(jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads)))
    frozen = diverged | state.retired if cfg.stop_after_grokking else diverged
    keep = lambda new, old: jnp.where(frozen, old, new)  # noqa: E731
    params = jax.tree.map(keep, params, state.params)
    opt_state = jax.tree.map(keep, opt_state, state.opt_state)
    return state._replace(params=params, opt_state=opt_state, key=key, diverged=diverged)


def _llc_batch_loss(s: Setup, params, order, n_train, key):
    if s.llc_batch == 0:
        return full_batch_loss(s, params, order, n_train)
    # Where some run has no more than llc_batch pairs, each run takes min(llc_batch, n_train).
    return minibatch_loss(s, params, order, n_train, key, s.llc_batch, at_most_n_train=s.llc_batch >= s.static.n_train_min)


def _loss_on(s: Setup, params, key, size: int, order, n_train):
    """The training loss on `size` distinct training pairs drawn with `key` (all of the run's where
    it has no more, or `size` is 0): the curvature measures' loss."""
    if size == 0 or size >= s.static.n_train_max:
        return full_batch_loss(s, params, order, n_train)
    return minibatch_loss(s, params, order, n_train, key, size, at_most_n_train=size >= s.static.n_train_min)


def evaluate(s: Setup, state: RunState, hp: Hparams, eval_index, gates=None) -> tuple[jax.Array, jax.Array]:
    """One run's metrics on the full table (float32[len(METRICS)], NaN once diverged) and its
    embedding's Fourier spectrum. `gates`: cadence -> whether some run of the device is due (vmapped
    runs), or None (the run's own `eval_index` decides)."""
    logits = s.model.apply(state.params, s.inputs)
    loss = _loss(s, logits, s.targets)
    correct = (logits.argmax(-1) == s.targets).astype(jnp.float32)
    tr = state.is_train.astype(jnp.float32)
    va = 1.0 - tr
    train_loss = (loss * tr).sum() / tr.sum()
    m = jnp.stack([
        train_loss, (correct * tr).sum() / tr.sum(),
        (loss * va).sum() / va.sum(), (correct * va).sum() / va.sum(),
        optax.tree.norm(state.params),
    ])
    # The measures' randomness depends on the run and the evaluation only: resumable, and
    # independent of how steps are cut into chunks. Training's own key is left alone.
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(hp.seed), hp.data_seed), eval_index)
    batch_loss = lambda p, k: _llc_batch_loss(s, p, state.order, hp.n_train, k)  # noqa: E731
    loss_on = partial(_loss_on, s, order=state.order, n_train=hp.n_train)
    features = (lambda p: s.model.features(p, s.inputs)) if s.model.features is not None else None  # noqa: E731
    values, energies = s.measure(measures.Inputs(state.params, state.params0, logits, state.is_train,
                                                 train_loss, batch_loss, key, eval_index, state.opt_state, loss_on,
                                                 features, gates))
    m = jnp.concatenate([m.astype(jnp.float32), values])  # curves are float32 whatever the precision
    ended = state.diverged | state.retired if s.static.train.stop_after_grokking else state.diverged
    return jnp.where(ended, jnp.nan, m), energies  # a diverged (or retired) run's curve stops here


def _count_streak(s: Setup, state: RunState, metrics) -> RunState:
    """After an evaluation: the run's streak at or above the threshold, and whether it has lasted
    stop_after_grokking steps (grokking.retire is the same rule, read from the curves on the host)."""
    ok = metrics[METRICS.index("val_acc")] >= s.static.grokking.threshold  # NaN: not ok
    streak = jnp.where(ok, state.streak + 1, 0).astype(jnp.int32)
    need = -(-s.static.train.stop_after_grokking // s.static.train.eval_every)  # evaluations after t_val
    return state._replace(streak=streak, retired=state.retired | (streak > need))


def chunk_run(s: Setup, n_evals: int, state: RunState, hp: Hparams, first_eval, gates=None):
    """`n_evals` evaluations of one run, each after `eval_every` steps: (state, metrics[n_evals,
    len(METRICS)]). `first_eval`: the evaluations the run has done; `gates`: see evaluate (each
    bool[n_evals])."""
    TRACES["chunk"] += 1  # runs at trace time only
    cfg = s.static.train

    def block(state, xs):
        eval_index, gate = xs
        state = jax.lax.fori_loop(0, cfg.eval_every, lambda _, st: train_step(s, st, hp), state)
        metrics, energies = evaluate(s, state, hp, eval_index, gate)
        state = state._replace(energies=energies) if s.n_freqs else state
        return (_count_streak(s, state, metrics) if cfg.stop_after_grokking else state), metrics

    if cfg.stop_after_grokking and not s.vectorize:
        # One run at a time (CPU): a retired run skips its steps and evaluations, a real branch, so
        # that retiring saves time even where no pending run takes its slot. (Vmapped, a per-run
        # branch would compute both sides: there the saving is the refilled slot.)
        trained = block

        def block(state, xs):
            # NaN that varies over runs, as inside shard_map the other branch's metrics do
            nan = jnp.where(state.retired, jnp.full(len(METRICS), jnp.nan, jnp.float32), jnp.nan)
            return jax.lax.cond(state.retired, lambda st: (st, nan), lambda st: trained(st, xs), state)

    with matmul_precision(cfg.precision):
        return jax.lax.scan(block, state, (first_eval + jnp.arange(n_evals, dtype=jnp.int32), gates))
