"""Progress measures, computed for every run at every evaluation inside the compiled program.

Every column of curves.parquet is declared once, in this module: the training curves (`TRAINING`)
and the progress measures (`MEASURES`). A measure is one entry: the `[measures]` switch that turns it
on, the columns it fills (name, Parquet type, label on a figure, early-warning event rule), the pure
function that computes them (its docstring names its paper), what it needs of the task, and its
cadence. The compiled program (train.py), the curves schema (results.py), early warning
(analysis/warning.py) and the figures (report/) all read these tables; nothing is read by position.
Adding a measure: its function (in fourier.py, geometry.py, llc.py or a module of its own) and one
entry in MEASURES. A measure that is off, that does not apply to the task, or that is not due at an
evaluation yields NaN (null in curves.parquet).

The tables load without JAX (the analysis and the report read them and never start it): the
functions that compute import their modules when the program is built.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
    import jax


class Rule(enum.Enum):
    """How early warning finds a measure's event; the value is the rule in a few words, as
    events.parquet and lead_times.parquet name it (analysis/warning.py says it whole)."""

    PEAK = "peak"
    HALF_WAY = "half-way, first → last"
    HALF_WAY_UP_FROM_T_TRAIN = "half-way up from t_train"


class Needs(enum.Flag):
    """What a measure needs of the task and the model, beyond the parameters and the logits."""

    NOTHING = 0
    RESIDUES = enum.auto()  # a modular task (residues 0..p-1) and a model with an embedding of them
    SUM_TASK = enum.auto()  # an answer that is the residue a ± b (x+y, x-y)
    FEATURES = enum.auto()  # a model with penultimate features and an output weight (Model.features)


@dataclass(frozen=True)
class Column:
    """One column of curves.parquet."""

    name: str
    label: str | None  # its name on a figure; None: not drawn, not ranked (a spread, a count of a count)
    integer: bool = False  # int32 in curves.parquet (float32 otherwise; float32 in the program either way)
    event: Rule | None = None  # how early warning finds when it moves; None: no event
    log_scaled: bool = False  # drawn on a log axis where its values span decades
    progress: bool = True  # a progress measure early warning ranks runs by (not the raw accuracies)


class Eval(NamedTuple):
    """What a measure may read about one run at one evaluation."""

    params: dict
    params0: dict  # the initial parameters (after init_scale)
    logits: jax.Array  # [N, C] on the full table
    is_train: jax.Array  # bool[N]
    train_loss: jax.Array  # full-batch training loss at params
    batch_loss: Callable  # (params, key) -> loss on a minibatch of the run's training pairs
    key: jax.Array  # randomness for this run and evaluation (the LLC's SGLD)
    eval_index: jax.Array  # int32: the evaluation's number in the run (0 = first)
    opt_state: object = None  # the run's optimizer state (Adam's second moments, for precond_sharpness)
    loss_on: Callable | None = None  # (params, key, size) -> training loss on `size` pairs (0: all of them)
    # params -> (h [N, D], W_out): the model's penultimate features on the full table and its output
    # weight (Model.features; None: the model has none)
    features: Callable | None = None
    # cadence -> bool: some run of the device is due (vmapped runs: one real branch for all); None:
    # the run's own eval_index decides
    gates: dict | None = None


Inputs = Eval  # the name train.py passes them under


class Context(NamedTuple):
    """What the measures of one sweep share: its [measures] table, the task's residue basis and
    targets, the training loss, and, at each evaluation, the embedding and its spectrum."""

    cfg: object  # the sweep's MeasuresConfig
    basis: jax.Array | None  # the Fourier basis over the residues (None: no measure needs it)
    targets: jax.Array
    loss: Callable  # (logits, targets) -> per-example loss
    vectorize: bool  # runs vmapped (then the LLC's chains are too)
    adam_beta2: float | None = None  # the recipe's β₂ where it is Adam's (None: SGD, no preconditioner)
    loss_name: str = "cross_entropy"  # the training loss by name (closed forms of its Hessian in the logits)
    embedding: jax.Array | None = None
    energy: jax.Array | None = None


def _dist_from_init(x: Eval, c: Context):
    from jaxgrok.measures import geometry

    return (geometry.dist_from_init(x.params, x.params0),)


def _spectrum(x: Eval, c: Context):
    from jaxgrok.measures import fourier

    return fourier.spectrum_measures(c.energy, c.cfg.key_freq_share)


def _circularity(x: Eval, c: Context):
    from jaxgrok.measures import geometry

    return (geometry.circularity(c.embedding, c.basis),)


def _restricted(x: Eval, c: Context):
    import jax

    from jaxgrok.measures import fourier

    k = min(c.cfg.restricted_freqs, c.energy.shape[0])
    key_idx = jax.lax.top_k(c.energy, k)[1]
    return fourier.restricted_losses(x.logits, c.targets, x.is_train, key_idx, c.basis, c.loss)


def _numerics(x: Eval, c: Context):
    from jaxgrok.measures import numerics

    return (numerics.softmax_collapse(x.logits, x.is_train),
            numerics.zero_loss_frac(c.loss(x.logits, c.targets), x.is_train),
            numerics.nlm_cosine(x.logits, c.targets, x.is_train, c.loss))


def _flatness(x: Eval, c: Context):
    from jaxgrok.measures import flatness

    h, w_out = x.features(x.params)
    return (flatness.relative_flatness(h, w_out, x.logits, c.targets, x.is_train, c.loss_name, c.loss),)


CURVATURE_STREAM = 0x63757276  # folded into the evaluation's key: draws independent of the LLC's


def _curvature(x: Eval, c: Context):
    import jax
    import jax.numpy as jnp

    from jaxgrok.measures import curvature

    m = c.cfg
    k_batch, k_lanczos, k_probes, k_pre = jax.random.split(jax.random.fold_in(x.key, CURVATURE_STREAM), 4)
    hessian = partial(curvature.hvp, lambda p: x.loss_on(p, k_batch, m.curvature_batch_size), x.params)
    lam_max, lam_min = curvature.lanczos_extremes(hessian, x.params, k_lanczos, m.curvature_iters)
    trace, _ = curvature.hutchinson_trace(hessian, x.params, k_probes, m.curvature_probes)
    if c.adam_beta2 is None:  # plain gradient descent has no preconditioner
        return lam_max, lam_min, trace, jnp.full_like(lam_max, jnp.nan)
    # Adam's step is P⁻¹·m̂ with P = diag(√v̂ + ε): its stability is that of P⁻¹H (Cohen et al. 2022).
    adam = curvature.adam_state(x.opt_state)
    correction = 1 - jnp.power(jnp.float32(c.adam_beta2), adam.count.astype(jnp.float32))
    diag = jax.tree.map(lambda nu: jnp.sqrt(nu / correction) + 1e-8, adam.nu)  # optax's eps
    pre, _ = curvature.lanczos_extremes(curvature.precond_matvec(hessian, diag), x.params, k_pre, m.curvature_iters)
    return lam_max, lam_min, trace, pre


def _llc(x: Eval, c: Context):
    from jaxgrok.measures import llc

    m = c.cfg
    return llc.estimate(x.batch_loss, x.params, x.train_loss, x.key, epsilon=m.llc_epsilon, gamma=m.llc_gamma,
                        nbeta=m.llc_nbeta, chains=m.llc_chains, draws=m.llc_draws, burn_in=m.llc_burn_in,
                        vectorize=c.vectorize)


@dataclass(frozen=True)
class Option:
    """A `[measures]` key that sets how a measure is taken."""

    name: str
    type: type
    default: object
    check: tuple[Callable, str]  # (predicate, what the value must be)


@dataclass(frozen=True)
class Measure:
    """One progress measure: `compute(eval, context)` returns one value per column."""

    switch: str  # its [measures] key: true or false
    columns: tuple[Column, ...]
    compute: Callable[[Eval, Context], tuple]
    needs: Needs = Needs.NOTHING
    every: str | None = None  # the option giving its cadence in evaluations (None: every evaluation)
    on: bool = True  # on by default (where it applies)
    options: tuple[Option, ...] = ()  # its other [measures] keys, after its switch
    # Added after the first results were written: its keys are left out of the run hash at their
    # defaults (sweep/hashing.py), and parts written before it lack its columns (null on merging).
    later: bool = False


# The columns of every run's training curves, in curves.parquet's order.
TRAINING = (
    Column("train_loss", "training loss", progress=False),
    Column("train_acc", "training accuracy", progress=False),
    Column("val_loss", "validation loss", progress=False),
    Column("val_acc", "validation accuracy", progress=False),
    Column("weight_norm", "weight norm ‖θ‖", event=Rule.PEAK),  # Omnigrok: rises, then falls
)

# The progress measures, in curves.parquet's order.
MEASURES = (
    Measure("dist_from_init", (Column("dist_from_init", "‖θ − θ₀‖"),),
            _dist_from_init),
    Measure("fourier", (Column("fourier_gini", "Fourier Gini", event=Rule.HALF_WAY),
                        Column("n_key_freqs", "key frequencies", integer=True),
                        Column("top_freq_share", "top frequency's share")),
            _spectrum, needs=Needs.RESIDUES,
            options=(Option("key_freq_share", float, 0.9, (lambda v: 0 < v <= 1, "must be in (0, 1]")),)),
    Measure("circularity", (Column("circularity", "circularity", event=Rule.HALF_WAY),),
            _circularity, needs=Needs.RESIDUES),
    Measure("restricted_loss", (Column("restricted_loss", "restricted loss", log_scaled=True),
                                Column("excluded_loss", "excluded loss", event=Rule.HALF_WAY_UP_FROM_T_TRAIN,
                                       log_scaled=True)),
            _restricted, needs=Needs.RESIDUES | Needs.SUM_TASK,
            options=(Option("restricted_freqs", int, 5, (lambda v: v >= 1, "must be ≥ 1")),)),
    # Off unless asked: it costs chains × (burn_in + draws) minibatch gradient steps per estimate.
    Measure("llc", (Column("llc", "LLC (SGLD)", event=Rule.PEAK), Column("llc_std", None, progress=False)),
            _llc, every="llc_every", on=False, options=(
                Option("llc_every", int, 30, (lambda v: v >= 1, "must be ≥ 1 (evaluations between estimates)")),
                Option("llc_epsilon", float, 3e-3, (lambda v: 0 < v < 1, "must be in (0, 1)")),
                Option("llc_gamma", float, 5.0, (lambda v: v >= 0, "must be ≥ 0")),
                Option("llc_nbeta", float, 2.0, (lambda v: v > 0, "must be > 0")),
                Option("llc_chains", int, 4, (lambda v: 1 <= v <= 64, "must be 1 to 64")),
                Option("llc_draws", int, 50, (lambda v: 1 <= v <= 100_000, "must be 1 to 100000")),
                Option("llc_burn_in", int, 0, (lambda v: 0 <= v <= 100_000, "must be 0 to 100000")),
                Option("llc_batch_size", int, 128, (lambda v: v >= 0, "must be ≥ 0 (0 = the whole training set)")))),
    # Prieto et al. 2025: the softmax rounding to one, the training losses at exactly 0, and how far
    # the update only scales the logits. Cheap (the logits are there); off unless asked.
    Measure("numerics", (Column("softmax_collapse", "softmax collapse (share of training pairs)"),
                         Column("zero_loss_frac", "zero-loss share of training pairs"),
                         Column("nlm_cosine", "cos(−∇_z L, z − z̄)")),
            _numerics, on=False, later=True),
    # The training loss's curvature (is the memorising solution flat or sharp?): off unless asked; at
    # its cadence it costs about 2·iters + probes Hessian-vector products (each ~2 gradients).
    Measure("curvature", (Column("hessian_max", "Hessian λ_max", event=Rule.PEAK, log_scaled=True),
                          Column("hessian_min", "Hessian λ_min"),
                          Column("hessian_trace", "Hessian trace", event=Rule.PEAK, log_scaled=True),
                          Column("precond_sharpness", "λ_max of P⁻¹H (Adam)")),
            _curvature, every="curvature_every", on=False, later=True, options=(
                Option("curvature_every", int, 10, (lambda v: v >= 1, "must be ≥ 1 (evaluations between estimates)")),
                Option("curvature_iters", int, 20, (lambda v: 2 <= v <= 500, "must be 2 to 500 (Lanczos steps)")),
                Option("curvature_probes", int, 16, (lambda v: 1 <= v <= 4096, "must be 1 to 4096 (Hutchinson probes)")),
                Option("curvature_batch_size", int, 0, (lambda v: v >= 0, "must be ≥ 0 (0 = the whole training set)")))),
    # Petzka et al. 2021, Han et al. 2025: the output layer's flatness, invariant to scaling a layer into
    # the next (the Hessian's trace is not). Cheap (one forward pass to the features, closed forms in
    # the logits); off unless asked; needs Model.features.
    Measure("flatness", (Column("relative_flatness", "relative flatness ‖W‖²·Tr∇²_W L"),),
            _flatness, needs=Needs.FEATURES, on=False, later=True),
)

MEASURE_COLUMNS = tuple(col for m in MEASURES for col in m.columns)
COLUMNS = tuple(col.name for col in MEASURE_COLUMNS)  # the measures' columns of curves.parquet
CURVES = tuple(col.name for col in TRAINING)  # the training curves' columns
METRICS = CURVES + COLUMNS  # one row of a chunk's metrics per evaluation, in this order
BY_NAME = {col.name: col for col in TRAINING + MEASURE_COLUMNS}
PROGRESS = tuple(col.name for col in TRAINING + MEASURE_COLUMNS if col.progress)  # ranked by early warning
EVENTS = {col.name: col.event for col in TRAINING + MEASURE_COLUMNS if col.event}
LABELS = {col.name: col.label for col in TRAINING + MEASURE_COLUMNS if col.label and col.progress}  # drawn
# The [measures] keys of measures added later, at their defaults, and the columns older parts lack.
LATER_KEYS = {k: v for m in MEASURES if m.later for k, v in ((m.switch, m.on), *((o.name, o.default) for o in m.options))}
LATER_COLUMNS = tuple(col.name for m in MEASURES if m.later for col in m.columns)


def n_frequencies(static, n_symbols: int) -> int:
    """K, the length of the spectrum a run carries (0 when no measure that needs the residues is on)."""
    on = any(getattr(static.measures, m.switch) for m in MEASURES if m.needs & Needs.RESIDUES)
    return n_symbols // 2 if on else 0


def due(eval_index, every: int):
    """The first evaluation, then every `every`-th."""
    return (eval_index == 0) | ((eval_index + 1) % every == 0)


def cadences(static) -> tuple[int, ...]:
    """The cadences (in evaluations) of the measures that are on and taken at their own."""
    cfg = static.measures
    return tuple(sorted({getattr(cfg, m.every) for m in MEASURES if m.every and getattr(cfg, m.switch)}))


def _at_cadence(measure: Measure, every: int, x: Eval, c: Context):
    # A real branch: the evaluations that are not due skip the computation. Under vmap the branch is
    # taken where some run is due (x.gates), and each run keeps its value only where it is itself.
    # NaN shaped like a per-run value (inside shard_map it must vary over runs too).
    import jax
    import jax.numpy as jnp

    nan = tuple(jnp.full_like(x.train_loss, jnp.nan) for _ in measure.columns)
    own = due(x.eval_index, every)
    if x.gates is None:
        # Through where, a value that is the same for every run (llc_std of one chain) varies over
        # runs as the NaN does: inside shard_map the branches must agree on that too.
        return jax.lax.cond(own, lambda: tuple(jnp.where(own, v, n) for v, n in zip(measure.compute(x, c), nan, strict=True)),
                            lambda: nan)
    values = jax.lax.cond(x.gates[every], lambda: tuple(measure.compute(x, c)), lambda: nan)
    return tuple(jnp.where(own, v, n) for v, n in zip(values, nan, strict=True))


def build(static, model, table, loss: Callable, vectorize: bool = True) -> Callable:
    """`measure(eval) -> (float32[len(COLUMNS)], energies float32[K])` for a sweep's static config.
    `loss(logits, targets) -> per-example loss` is the sweep's training loss; `vectorize`: whether
    the runs are vmapped (then the LLC's chains are too)."""
    import jax.numpy as jnp

    from jaxgrok.measures import fourier

    cfg = static.measures
    on = [m for m in MEASURES if getattr(cfg, m.switch)]
    K = n_frequencies(static, table.n_symbols)
    adam = static.train.optimizer in ("adamw", "adam")
    ctx = Context(cfg, jnp.asarray(fourier.basis(table.n_symbols)) if K else None, jnp.asarray(table.targets),
                  loss, vectorize, static.train.beta2 if adam else None, static.loss)
    nan = jnp.float32(jnp.nan)

    def measure(x: Eval):
        out = dict.fromkeys(COLUMNS, nan)
        energy = jnp.zeros(0, jnp.float32)
        c = ctx
        if K:
            emb = model.embedding(x.params)
            energy = fourier.energies(emb, ctx.basis).astype(jnp.float32)  # kept in float32 whatever the precision
            c = ctx._replace(embedding=emb, energy=energy)
        for m in on:
            values = _at_cadence(m, getattr(cfg, m.every), x, c) if m.every else m.compute(x, c)
            out |= {col.name: v for col, v in zip(m.columns, values, strict=True)}
        return jnp.stack([jnp.asarray(out[name], jnp.float32) for name in COLUMNS]), energy

    return measure


def initial_key_share(energies0: np.ndarray, key_freqs: list[list[int]], p: int) -> tuple[np.ndarray, np.ndarray]:
    """Host side, the lottery ticket: per run, the share of its step-0 embedding's non-constant energy
    [runs, K] that lies in its final key frequencies (1..K), and what that share is expected to be
    for a random embedding, whose energy spreads evenly over the K frequencies (n_key / K; for even p
    the last frequency has one direction, not two: its weight is half)."""
    energies0 = np.asarray(energies0, np.float64)
    K = energies0.shape[1]
    weight = np.ones(K)
    if p % 2 == 0:  # the sine of k = p/2 vanishes on the residues: one direction there, not two
        weight[-1] = 0.5
    share, random = np.full(len(key_freqs), np.nan), np.full(len(key_freqs), np.nan)
    for i, keys in enumerate(key_freqs):
        total = energies0[i].sum()
        if keys and total > 0 and np.isfinite(total):
            idx = np.asarray(keys) - 1
            share[i] = energies0[i, idx].sum() / total
            random[i] = weight[idx].sum() / weight.sum()
    return share, random


def key_frequencies(energies: np.ndarray, share: float) -> list[list[int]]:
    """Host side: each run's final key frequencies from its energies [runs, K]."""
    from jaxgrok.measures import fourier

    return [fourier.key_frequencies(e, share) for e in energies]
