"""Optimizer recipes as optax chains, from one table: a sweep's `[train] optimizer` names a recipe.

Every recipe is built inside the vmapped program from traced per-run values (learning rate, weight
decay, Grokfast's α and λ), so runs of different hyperparameters share one compiled program. A new
optimizer is one function and one row of RECIPES (and its name among sweep.OPTIMIZERS).

Grokfast (Lee et al. 2024, arXiv:2405.20233) amplifies the slow component of the gradient. The EMA
filter of the reference code (ironjr/grokfast, `gradfilter_ema`) keeps μ ← αμ + (1 − α)g, starting
from the first gradient, and hands the optimizer g + λμ; here it is a GradientTransformation chained
before the recipe, and λ = 0 passes the gradient through unchanged.

⊥Grad (Prieto et al. 2025, arXiv:2501.04697; LucasPrietoAl/grokking-at-the-edge-of-numerical-stability,
`orthograd.py`) removes from each parameter tensor's gradient its component along the weights, then
rescales it to the gradient's norm, before the base optimizer's step; chained first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import optax

if TYPE_CHECKING:
    from jaxgrok.sweep import TrainConfig


def adamw(learning_rate, weight_decay, cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW: decoupled weight decay (Loshchilov & Hutter)."""
    return optax.adamw(learning_rate, b1=cfg.beta1, b2=cfg.beta2, weight_decay=weight_decay)


def adam_l2(learning_rate, weight_decay, cfg: TrainConfig) -> optax.GradientTransformation:
    """torch.optim.Adam(weight_decay=...): an L2 term added to the gradient before the moments."""
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(learning_rate, b1=cfg.beta1, b2=cfg.beta2))


def sgd(learning_rate, weight_decay, cfg: TrainConfig) -> optax.GradientTransformation:
    """torch.optim.SGD(weight_decay=...) without momentum: the L2 term in the gradient."""
    del cfg  # beta1 and beta2 are Adam's only
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate))


Recipe = Callable[..., optax.GradientTransformation]  # (learning rate or schedule, weight decay, TrainConfig)
RECIPES: dict[str, Recipe] = {"adamw": adamw, "adam": adam_l2, "sgd": sgd}


def warmup(learning_rate, steps: int):
    """The learning rate rising linearly from 0 over `steps` steps, then constant. No warm-up is
    the full rate from the first step: optax's linear_schedule over 0 steps would stay at 0."""
    return optax.linear_schedule(0.0, learning_rate, steps) if steps else learning_rate


class EmaState(NamedTuple):
    """The Grokfast filter's state."""

    mu: optax.Params  # the gradient's exponential moving average
    count: jax.Array  # int32: gradients seen


def grokfast_ema(alpha, lamb) -> optax.GradientTransformation:
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


class MaState(NamedTuple):
    """The Grokfast MA filter's state."""

    window: optax.Params  # the last `w` gradients, each leaf [w, ...], a ring written at count % w
    count: jax.Array  # int32: gradients seen


def grokfast_ma(window: int, lamb) -> optax.GradientTransformation:
    """g ↦ g + λ·(the mean of the last `window` gradients, this one included), once `window` have
    been seen, the gradient itself before (the reference's gradfilter_ma with its warmup=True, as
    its main.py calls it)."""

    def init(params):
        return MaState(jax.tree.map(lambda p: jnp.zeros((window, *p.shape), p.dtype), params), jnp.zeros([], jnp.int32))

    def update(grads, state, params=None):
        del params
        at = state.count % window
        buf = jax.tree.map(lambda b, g: b.at[at].set(g), state.window, grads)
        full = (state.count + 1 >= window) & (lamb > 0)
        out = jax.tree.map(lambda g, b: jnp.where(full, g + lamb * (b.sum(0) / window), g), grads, buf)
        return out, MaState(buf, optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def orthograd(on) -> optax.GradientTransformation:
    """Per tensor, g ↦ g⊥·‖g‖/‖g⊥‖ with g⊥ = g − (w·g)/(w·w)·w, as the reference (its 10⁻³⁰ guards
    included) where `on` > 0; the gradient itself elsewhere."""

    def project(g, w):
        proj = jnp.vdot(w, g) / (jnp.vdot(w, w) + 1e-30)
        g_orth = g - proj * w
        return jnp.where(on > 0, g_orth * (jnp.linalg.norm(g) / (jnp.linalg.norm(g_orth) + 1e-30)), g)

    def update(grads, state, params=None):
        return jax.tree.map(project, grads, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _promoted_as_optax_expects(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` with JAX's standard dtype promotion inside, whatever the caller's mode: optax's bias
    correction raises a Python float to an int32 count, which strict promotion refuses. The
    arithmetic is the same; the training tests run everything else under strict promotion."""

    def init(params):
        with jax.numpy_dtype_promotion("standard"):
            return tx.init(params)

    def update(grads, state, params=None):
        with jax.numpy_dtype_promotion("standard"):
            return tx.update(grads, state, params)

    return optax.GradientTransformation(init, update)


def optimizer(cfg: TrainConfig, hp, grokfast: bool, ortho: bool = False) -> optax.GradientTransformation:
    """The optimizer of one run: the recipe `cfg.optimizer` at the run's learning rate (after the
    warm-up) and weight decay, behind the Grokfast filter where the sweep uses one (`grokfast`: the
    filter then is in the program of every run, λ = 0 for those without), and behind that ⊥Grad
    where the sweep uses it (`ortho`, likewise). `hp`: the run's Hparams."""
    opt = RECIPES[cfg.optimizer](warmup(hp.learning_rate, cfg.warmup_steps), hp.weight_decay, cfg)
    # As in the torch code of both papers, where the filter and the projection rewrite p.grad
    # before optimizer.step.
    opt = _promoted_as_optax_expects(opt)
    if grokfast:
        grokfast_filter = (grokfast_ma(cfg.grokfast_window, hp.grokfast_lambda) if cfg.grokfast_filter == "ma"
                           else grokfast_ema(hp.grokfast_alpha, hp.grokfast_lambda))
        opt = optax.chain(grokfast_filter, opt)
    return optax.chain(orthograd(hp.orthograd), opt) if ortho else opt
