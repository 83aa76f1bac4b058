"""The local learning coefficient (LLC) by SGLD (Lau et al. 2025, arXiv 2308.12108; devinterp).

Around the current weights w*, SGLD samples the tempered, localised posterior
    ∝ exp(−nβ·L(w) − γ/2·‖w − w*‖²),
one step being Δw = −(ε/2)·(nβ·∇L_batch(w) + γ·(w − w*)) + √ε·N(0, I). The estimate is
    λ̂ = nβ·(mean over draws of L_batch(w_t) − L(w*)),
averaged over chains (with their standard deviation). As in devinterp, each draw's minibatch loss is
taken at w_t before the step. Unlike devinterp, L(w*) is the full-batch training loss, which the
minibatch losses estimate without bias, so no chain's first batch is privileged (devinterp PR #39).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def estimate(batch_loss: Callable, params, loss_at_params, key, *, epsilon: float, gamma: float, nbeta: float,
             chains: int, draws: int, burn_in: int, vectorize: bool = True) -> tuple[jax.Array, jax.Array]:
    """(λ̂ averaged over chains, its standard deviation over chains; NaN with one chain).

    `batch_loss(params, key) -> scalar`: the loss on a minibatch drawn with `key` (or the full
    training loss, ignoring it); `loss_at_params`: L(w*). Chains are vmapped (`vectorize`: under
    a vmap over runs the whole sampler is one batched program) or run one after another (CPU, where
    unbatched kernels are faster, as for the runs themselves)."""

    def chain(key):
        def step(w, key):
            k_batch, k_noise = jax.random.split(key)
            loss, grad = jax.value_and_grad(batch_loss)(w, k_batch)
            leaves, tree = jax.tree.flatten(w)
            noise = tree.unflatten([jax.random.normal(k, x.shape, x.dtype)
                                    for k, x in zip(jax.random.split(k_noise, len(leaves)), leaves)])
            w = jax.tree.map(lambda w, g, w0, z: w - epsilon / 2 * (nbeta * g + gamma * (w - w0)) + epsilon**0.5 * z,
                             w, grad, params, noise)
            return w, loss

        _, losses = jax.lax.scan(step, params, jax.random.split(key, burn_in + draws))
        return losses[burn_in:].mean()

    keys = jax.random.split(key, chains)
    llcs = nbeta * ((jax.vmap(chain)(keys) if vectorize else jax.lax.map(chain, keys)) - loss_at_params)
    std = llcs.std(ddof=1) if chains > 1 else jnp.float32(jnp.nan)
    return llcs.mean(), std
