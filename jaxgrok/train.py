"""One compiled program trains every run of a sweep: vmap over a run axis, sharded over devices.

`make_program(static)` does all Python-side setup once (the task table, the model, the optimizer
recipe, the progress measures) and returns `init(hparams) -> state` and `chunk(state, hparams,
first_eval) -> (state, metrics)`, both jitted once. A chunk is `lax.scan` over evaluations, each
`eval_every` optimizer steps followed by one evaluation on the full table: losses, accuracies and the
measures of jaxgrok/measures; nothing leaves the device inside a chunk. Swept values (seeds, weight
decay, learning rate, init scale, train fraction) are *arguments* with a leading run axis; whatever
changes shapes stays in `static` and decides the compile.
"""

from __future__ import annotations

import collections
import os
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxgrok import grokfast, measures, models, tasks
from jaxgrok.sweep import SEED_AXES, Static, Sweep, SweepError, axes

CURVES = ("train_loss", "train_acc", "val_loss", "val_acc", "weight_norm")
METRICS = CURVES + measures.COLUMNS  # one row of a chunk's metrics per evaluation
TRACES: collections.Counter = collections.Counter()  # trace counts, for the no-recompile test


NOISE_STREAM = 0x6E6F6973  # folded into noise_seed's key: its draws are independent of any model seed's


# The swept values of each run, every field with a leading run axis: one per axis of the sweep
# (sweep/axes.py, in its table's order), seeds int32, the rest float32, train_fraction as n_train
# (int32, the training pairs counted on the host).
Hparams = NamedTuple("Hparams", [(a.arg, jax.Array) for a in axes.TABLE])


class RunState(NamedTuple):
    params: dict
    params0: dict  # the initial parameters, for dist_from_init
    opt_state: optax.OptState
    order: jax.Array  # int32[N]: a permutation of the pairs; the first n_train are for training
    is_train: jax.Array  # bool[N]
    key: jax.Array  # minibatch sampling
    diverged: jax.Array  # bool: loss or gradient went non-finite; the run is frozen since
    energies: jax.Array  # float32[K]: the embedding's Fourier spectrum at the latest evaluation (K = 0: one unused value)


class Program(NamedTuple):
    init: Callable  # Hparams -> RunState
    chunk: Callable  # (RunState, Hparams, first_eval) -> (RunState, metrics float32[runs, evals, len(METRICS)])
    model: models.Model
    table: tasks.Table
    sharding: NamedSharding
    evals_per_chunk: int


def hparams_for(sweep: Sweep, index: np.ndarray) -> Hparams:
    """The host-side Hparams of the runs `index` of a sweep."""
    return Hparams(**sweep.program_values(index))


# ---------------------------------------------------------------------------------------------
# Precision


def matmul_precision(precision: str):
    """The matmul precision of float32 operands while the program is traced. "float32" asks for
    true float32 explicitly: by default JAX lets recent GPUs use TF32 (and TPUs bfloat16 passes)."""
    return jax.default_matmul_precision("tensorfloat32" if precision == "tf32" else "float32")


def with_precision(model: models.Model, precision: str) -> models.Model:
    """The model computing in `precision`: for bfloat16, the forward pass (and so its backward pass)
    on bfloat16 copies of the float32 parameters, the logits back in float32 for the losses. The
    gradient reaches the float32 parameters through the cast; the optimizer never sees bfloat16."""
    if precision != "bfloat16":
        return model

    def apply(params, pairs):
        return model.apply(jax.tree.map(lambda w: w.astype(jnp.bfloat16), params), pairs).astype(jnp.float32)

    return model._replace(apply=apply)


