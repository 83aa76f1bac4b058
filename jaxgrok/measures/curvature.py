"""Curvature of the loss: Hessian-vector products, the Hessian's extreme eigenvalues (Lanczos 1950, with
full reorthogonalisation) and its trace (Hutchinson 1989), over parameter pytrees.

Every function is pure and traces to a fixed program: static shapes (a preallocated [m, n] Lanczos basis,
n the number of parameters, known from their shapes), fixed iteration counts (`lax.fori_loop`, `lax.map`),
no data-dependent Python branch and no host sync. So they jit, vmap over runs and scan over steps inside
the compiled program like any other measure; the Hessian itself (n × n) is never formed.

The preconditioned sharpness of an adaptive optimiser (Cohen et al. 2022, "Adaptive gradient methods at
the edge of stability"), λ_max(P⁻¹H) = λ_max(P^-½ H P^-½) with Adam's P = diag(√v̂ + ε), is
`lanczos_extremes(precond_matvec(matvec, P), params, key, iters)[0]`, P = jax.tree.map(lambda v: jnp.sqrt(v) + eps,
v_hat) a pytree like params (v̂ bias-corrected, as Adam's step divides by it).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

_HIGHEST = jax.lax.Precision.HIGHEST  # no TF32 in the reorthogonalisation on a GPU


def hvp(loss_fn: Callable, params, v):
    """H(params)·v for the scalar `loss_fn(params)`, forward-over-reverse (`jax.jvp` of `jax.grad`): a few
    gradients' cost, a pytree like params."""
    return jax.jvp(jax.grad(loss_fn), (params,), (v,))[1]


def precond_matvec(matvec: Callable, diag) -> Callable:
    """v ↦ D^-½ ⊙ H(D^-½ ⊙ v): the symmetric form of P⁻¹H for a positive diagonal P = D, a pytree like
    params (it has P⁻¹H's eigenvalues)."""
    scale = jax.tree.map(jax.lax.rsqrt, diag)
    return lambda v: jax.tree.map(jnp.multiply, scale, matvec(jax.tree.map(jnp.multiply, scale, v)))


def lanczos_extremes(matvec: Callable, params_like, key, iters: int) -> tuple[jax.Array, jax.Array]:
    """(λ_max, λ_min) of the symmetric operator `matvec` (pytree ↦ pytree like `params_like`) by Lanczos
    (1950) with full reorthogonalisation, for m = min(iters, n) steps from a random unit (normal) start.

    Each step orthogonalises A·q_j against the whole basis twice (classical Gram–Schmidt twice), so the
    Ritz values carry no spurious copies. The extremes are those of the m × m tridiagonal's eigenvalues
    (`eigh`), the Rayleigh–Ritz values on the Krylov basis: inside [λ_min, λ_max], and exact once m = n.
    On breakdown (β ≈ 0: the Krylov space is invariant, as when the operator has fewer than m distinct
    eigenvalues) the step restarts from a fresh random vector (a cyclic shift of a second normal vector: no
    random draws inside the loop) orthogonalised against the basis, with β = 0: the tridiagonal is block
    diagonal, its every eigenvalue still a Ritz value, and nothing divides by zero. Memory: the m × n basis."""
    flat, unravel = ravel_pytree(params_like)
    n, dtype = flat.size, flat.dtype
    m = min(iters, n)  # beyond n the Krylov space is the whole space: more steps would only add zeros
    op = lambda x: ravel_pytree(matvec(unravel(x)))[0].astype(dtype)  # noqa: E731
    k_start, k_restart = jax.random.split(key)
    q0, r = jax.random.normal(k_start, (n,), dtype), jax.random.normal(k_restart, (n,), dtype)
    basis = jnp.zeros((m, n), dtype).at[0].set(q0 / jnp.linalg.norm(q0))
    tol = 10 * jnp.sqrt(jnp.asarray(n, dtype)) * jnp.finfo(dtype).eps  # breakdown: β ≤ tol·‖A‖ (estimated)

    def orthogonalise(Q, w):  # rows of Q not yet filled are zero and take nothing away
        for _ in range(2):
            w = w - jnp.matmul(jnp.matmul(Q, w, precision=_HIGHEST), Q, precision=_HIGHEST)
        return w

    def step(j, carry):
        Q, alpha, beta, norm_a = carry
        q = Q[j]
        w = op(q)
        norm_a = jnp.maximum(norm_a, jnp.linalg.norm(w))
        alpha = alpha.at[j].set(jnp.dot(q, w, precision=_HIGHEST))
        w = orthogonalise(Q, w)
        b = jnp.linalg.norm(w)
        broke = b <= tol * norm_a
        restart = lambda: orthogonalise(Q, jnp.roll(r, j))  # noqa: E731  (shifts of a normal r span ℝⁿ almost surely)
        w = jax.lax.cond(broke, restart, lambda: w)  # under vmap both are computed and one selected
        nxt = w / jnp.maximum(jnp.linalg.norm(w), jnp.finfo(dtype).tiny)
        beta = beta.at[j].set(jnp.where(broke, 0.0, b))
        return Q.at[j + 1].set(nxt, mode="drop"), alpha, beta, norm_a  # the last step's q is not kept

    # Zeros made from the start vector: inside shard_map they then vary over runs as the loop's outputs do.
    zeros = jnp.zeros_like(q0, shape=(m,))
    init = (basis, zeros, zeros, jnp.zeros_like(q0, shape=()))
    _, alpha, beta, _ = jax.lax.fori_loop(0, m, step, init)
    off = beta[:-1]
    ritz = jnp.linalg.eigvalsh(jnp.diag(alpha) + jnp.diag(off, 1) + jnp.diag(off, -1))
    return ritz[-1], ritz[0]


def hutchinson_trace(matvec: Callable, params_like, key, probes: int) -> tuple[jax.Array, jax.Array]:
    """(tr A, its standard error) by Hutchinson's (1989) estimator: the mean of zᵀAz over `probes`
    Rademacher vectors z (±1), one after another (`lax.map`: one matvec's memory); the standard error is
    the probes' sample standard deviation / √probes (NaN with one probe). Its variance is
    2(‖A‖²_F − Σ A_ii²)/probes."""
    flat, unravel = ravel_pytree(params_like)
    z = jax.random.rademacher(key, (probes, flat.size), flat.dtype)
    quad = jax.lax.map(lambda z: jnp.dot(z, ravel_pytree(matvec(unravel(z)))[0], precision=_HIGHEST), z)
    return quad.mean(), quad.std(ddof=1) / jnp.sqrt(jnp.asarray(probes, flat.dtype))


def adam_state(opt_state) -> optax.ScaleByAdamState:
    """The Adam moments inside an optax chain's state (the recipes' only ScaleByAdamState)."""
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
             if isinstance(x, optax.ScaleByAdamState)]
    if len(found) != 1:
        raise ValueError(f"expected one Adam state in the optimizer state, found {len(found)}")
    return found[0]
