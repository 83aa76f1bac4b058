"""The geometry of the weights and of the embeddings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def dist_from_init(params, params0) -> jax.Array:
    """‖θ − θ₀‖ over every parameter: small while training is lazy, large once features are
    learned (Kumar et al. 2023)."""
    return optax.tree.norm(jax.tree.map(jnp.subtract, params, params0))


def circularity(embedding: jax.Array, fourier: jax.Array, n_components: int = 4) -> jax.Array:
    """How well the embedding's top principal components lie on circles at one frequency each
    (Zhong et al. 2023, "The clock and the pizza", eval-main.ipynb).

    For each of the first `n_components` principal components, its score vector v over the p
    residues (unit norm) has a share of its energy at its best frequency: max_k (⟨cos_k, v⟩² +
    ⟨sin_k, v⟩²), which is pizza's 2|Σₜ v[t·i mod p]·e^{2πit/p}|²/p maximised over i. Pizza averages
    these shares; here they are weighted by the components' variances, so that an embedding of
    rank 2 (a perfect clock) scores 1 instead of averaging in two components of zero variance.
    1: every leading component is a pure cosine; noise: about 2·ln(p/2)/p."""
    centred = embedding - embedding.mean(0)
    # The principal components' score vectors are the top eigenvectors of the p × p Gram matrix
    # (eigh: half the time of an SVD on a CPU for these small matrices).
    var, vectors = jnp.linalg.eigh(jnp.matmul(centred, centred.T, precision="highest"))
    m = min(n_components, embedding.shape[0], embedding.shape[1])
    scores, var = vectors[:, ::-1][:, :m], jnp.maximum(var[::-1][:m], 0.0)
    share = (jnp.einsum("kjt,tc->kjc", fourier, scores, precision="highest") ** 2).sum(1).max(0)
    return (share * var).sum() / jnp.maximum(var.sum(), 1e-30)
