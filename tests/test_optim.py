"""The optimizer table: every name a sweep file accepts has a recipe, and each recipe is an optax chain."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgrok import optim
from jaxgrok.sweep import OPTIMIZERS, TrainConfig


def test_every_optimizer_a_sweep_accepts_has_one_recipe():
    assert set(optim.RECIPES) == set(OPTIMIZERS)


def test_no_warm_up_is_the_full_rate_from_the_first_step():
    assert optim.warmup(0.5, 0) == 0.5
    schedule = optim.warmup(0.5, 10)
    assert float(schedule(0)) == 0.0 and float(schedule(10)) == 0.5


def test_each_recipe_updates_a_pytree():
    params = {"w": jnp.ones(3)}
    for name in OPTIMIZERS:
        cfg = TrainConfig(steps=10, optimizer=name)
        hp = type("Hp", (), {"learning_rate": jnp.float32(0.1), "weight_decay": jnp.float32(1.0),
                             "grokfast_alpha": jnp.float32(0.9), "grokfast_lambda": jnp.float32(0.0)})
        for grokfast in (False, True):
            opt = optim.optimizer(cfg, hp, grokfast)
            assert isinstance(opt, optax.GradientTransformation)
            updates, _ = opt.update({"w": jnp.ones(3)}, opt.init(params), params)
            assert np.isfinite(np.asarray(updates["w"])).all()


def _reference_orthograd(w, g):
    """orthograd.py of Prieto et al.'s repository, in numpy (float64)."""
    w, g = w.ravel().astype(np.float64), g.ravel().astype(np.float64)
    g_orth = g - (w @ g) / (w @ w + 1e-30) * w
    return g_orth * (np.linalg.norm(g) / (np.linalg.norm(g_orth) + 1e-30))


def test_orthograd_is_orthogonal_to_each_tensor_and_keeps_its_norm():
    rng = np.random.default_rng(0)
    params = {"a": jnp.asarray(rng.normal(size=(5, 7)), jnp.float32), "b": jnp.asarray(rng.normal(size=9), jnp.float32)}
    # Gradients partly along the weights, as after memorisation ("naive loss minimisation").
    grads = {k: 0.8 * w + jnp.asarray(rng.normal(size=w.shape), jnp.float32) for k, w in params.items()}
    tx = optim.orthograd(jnp.float32(1))
    out, _ = tx.update(grads, tx.init(params), params)
    for k, w in params.items():
        g, o = np.asarray(grads[k], np.float64), np.asarray(out[k], np.float64)
        assert abs(np.vdot(o, np.asarray(w))) < 1e-5 * np.linalg.norm(o) * np.linalg.norm(w)
        np.testing.assert_allclose(np.linalg.norm(o), np.linalg.norm(g), rtol=1e-6)
        np.testing.assert_allclose(o.ravel(), _reference_orthograd(np.asarray(w), g), rtol=1e-5, atol=1e-6)
    off = optim.orthograd(jnp.float32(0))
    same, _ = off.update(grads, off.init(params), params)
    for k in params:  # 0: the very gradient
        np.testing.assert_array_equal(np.asarray(same[k]), np.asarray(grads[k]))


def test_stablemax_sums_to_one_is_continuous_at_zero_and_does_not_collapse():
    from jaxgrok import train

    logits = jnp.asarray(np.random.default_rng(1).normal(scale=3, size=(6, 11)), jnp.float32)
    np.testing.assert_allclose(np.exp(np.asarray(train.log_stablemax(logits))).sum(-1), 1, rtol=1e-6)
    s = lambda x: np.exp(np.asarray(train.log_stablemax(jnp.asarray([[x, 0.0]], jnp.float32))))[0, 0] * 2  # noqa: E731
    assert abs(s(-1e-6) - s(1e-6)) < 1e-5 and abs(s(0.0) - 1) < 1e-6  # s(0⁻) = s(0⁺) = 1: with s(0) = 1, p = ½
    # The reference formula, in float64: s(x) = x + 1 above 0, 1/(1 − x) below.
    x = np.asarray(logits, np.float64)
    sx = np.where(x < 0, 1 / (1 - x), x + 1)
    labels = jnp.arange(6) % 11
    want = -np.log(sx[np.arange(6), np.asarray(labels)] / sx.sum(-1))
    np.testing.assert_allclose(train.per_example_loss("stablemax", 11, logits, labels), want, rtol=1e-5)
    # A logit gap of 120: float32's softmax rounds the probability to exactly 1, and the loss and its
    # whole gradient to 0 (softmax collapse: e⁻¹²⁰ is below float32's smallest number); StableMax's
    # stay positive.
    big = jnp.asarray([[120.0, 0.0, 0.0]], jnp.float32)
    label = jnp.asarray([0])
    ce = lambda z: train.per_example_loss("cross_entropy", 3, z, label).sum()  # noqa: E731
    sm = lambda z: train.per_example_loss("stablemax", 3, z, label).sum()  # noqa: E731
    assert float(ce(big)) == 0.0 and not np.asarray(jax.grad(ce)(big)).any()
    assert float(sm(big)) > 0 and np.abs(np.asarray(jax.grad(sm)(big))).max() > 1e-4
