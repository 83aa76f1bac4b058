"""The Fourier structure of the embeddings over the residues 0..p-1 (Nanda et al. 2023).

A model that groks modular addition embeds the residues periodically: a few frequencies carry
almost all of the embedding's norm. The basis is Nanda's (progress-measures-paper, transformers.py
make_fourier_basis) without its constant row: normalised cos(2πkt/p) and sin(2πkt/p), k = 1..⌊p/2⌋.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def basis(p: int) -> np.ndarray:
    """float32[K, 2, p]: unit-norm cos and sin rows of each frequency k = 1..K, K = ⌊p/2⌋. For even
    p the sine of k = p/2 vanishes on the integers and its row is zero."""
    t = np.arange(p)
    rows = []
    for k in range(1, p // 2 + 1):
        pair = np.stack([np.cos(2 * np.pi * k * t / p), np.sin(2 * np.pi * k * t / p)])
        norms = np.linalg.norm(pair, axis=1, keepdims=True)
        rows.append(np.where(norms > 1e-9, pair / np.maximum(norms, 1e-9), 0.0))
    return np.asarray(rows, np.float32).reshape(-1, 2, p)


def coefficients(embedding: jax.Array, fourier: jax.Array) -> jax.Array:
    """float32[K, 2, D]: the cos and sin components of each frequency of E[p, D]."""
    return jnp.einsum("kjt,td->kjd", fourier, embedding, precision="highest")


def energies(embedding: jax.Array, fourier: jax.Array) -> jax.Array:
    """float32[K]: the squared norm of each frequency's cos and sin components of E[p, D]."""
    return (coefficients(embedding, fourier) ** 2).sum((1, 2))


def gini(x: jax.Array) -> jax.Array:
    """Gini coefficient of non-negative values, in the sort-free pairwise form Σᵢⱼ|xᵢ − xⱼ| / (2n·Σx):
    0 when all are equal, (n − 1)/n when one holds everything (Hurley & Rickard 2009)."""
    n = x.shape[-1]
    return jnp.abs(x[:, None] - x[None, :]).sum() / (2 * n * x.sum())


def n_key(energy: jax.Array, share: float) -> jax.Array:
    """The fewest frequencies whose energies hold `share` of the total (non-constant) energy."""
    cum = jnp.cumsum(jnp.sort(energy)[::-1]) / energy.sum()
    return (cum < share - 1e-6).sum() + 1


def key_frequencies(energy: np.ndarray, share: float) -> list[int]:
    """Host side, from a run's final energies: its key frequencies (1..K), strongest first."""
    energy = np.asarray(energy, np.float64)
    if not np.isfinite(energy).all() or energy.sum() <= 0:
        return []
    order = np.argsort(-energy, kind="stable")
    cum = np.cumsum(energy[order]) / energy.sum()
    n = int((cum < share - 1e-6).sum()) + 1
    return [int(k) + 1 for k in order[:n]]


def spectrum_measures(energy: jax.Array, share: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(fourier_gini of the per-frequency norms, n_key_freqs, top_freq_share) from energies[K]."""
    return gini(jnp.sqrt(energy)), n_key(energy, share).astype(jnp.float32), energy.max() / energy.sum()


def restricted_losses(logits, targets, is_train, key_idx, fourier, loss, key_on=None):
    """Nanda et al. 2023's restricted and excluded losses, for tasks whose answer is the residue
    s = a ± b and whose table holds all p² pairs (each residue p times).

    The key frequencies' directions over the pairs are cos(w·s) and sin(w·s); for every class the
    logits are projected onto them (an orthonormal set over the table). Restricted: that projection
    plus each class's mean logit, loss over all pairs. Excluded: the logits with the projection
    removed, loss over the training pairs. `key_idx`: int[k] rows of `fourier`; `loss(logits,
    targets) -> per-example loss`; `key_on`: bool[k], which of them count (a run's own number of key
    frequencies, padded), all where None. Returns (restricted_loss, excluded_loss)."""
    p = fourier.shape[-1]
    rows = fourier[key_idx] if key_on is None else fourier[key_idx] * key_on[:, None, None]
    directions = rows.reshape(-1, p)[:, targets] / jnp.sqrt(p)  # [2k, N]
    proj = directions.T @ (directions @ logits)  # precision: default, as in the model's own matmuls
    restricted = loss(proj + logits.mean(0), targets).mean()
    tr = is_train.astype(jnp.float32)
    excluded = (loss(logits - proj, targets) * tr).sum() / tr.sum()
    return restricted, excluded
