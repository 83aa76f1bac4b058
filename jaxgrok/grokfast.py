"""Grokfast (Lee et al. 2024, arXiv:2405.20233): amplify the slow component of the gradient.

The EMA filter of the reference code (ironjr/grokfast, `gradfilter_ema`) keeps μ ← αμ + (1 − α)g,
starting from the first gradient, and hands the optimizer g + λμ. Here it is an optax
GradientTransformation, chained before the optimizer, with α and λ traced per run so that filtered
and unfiltered runs share one compiled program; λ = 0 passes the gradient through unchanged.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class EmaState(NamedTuple):
    mu: optax.Params  # the gradient's exponential moving average
    count: jax.Array  # int32: gradients seen


def ema(alpha, lamb) -> optax.GradientTransformation:
    """g ↦ g + λ·μ with μ the EMA (momentum α) of the gradients so far, this one included."""

    def init(params):
        return EmaState(jax.tree.map(jnp.zeros_like, params), jnp.zeros([], jnp.int32))

    def update(grads, state, params=None):
        del params
        first = state.count == 0  # the reference starts the average at the first gradient
        mu = jax.tree.map(lambda m, g: jnp.where(first, g, alpha * m + (1 - alpha) * g), state.mu, grads)
        # where, not g + 0·μ: λ = 0 hands the optimizer the very same gradient (−0.0 + 0.0 is +0.0).
        out = jax.tree.map(lambda g, m: jnp.where(lamb > 0, g + lamb * m, g), grads, mu)
        return out, EmaState(mu, optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)