def abstract_inputs(program: "Program", n_runs: int) -> tuple[Hparams, RunState]:
    """The shapes, dtypes and shardings of a batch's Hparams (those of `hparams_for`) and RunState:
    enough to lower and compile both programs ahead, with nothing allocated."""
    sd = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=program.sharding)  # noqa: E731
    hp = Hparams(**{f: sd((n_runs,), np.int32 if f in SEED_AXES + ("n_train",) else np.float32) for f in Hparams._fields})
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
    table = tasks.make_table(static.task)
    model = with_precision(models.build(static.model, table.n_symbols, table.n_classes, table.inputs.shape[1]),
                           static.train.precision)
    inputs, targets = jnp.asarray(table.inputs), jnp.asarray(table.targets)
    n_pairs, n_train_max, cfg = len(table.targets), static.n_train_max, static.train
    n_evals = evals or evals_per_chunk(static)

    def per_example_loss(logits, labels):
        if static.loss == "mse":  # against one-hot targets, averaged over classes (torch's MSELoss)
            return ((logits - jax.nn.one_hot(labels, table.n_classes)) ** 2).mean(-1)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)

    def optimizer(hp: Hparams):
        # Built inside the vmapped function, so each run closes over its own traced values.
        # optax's linear_schedule over 0 steps stays at its initial value (0) forever: no warm-up
        # must mean the full learning rate from the first step.
        schedule = optax.linear_schedule(0.0, hp.learning_rate, cfg.warmup_steps) if cfg.warmup_steps else hp.learning_rate
        if cfg.optimizer == "adam":  # torch.optim.Adam(weight_decay=...): L2 in the gradient
            opt = optax.chain(optax.add_decayed_weights(hp.weight_decay),
                              optax.adam(schedule, b1=cfg.beta1, b2=cfg.beta2))
        elif cfg.optimizer == "sgd":  # torch.optim.SGD(weight_decay=...), no momentum
            opt = optax.chain(optax.add_decayed_weights(hp.weight_decay), optax.sgd(schedule))
        else:
            opt = optax.adamw(schedule, b1=cfg.beta1, b2=cfg.beta2, weight_decay=hp.weight_decay)
        # Grokfast filters the loss gradient before the optimizer sees it (as in its torch code, where
        # the filter rewrites p.grad before optimizer.step). In the program only when a run uses it.
        return optax.chain(grokfast.ema(hp.grokfast_alpha, hp.grokfast_lambda), opt) if static.grokfast else opt

    n_freqs = measures.n_frequencies(static, table.n_symbols)

    def init_run(hp: Hparams) -> RunState:
        with matmul_precision(cfg.precision):
            return _init_run(hp)

    def _init_run(hp: Hparams) -> RunState:
        k_init, _ = jax.random.split(jax.random.key(hp.seed))
        _, k_batch = jax.random.split(jax.random.key(hp.batch_seed))  # = the model seed's by default
        # A perturbation ε·(an independent draw of the same initializer): relative to each tensor's own
        # scale. ε = 0 leaves the weights untouched, bit for bit.
        noise = model.init(jax.random.fold_in(jax.random.key(hp.noise_seed), NOISE_STREAM))
        params = jax.tree.map(lambda w, z: jnp.where(hp.init_noise > 0, w + hp.init_noise * z, w) * hp.init_scale,
                              model.init(k_init), noise)
        order = jax.random.permutation(jax.random.key(hp.data_seed), n_pairs).astype(jnp.int32)
        is_train = jnp.zeros(n_pairs, bool).at[order].set(jnp.arange(n_pairs) < hp.n_train)
        return RunState(params, params, optimizer(hp).init(params), order, is_train, k_batch, jnp.array(False),
                        jnp.zeros(max(n_freqs, 1), jnp.float32))  # orbax saves no zero-size arrays

    def full_batch_loss(params, order, n_train):
        """The mean loss over the run's n_train training pairs, padded to the sweep's largest
        training set: the padded length decides how the sum rounds, so it is part of the run hash
        (sweep.py) wherever it exceeds the run's own."""
        idx, weight = order[:n_train_max], (jnp.arange(n_train_max) < n_train).astype(jnp.float32)
        return (weight * per_example_loss(model.apply(params, inputs[idx]), targets[idx])).sum() / weight.sum()

    def minibatch_loss(params, order, n_train, key, size: int, at_most_n_train: bool = False):
        """The mean loss over `size` distinct training pairs drawn with `key`; with
        `at_most_n_train`, over all of them where the run has fewer than `size` (the draws past its
        training set weigh 0)."""
        noise = jax.random.uniform(key, (n_train_max,)) + (jnp.arange(n_train_max) >= n_train)
        picked, idx = jax.lax.top_k(-noise, size)
        loss = per_example_loss(model.apply(params, inputs[order[idx]]), targets[order[idx]])
        if not at_most_n_train:
            return loss.mean()
        weight = (picked > -1).astype(jnp.float32)  # a padded pair's noise is ≥ 1
        return (weight * loss).sum() / weight.sum()

    def train_step(state: RunState, hp: Hparams) -> RunState:
        key, sub = jax.random.split(state.key) if cfg.batch_size else (state.key, None)
        if cfg.batch_size:
            loss, grads = jax.value_and_grad(minibatch_loss)(state.params, state.order, hp.n_train, sub, cfg.batch_size)
        else:
            loss, grads = jax.value_and_grad(full_batch_loss)(state.params, state.order, hp.n_train)
        updates, opt_state = optimizer(hp).update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # A run whose loss or gradient is non-finite keeps its last finite weights from then on.
        diverged = state.diverged | ~(jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads)))
        keep = lambda new, old: jnp.where(diverged, old, new)  # noqa: E731
        params = jax.tree.map(keep, params, state.params)
        opt_state = jax.tree.map(keep, opt_state, state.opt_state)
        return state._replace(params=params, opt_state=opt_state, key=key, diverged=diverged)

    devices = list(devices if devices is not None else jax.devices())
    if vectorize is None:
        vectorize = devices[0].platform != "cpu"
    measure = measures.build(static, model, table, per_example_loss, vectorize)
    m_cfg = static.measures
    # The LLC's minibatches: llc_batch_size pairs, or the run's whole training set where that is not
    # larger (decided per run, not by the sweep's smallest training set).
    llc_batch = m_cfg.llc_batch_size if m_cfg.llc_batch_size < static.n_train_max else 0

    def llc_batch_loss(params, order, n_train, key):
        if llc_batch == 0:
            return full_batch_loss(params, order, n_train)
        # Where some run has no more than llc_batch pairs, each run takes min(llc_batch, n_train).
        return minibatch_loss(params, order, n_train, key, llc_batch, at_most_n_train=llc_batch >= static.n_train_min)

    def evaluate(state: RunState, hp: Hparams, eval_index) -> tuple[jax.Array, jax.Array]:
        logits = model.apply(state.params, inputs)
        loss = per_example_loss(logits, targets)
        correct = (logits.argmax(-1) == targets).astype(jnp.float32)
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
        batch_loss = lambda p, k: llc_batch_loss(p, state.order, hp.n_train, k)  # noqa: E731
        values, energies = measure(measures.Inputs(state.params, state.params0, logits, state.is_train,
                                                   train_loss, batch_loss, key, eval_index))
        m = jnp.concatenate([m, values])
        return jnp.where(state.diverged, jnp.nan, m), energies  # a diverged run's curve stops here

    def chunk_run(state: RunState, hp: Hparams, first_eval):
        TRACES["chunk"] += 1  # runs at trace time only
        with matmul_precision(cfg.precision):
            return _chunk_run(state, hp, first_eval)

    def _chunk_run(state: RunState, hp: Hparams, first_eval):

        def block(state, eval_index):
            state = jax.lax.fori_loop(0, cfg.eval_every, lambda _, s: train_step(s, hp), state)
            metrics, energies = evaluate(state, hp, eval_index)
            return (state._replace(energies=energies) if n_freqs else state), metrics

        return jax.lax.scan(block, state, first_eval + jnp.arange(n_evals, dtype=jnp.int32))

    mesh = Mesh(np.asarray(devices), ("runs",))
    runs = NamedSharding(mesh, P("runs"))
    if vectorize:  # accelerators: all of a device's runs in one wide kernel
        per_device = jax.vmap(chunk_run, in_axes=(0, 0, None))
    else:
        # CPU: one run after another. XLA's batched CPU kernels (and the scatter-adds that batched
        # gathers turn into) are slower per run than unbatched ones; each core is a device instead.
        per_device = lambda state, hp, e: jax.lax.map(lambda a: chunk_run(*a, e), (state, hp))  # noqa: E731
    # Each device trains its own shard of the run axis; nothing crosses devices. The evaluation
    # counter `first_eval` is one scalar for all runs (replicated).
    sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P("runs"), P("runs"), P()), out_specs=P("runs"))
    init = jax.jit(jax.vmap(init_run), in_shardings=runs, out_shardings=runs)
    replicated = NamedSharding(mesh, P())
    chunk = jax.jit(sharded, in_shardings=(runs, runs, replicated), out_shardings=(runs, runs), donate_argnums=0)
    return Program(init, chunk, model, table, runs, n_evals)


