"""The softmax numerics of grokking (Prieto et al. 2025, "Grokking at the edge of numerical stability",
arXiv:2501.04697): without weight decay, cross-entropy training drifts towards scaling the logits
("naive loss minimisation"), until the softmax rounds to exactly one for the training pairs
("softmax collapse") and their gradient vanishes."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def softmax_collapse(logits: jax.Array, is_train: jax.Array) -> jax.Array:
    """The fraction of training pairs whose softmax normaliser Σⱼ exp(zⱼ − max z) is exactly 1 in the
    precision the logits are computed in (every other class's term rounds away; in float32 past a logit
    gap of 16.6 + ln(C − 1), and from 16.6 on depending on the order of the sum; in float64 past
    36.7 + ln(C − 1)), so that their probability is exactly 1 and the gradient of their
    cross-entropy exactly 0 at the label."""
    z = logits
    normaliser = jnp.exp(z - z.max(-1, keepdims=True)).sum(-1)
    return _train_mean((normaliser == 1).astype(jnp.float32), is_train)


def zero_loss_frac(loss: jax.Array, is_train: jax.Array) -> jax.Array:
    """The fraction of training pairs whose loss (the sweep's, per example) is exactly 0."""
    return _train_mean((loss == 0).astype(jnp.float32), is_train)


def nlm_cosine(logits: jax.Array, targets: jax.Array, is_train: jax.Array, loss_fn) -> jax.Array:
    """The mean over training pairs of cos(−∇_z L, z − z̄): the direction the loss moves each pair's
    logits in against the direction that only scales them (z̄, their mean over classes, is what
    softmax ignores). Near 1: the update only scales the logits (Prieto et al.'s naive loss
    minimisation). Pairs whose gradient is exactly 0 (collapsed) have no direction and are left out."""
    grad = jax.vmap(jax.grad(lambda z, y: loss_fn(z[None], y[None])[0]))(logits, targets)
    centred = logits - logits.mean(-1, keepdims=True)
    g_norm, z_norm = jnp.linalg.norm(grad, axis=-1), jnp.linalg.norm(centred, axis=-1)
    defined = is_train & (g_norm > 0) & (z_norm > 0)
    cos = jnp.sum(-grad * centred, -1) / jnp.where(defined, g_norm * z_norm, 1.0)
    return _train_mean(cos, defined)


def _train_mean(x: jax.Array, where: jax.Array) -> jax.Array:
    w = where.astype(jnp.float32)
    return jnp.where(w.sum() > 0, (x * w).sum() / jnp.maximum(w.sum(), 1.0), jnp.nan)
