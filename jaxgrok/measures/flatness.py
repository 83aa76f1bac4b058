"""Relative flatness of the output layer (Petzka et al. 2021, "Relative flatness and generalization";
Han et al. 2025): ‖W‖²_F · Tr ∇²_W L, with L the training loss (the mean over the run's training pairs)
and W the last linear map, logits z = W h + b (its bias not part of W). Scaling a layer into the next,
W → W/c and h → c·h (a ReLU layer's incoming weights and bias by c), leaves the function and this
measure unchanged; the Hessian's trace over all parameters changes.

The Hessian with respect to W of one example's loss ℓ(W h + b) is ∇²_z ℓ ⊗ h hᵀ, so its trace is
Tr ∇²_z ℓ · ‖h‖², and that of L the mean of these over the training pairs. Tr ∇²_z ℓ in closed form:
- softmax cross-entropy: ∇²_z ℓ = diag(p) − p pᵀ (p = softmax(z)), trace 1 − ‖p‖²;
- MSE as jaxgrok takes it, the mean over the C classes of (z − onehot)²: ∇²_z ℓ = (2/C)·I, trace 2;
- any other loss (StableMax cross-entropy): exactly, from C Hessian-vector products in z (`logit_hessian_trace`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def logit_hessian_trace(loss_fn: Callable, logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Tr ∇²_z ℓ(z_n, y_n) of each example, exactly, for any `loss_fn(logits [N, C], targets [N]) -> [N]`
    that treats examples separately: Σ_c (H_n e_c)_c from C Hessian-vector products of Σ_n ℓ_n over the
    batch (its Hessian is block diagonal over examples), one class at a time: N × C floats of memory,
    never the N × C × C Hessians."""
    z = logits.astype(jnp.float32)
    grad = jax.grad(lambda z: loss_fn(z, targets).sum())
    n_classes = z.shape[-1]

    def add(c, total):
        e = jnp.zeros_like(z).at[:, c].set(1.0)
        return total + jax.jvp(grad, (z,), (e,))[1][:, c]

    return jax.lax.fori_loop(0, n_classes, add, jnp.zeros_like(z[:, 0]))  # (varying over runs, as z is)


def closed_form_trace(loss: str, logits: jax.Array) -> jax.Array | None:
    """Tr ∇²_z ℓ of each example where the loss has a closed form: cross-entropy 1 − ‖softmax(z)‖²,
    "mse" 2 (whatever z); None for the others."""
    if loss == "cross_entropy":
        p = jax.nn.softmax(logits.astype(jnp.float32), -1)
        return 1.0 - (p * p).sum(-1)
    if loss == "mse":
        return jnp.full(logits.shape[:1], 2.0, jnp.float32)
    return None


def relative_flatness(features: jax.Array, w_out: jax.Array, logits: jax.Array, targets: jax.Array,
                      is_train: jax.Array, loss: str, loss_fn: Callable) -> jax.Array:
    """‖W_out‖²_F · Tr ∇²_{W_out} L, L the mean of `loss_fn` (the sweep's `loss`, by name) over the training
    pairs `is_train`, from the penultimate features h [N, D], the output weight (either layout) and the
    logits [N, C] on the full table."""
    trace_z = closed_form_trace(loss, logits)
    if trace_z is None:
        trace_z = logit_hessian_trace(loss_fn, logits, targets)
    h = features.astype(jnp.float32)
    w = is_train.astype(jnp.float32)
    trace_w = (w * trace_z * (h * h).sum(-1)).sum() / w.sum()
    return jnp.sum(jnp.square(w_out.astype(jnp.float32))) * trace_w
