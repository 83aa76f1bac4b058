"""The curvature measures against known answers: Lanczos on a known spectrum and on breakdowns, Hutchinson within
4σ of the trace, batched equal to unbatched, an MLP's Hessian by hvp equal to jax.hessian, the preconditioned form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jaxgrok.measures.curvature import hutchinson_trace, hvp, lanczos_extremes, precond_matvec


def with_spectrum(eigenvalues, seed=0):
    """A symmetric matrix Q·diag(λ)·Qᵀ with a random orthogonal Q (float64 on the host)."""
    n = len(eigenvalues)
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
    return (q * np.asarray(eigenvalues)) @ q.T


def as_dict_matvec(a):
    """x ↦ A·x over a pytree of two arrays, {"w": [10, 10], "b": [n − 100]}: the pytree path, not one vector."""

    def matvec(v):
        y = jnp.matmul(a, jnp.concatenate([v["w"].ravel(), v["b"]]), precision="highest")
        return {"w": y[:100].reshape(10, 10), "b": y[100:]}

    return matvec, {"w": jnp.zeros((10, 10)), "b": jnp.zeros(a.shape[0] - 100)}


@jax.jit(static_argnums=2)
def dict_extremes(a, key, iters):  # A an argument, not a constant: one compile per shape and iteration count
    matvec, like = as_dict_matvec(a)
    return lanczos_extremes(matvec, like, key, iters)


@jax.jit(static_argnums=2)
def dict_trace(a, key, probes):
    matvec, like = as_dict_matvec(a)
    return hutchinson_trace(matvec, like, key, probes)


@jax.jit(static_argnums=2)
def dense_extremes(a, key, iters):
    return lanczos_extremes(lambda v: jnp.matmul(a, v, precision="highest"), jnp.zeros(a.shape[0]), key, iters)


# 123 equally spaced eigenvalues 10 … −2 (spacing 0.098): a dense spectrum, the hard case for Lanczos's extremes.
# Errors over 5 start vectors (worst): 20 iterations 0.1, 30 1e-2, 40 9e-5, 50 3e-6, then float32's 1e-6.
SPECTRUM = np.linspace(10.0, -2.0, 123)


A_SPECTRUM = jnp.asarray(with_spectrum(SPECTRUM), jnp.float32)


def test_lanczos_resolves_both_extremes_of_a_dense_spectrum():
    for seed in range(3):
        lam_max, lam_min = dict_extremes(A_SPECTRUM, jax.random.key(seed), 50)
        assert abs(float(lam_max) - 10.0) < 1e-4 and abs(float(lam_min) + 2.0) < 1e-4, (seed, lam_max, lam_min)


def test_lanczos_with_too_few_iterations_is_inside_the_spectrum():
    # 20 iterations do not resolve this spectrum (error ≈ 0.1), but Ritz values never leave [λ_min, λ_max].
    lam_max, lam_min = dict_extremes(A_SPECTRUM, jax.random.key(0), 20)
    assert 9.5 < float(lam_max) <= 10.0 + 1e-5 and -2.0 - 1e-5 <= float(lam_min) < -1.5
    assert float(lam_max) < 10.0 - 1e-3  # not resolved: the 50-iteration test above is not trivially passed


@pytest.mark.parametrize("eigenvalues, expected", [
    (2.0 * np.ones(40), (2.0, 2.0)),  # A = 2I: breakdown after one step (A·q − αq = 0 exactly)
    (np.r_[np.ones(20), 3.0 * np.ones(20)], (3.0, 1.0)),  # two distinct eigenvalues: an invariant Krylov space of dimension 2
    (np.r_[np.zeros(37), [1.0, 2.0, 5.0]], (5.0, 0.0)),  # rank 3 in 40 dimensions
    (np.zeros(40), (0.0, 0.0)),  # A = 0: β = 0 and ‖A‖ = 0 from the first step
    (np.array([-1.0, 0.5, 2.0, 3.0, 4.0]), (4.0, -1.0)),  # n = 5 < iters: capped at 5 steps, exact
])
def test_lanczos_breakdown_is_neither_nan_nor_a_spurious_ritz_value(eigenvalues, expected):
    a = jnp.asarray(with_spectrum(eigenvalues, seed=1), jnp.float32)
    lam_max, lam_min = dense_extremes(a, jax.random.key(0), 20)
    assert np.isfinite([lam_max, lam_min]).all()
    np.testing.assert_allclose([lam_max, lam_min], expected, atol=1e-5)


def test_hutchinson_within_four_sigma_of_the_trace():
    a = np.random.default_rng(2).normal(size=(123, 123))
    a = (a + a.T) / 2 + np.diag(np.linspace(0, 3, 123))
    probes = 2000
    trace, stderr = dict_trace(jnp.asarray(a, jnp.float32), jax.random.key(3), probes)
    sigma = np.sqrt(2 * ((a**2).sum() - (np.diag(a) ** 2).sum()) / probes)
    assert abs(float(trace) - np.trace(a)) < 4 * sigma, (trace, np.trace(a), sigma)
    assert 0.9 < float(stderr) / sigma < 1.1  # the sample standard error estimates σ


def test_vmapped_over_runs_equals_one_at_a_time():
    rng = np.random.default_rng(4)
    mats = rng.normal(size=(64, 24, 24))
    mats = ((mats + mats.transpose(0, 2, 1)) / 2).astype(np.float32)
    keys = np.asarray(jax.random.key_data(jax.random.split(jax.random.key(5), 64)))  # host arrays: the loop is 64 calls

    def measure(a, key):
        k1, k2 = jax.random.split(jax.random.wrap_key_data(key))
        mv = lambda v: jnp.matmul(a, v, precision="highest")  # noqa: E731
        return (*lanczos_extremes(mv, jnp.zeros(24), k1, 16), *hutchinson_trace(mv, jnp.zeros(24), k2, 8))

    batched = np.array(jax.jit(jax.vmap(measure))(mats, keys))
    one = jax.jit(measure)
    looped = np.array([one(a, k) for a, k in zip(mats, keys)]).T
    np.testing.assert_allclose(batched, looped, rtol=1e-5, atol=1e-5)
    assert len(np.unique(batched[0])) == 64  # 64 different answers, not one broadcast


def mlp_problem():
    """A 6 → 16 → 5 tanh MLP (197 parameters), mean cross-entropy on 64 random points."""
    k = jax.random.split(jax.random.key(6), 6)
    params = {"w1": jax.random.normal(k[0], (6, 16)) / 2, "b1": 0.1 * jax.random.normal(k[1], (16,)),
              "w2": jax.random.normal(k[2], (16, 5)) / 2, "b2": 0.1 * jax.random.normal(k[3], (5,))}
    x, y = jax.random.normal(k[4], (64, 6)), jax.random.randint(k[5], (64,), 0, 5)

    def loss(p):
        logits = jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1).mean()

    return loss, params


@pytest.fixture(scope="module")
def mlp():
    """(loss, params, the dense Hessian by jax.hessian of the flattened loss)."""
    loss, params = mlp_problem()
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    return loss, params, np.asarray(jax.jit(jax.hessian(lambda f: loss(unravel(f))))(flat), np.float64)


def test_hvp_matches_jax_hessian(mlp):
    loss, params, h = mlp
    v = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size, dtype=jnp.float32)).reshape(p.shape), params)
    got = jax.flatten_util.ravel_pytree(jax.jit(lambda v: hvp(loss, params, v))(v))[0]
    np.testing.assert_allclose(got, h @ np.asarray(jax.flatten_util.ravel_pytree(v)[0]), atol=1e-5)


def test_mlp_extremes_and_trace_match_the_dense_hessian(mlp):
    loss, params, h = mlp
    n = h.shape[0]
    assert n == 197
    truth = np.linalg.eigvalsh((h + h.T) / 2)
    matvec = lambda v: hvp(loss, params, v)  # noqa: E731
    lam_max, lam_min = jax.jit(lambda key: lanczos_extremes(matvec, params, key, n))(jax.random.key(7))
    scale = np.abs(truth).max()
    assert truth[0] < -1e-3 * scale  # indefinite: λ_min is a real test, not the zero of a PSD Hessian
    np.testing.assert_allclose([lam_max, lam_min], [truth[-1], truth[0]], atol=1e-4 * scale)
    # The trace: Hutchinson within 4σ (the hvp itself is exact: test_hvp_matches_jax_hessian).
    probes = 1000
    trace, stderr = jax.jit(lambda key: hutchinson_trace(matvec, params, key, probes))(jax.random.key(8))
    sigma = np.sqrt(2 * ((h**2).sum() - (np.diag(h) ** 2).sum()) / probes)
    assert abs(float(trace) - np.trace(h)) < 4 * sigma and 0.8 < float(stderr) / sigma < 1.2


def test_preconditioned_extremes_equal_dense_d_inv_half_h_d_inv_half():
    a = with_spectrum(np.linspace(4.0, -1.0, 123), seed=9)
    matvec, like = as_dict_matvec(jnp.asarray(a, jnp.float32))
    rng = np.random.default_rng(10)
    diag = {"w": jnp.asarray(rng.uniform(0.1, 3.0, (10, 10)), jnp.float32), "b": jnp.asarray(rng.uniform(0.1, 3.0, 23), jnp.float32)}
    d = np.concatenate([np.asarray(diag["w"]).ravel(), np.asarray(diag["b"])]).astype(np.float64)
    truth = np.linalg.eigvalsh(a / np.sqrt(d)[:, None] / np.sqrt(d)[None, :])
    lam_max, lam_min = jax.jit(lambda key: lanczos_extremes(precond_matvec(matvec, diag), like, key, 123))(jax.random.key(11))
    np.testing.assert_allclose([lam_max, lam_min], [truth[-1], truth[0]], rtol=1e-5, atol=1e-4)
    assert abs(truth[-1] - 4.0) > 0.5  # the preconditioner moves the extremes: an unpreconditioned run would fail


def test_deterministic_under_jit_with_the_key_fixed():
    f = lambda key: np.array([*dict_extremes(A_SPECTRUM, key, 20), *dict_trace(A_SPECTRUM, key, 2000)])  # noqa: E731
    first, again = f(jax.random.key(12)), f(jax.random.key(12))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, f(jax.random.key(13)))  # the key does drive the start and the probes


def test_the_curvature_columns_of_a_run_are_its_training_hessian(tiny_sweep):
    """In the compiled program: a run's hessian_max and hessian_min at an evaluation are the extreme
    eigenvalues of jax.hessian of its full-batch training loss there (Lanczos over all ~110 parameters),
    its trace within 4σ of the exact one, and precond_sharpness that of P^-½HP^-½ from its Adam state."""
    from jaxgrok import engine, train

    sweep = tiny_sweep(task={"op": "x+y", "p": 7}, model={"kind": "mlp", "d_embed": 3, "d_hidden": 6},
                       train={"steps": 40, "eval_every": 20},
                       measures={"curvature": True, "curvature_every": 1, "curvature_iters": 500, "curvature_probes": 256},
                       sweep={"seed": 0, "weight_decay": 1.0, "learning_rate": 1e-2, "train_fraction": 0.5})
    result = engine.train_sweep(sweep, devices=jax.devices()[:1])
    s = train._setup(sweep.static, vectorize=False)
    hp = train.hparams_for(sweep, np.array([0]))
    state = jax.tree.map(lambda x: x[0], jax.jit(jax.vmap(lambda h: train.init_run(s, h)))(hp))
    params = engine.params_at(sweep, 0, [40])[40]
    flat, unravel = ravel_pytree(params)
    loss = lambda f: train.full_batch_loss(s, unravel(f), state.order, int(sweep.n_train[0]))  # noqa: E731
    H = np.asarray(jax.hessian(loss)(flat), np.float64)
    eig = np.linalg.eigvalsh((H + H.T) / 2)
    scale = np.abs(eig).max()
    last = lambda name: float(result.curves[name][0, -1])  # noqa: E731
    assert abs(last("hessian_max") - eig[-1]) < 1e-3 * scale and abs(last("hessian_min") - eig[0]) < 1e-3 * scale
    sigma = np.sqrt(2 * ((H**2).sum() - (np.diag(H) ** 2).sum()) / 256)
    assert abs(last("hessian_trace") - np.trace(H)) < 4 * sigma
    assert np.isfinite(last("precond_sharpness")) and last("precond_sharpness") > last("hessian_max")  # √v̂ ≪ 1


def test_a_sweep_with_curvature_traces_its_chunk_once(tiny_sweep):
    from jaxgrok import engine, train

    sweep = tiny_sweep(train={"steps": 60, "eval_every": 10, "chunk_steps": 20},  # three chunks
                       measures={"curvature": True, "curvature_every": 2, "curvature_iters": 4, "curvature_probes": 2})
    before = train.TRACES["chunk"]
    result = engine.train_sweep(sweep, devices=jax.devices()[:1])
    assert train.TRACES["chunk"] - before == 1
    measured = np.isfinite(result.curves["hessian_max"]).all(0)
    assert measured.tolist() == [True, True, False, True, False, True]  # evaluation 0, then every 2nd