# ---------------------------------------------------------------------------------------------
# Memory: how many runs go into one batch


def bytes_per_run(static: Static, program: Program) -> int:
    """A generous estimate of one run's device memory: params, initial params, AdamW moments,
    gradients and update (6×), the split, and the activations of a forward and backward pass (3×)
    over the larger of the training batch and the full evaluation table; with the LLC, each chain's
    weights, gradient and noise (3× params) and its minibatch's activations."""
    n_params = models.n_params(jax.eval_shape(program.model.init, jax.random.key(0)))
    n_pairs = len(program.table.targets)
    activations = program.model.activations(max(n_pairs, static.n_train_max))
    m = static.measures
    if m.llc:
        batch = m.llc_batch_size if 0 < m.llc_batch_size < static.n_train_min else static.n_train_max
        activations += m.llc_chains * (3 * n_params + 3 * program.model.activations(batch))
    return 4 * (6 * n_params + 3 * activations) + 8 * n_pairs


def flops_per_step(static: Static) -> float:
    """Analytic matmul FLOPs of one run's training step (the forward pass ×3, for the backward pass,
    over its batch) plus its evaluation on the full table amortised over `eval_every` steps."""
    size = tasks.sizes(static.task)
    model = models.build(static.model, size.n_symbols, size.n_classes, size.n_inputs)
    batch = static.train.batch_size or static.n_train_max
    return 3 * model.forward_flops(batch) + model.forward_flops(size.n_pairs) / static.train.eval_every


