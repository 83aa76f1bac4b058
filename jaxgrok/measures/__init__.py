"""Progress measures, computed for every run at every evaluation inside the compiled program.

Each measure is a pure function of a run's parameters (and the task's table) with a docstring that
names its paper; `build` turns a sweep's `[measures]` table into one function that train.py calls in
its evaluation. Adding a measure: a function in one of these modules, its columns in COLUMNS, and one
line in `build`. A measure that is off, or that does not apply to the task, yields NaN (null in
curves.parquet); so does the LLC between its estimates.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxgrok.measures import fourier, geometry, llc

# Columns of curves.parquet, in this order; n_key_freqs is an integer column there.
COLUMNS = ("dist_from_init", "fourier_gini", "n_key_freqs", "top_freq_share", "circularity",
           "restricted_loss", "excluded_loss", "llc", "llc_std")


class Inputs(NamedTuple):
    """What a measure may read about one run at one evaluation."""

    params: dict
    params0: dict  # the initial parameters (after init_scale)
    logits: jax.Array  # [N, C] on the full table
    is_train: jax.Array  # bool[N]
    train_loss: jax.Array  # full-batch training loss at params
    batch_loss: Callable  # (params, key) -> loss on a minibatch of the run's training pairs
    key: jax.Array  # randomness for this run and evaluation (the LLC's SGLD)
    eval_index: jax.Array  # unbatched int32: the evaluation's number in the run (0 = first)


def n_frequencies(static, n_symbols: int) -> int:
    """K, the length of the spectrum a run carries (0 when the Fourier measures are off)."""
    m = static.measures
    return n_symbols // 2 if (m.fourier or m.circularity or m.restricted_loss) else 0


def build(static, model, table, loss: Callable, vectorize: bool = True) -> Callable:
    """`measure(inputs) -> (float32[len(COLUMNS)], energies float32[K])` for a sweep's static config.
    `loss(logits, targets) -> per-example loss` is the sweep's training loss; `vectorize`: whether
    the runs are vmapped (then the LLC's chains are too)."""
    m = static.measures
    K = n_frequencies(static, table.n_symbols)
    basis = jnp.asarray(fourier.basis(table.n_symbols)) if K else None
    targets = jnp.asarray(table.targets)
    nan = jnp.float32(jnp.nan)

    def measure(x: Inputs):
        out = dict.fromkeys(COLUMNS, nan)
        energy = jnp.zeros(0, jnp.float32)
        if m.dist_from_init:
            out["dist_from_init"] = geometry.dist_from_init(x.params, x.params0)
        if K:
            emb = model.embedding(x.params)
            energy = fourier.energies(emb, basis)
        if m.fourier:
            out["fourier_gini"], out["n_key_freqs"], out["top_freq_share"] = fourier.spectrum_measures(
                energy, m.key_freq_share)
        if m.circularity:
            out["circularity"] = geometry.circularity(emb, basis)
        if m.restricted_loss:
            key_idx = jax.lax.top_k(energy, min(m.restricted_freqs, K))[1]
            out["restricted_loss"], out["excluded_loss"] = fourier.restricted_losses(
                x.logits, targets, x.is_train, key_idx, basis, loss)
        if m.llc:
            # The first evaluation, then every llc_every-th: a real branch, since eval_index is
            # the same for every run (not batched), so the other evaluations skip the sampler.
            due = (x.eval_index == 0) | ((x.eval_index + 1) % m.llc_every == 0)
            out["llc"], out["llc_std"] = jax.lax.cond(
                due,
                lambda: llc.estimate(x.batch_loss, x.params, x.train_loss, x.key, epsilon=m.llc_epsilon,
                                     gamma=m.llc_gamma, nbeta=m.llc_nbeta, chains=m.llc_chains,
                                     draws=m.llc_draws, burn_in=m.llc_burn_in, vectorize=vectorize),
                # NaN shaped like a per-run value (inside shard_map it must vary over runs too).
                lambda: (jnp.full_like(x.train_loss, jnp.nan), jnp.full_like(x.train_loss, jnp.nan)))
        return jnp.stack([jnp.asarray(out[c], jnp.float32) for c in COLUMNS]), energy

    return measure


def key_frequencies(energies: np.ndarray, share: float) -> list[list[int]]:
    """Host side: each run's final key frequencies from its energies [runs, K]."""
    return [fourier.key_frequencies(e, share) for e in energies]