class TooLarge(SweepError):
    """Not even one run per device fits in the device's memory budget; the message is one line."""


def least_bytes_per_run(static: Static) -> int:
    """What one run needs at the very least, counted without building anything: its parameters,
    initial parameters and two AdamW moments (16 bytes a parameter), and the logits of an
    evaluation over the whole table."""
    size = tasks.sizes(static.task)
    model = models.build(static.model, size.n_symbols, size.n_classes, size.n_inputs)
    n_params = models.n_params(jax.eval_shape(model.init, jax.random.key(0)))
    return 16 * n_params + 4 * size.n_pairs * size.n_classes


def check_fits(sweep: Sweep, budget: int) -> None:
    """Refuse, before anything is built or written, a sweep of which not one run can fit."""
    least = least_bytes_per_run(sweep.static)
    if least > budget:
        raise TooLarge(f"{sweep.path}: one run needs at least {human_bytes(least)} (parameters, optimizer state and "
                       f"the evaluation's logits), more than the budget of {human_bytes(budget)} per device")


def memory_budget() -> int:
    """Bytes of one device that a batch may use: $JAXGROK_MEMORY_BUDGET if set (a number of bytes:
    to share a GPU, or to test the fallback on CPU), else 85% of what the accelerator reports as its
    limit, or an even share of 40% of host RAM among the CPU devices."""
    if (forced := os.environ.get("JAXGROK_MEMORY_BUDGET")) is not None:
        try:
            value = float(forced)
        except ValueError:
            value = float("nan")
        if not value >= 1:  # also refuses nan
            raise SweepError(f"JAXGROK_MEMORY_BUDGET: must be a number of bytes ≥ 1, got {forced!r}")
        return int(value)
    device = jax.local_devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] * 0.85)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(ram * 0.4) // max(1, len(jax.local_devices()))


def runs_per_batch(static: Static, program: Program, n_runs: int, budget: int) -> int:
    """The first guess at the runs trained together, from the analytic estimate: all of them if
    they fit, else what fits; a multiple of the devices. (The engine then corrects it with what XLA
    says the compiled program needs.)"""
    n_dev = program.sharding.mesh.size
    if static.train.max_runs_per_batch:
        per_device = max(1, static.train.max_runs_per_batch // n_dev)
    else:
        per_device = max(1, budget // bytes_per_run(static, program))
    per_device = min(per_device, -(-n_runs // n_dev))
    return per_device * n_dev


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def batch_bytes(init, chunk, metrics_bytes: int) -> int | None:
    """Bytes one device needs for a batch, from XLA's analysis of the compiled programs: arguments,
    outputs (less what donation aliases) and temporaries of the larger of `init` and `chunk`, plus
    `metrics_bytes` for the next chunk's metrics, which are allocated before this chunk's are read.
    None where the backend does not report it."""
    needs = []
    for compiled in (init, chunk):
        try:
            m = compiled.memory_analysis()
        except (NotImplementedError, RuntimeError):
            return None
        if m is None:
            return None
        needs.append(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                     + m.temp_size_in_bytes + m.generated_code_size_in_bytes)
    return max(needs) + metrics_bytes
