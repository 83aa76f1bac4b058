"""Progress measures: constructed inputs with known answers, the LLC on models whose learning
coefficient theory gives, and that turning measures on changes no training curve by a bit."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pyarrow.parquet as pq
import pytest
from scipy import integrate

from jaxgrok import engine, results, train
from jaxgrok.measures import COLUMNS, MEASURES, fourier, geometry, llc
from jaxgrok.sweep import SweepError


def _clock(p, k, d=8, seed=0):
    """An embedding that is exactly cos/sin at frequency k, rotated into d dimensions."""
    t = np.arange(p)
    circle = np.stack([np.cos(2 * np.pi * k * t / p), np.sin(2 * np.pi * k * t / p)], 1)
    rotation = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))[0][:2]
    return jnp.asarray(circle @ rotation * 3.0 + 0.5, jnp.float32)  # scaled and shifted: neither matters


def test_a_clock_embedding_has_one_key_frequency_and_is_circular():
    p, k = 31, 3
    basis = jnp.asarray(fourier.basis(p))
    energy = fourier.energies(_clock(p, k), basis)
    gini, n_key, top = fourier.spectrum_measures(energy, 0.9)
    K = p // 2
    assert int(n_key) == 1 and float(top) == pytest.approx(1.0, abs=1e-5)
    assert float(gini) == pytest.approx((K - 1) / K, abs=1e-4)  # the Gini's maximum for K values
    assert fourier.key_frequencies(np.asarray(energy), 0.9) == [k]
    assert float(geometry.circularity(_clock(p, k), basis)) == pytest.approx(1.0, abs=1e-4)


def test_two_clocks_hold_two_key_frequencies():
    p = 53
    emb = jnp.concatenate([_clock(p, 4, seed=1), 0.8 * _clock(p, 17, seed=2)], 1)
    energy = fourier.energies(emb, jnp.asarray(fourier.basis(p)))
    assert fourier.key_frequencies(np.asarray(energy), 0.9) == [4, 17]
    assert float(geometry.circularity(emb, jnp.asarray(fourier.basis(p)))) == pytest.approx(1.0, abs=1e-4)


def test_a_gaussian_embedding_has_many_key_frequencies_and_low_circularity():
    p = 97
    basis = jnp.asarray(fourier.basis(p))
    emb = jax.random.normal(jax.random.key(0), (p, 64))
    energy = fourier.energies(emb, basis)
    gini, n_key, top = fourier.spectrum_measures(energy, 0.9)
    assert int(n_key) > 0.6 * (p // 2) and float(gini) < 0.2 and float(top) < 0.1
    assert float(geometry.circularity(emb, basis)) < 0.2  # ~2·ln(p/2)/p ≈ 0.08 for noise


def test_the_basis_is_orthonormal_for_odd_and_even_p():
    for p in (31, 12):
        b = fourier.basis(p).reshape(-1, p)
        b = b[np.linalg.norm(b, axis=1) > 0]
        gram = b @ b.T
        np.testing.assert_allclose(gram, np.eye(len(b)), atol=1e-5)
        assert np.allclose(b.sum(1), 0, atol=1e-4)  # orthogonal to the constant


def test_gini_matches_the_sorted_formula():
    x = np.random.default_rng(0).gamma(0.5, size=40)
    xs = np.sort(x)
    n = len(x)
    sorted_gini = (2 * np.arange(1, n + 1) - n - 1) @ xs / (n * xs.sum())
    assert float(fourier.gini(jnp.asarray(x, jnp.float32))) == pytest.approx(sorted_gini, rel=1e-5)


def _loss(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def test_restricted_loss_of_logits_in_the_key_directions_is_the_full_loss():
    p = 23
    a, b = np.meshgrid(np.arange(p), np.arange(p), indexing="ij")
    targets = jnp.asarray((a + b).ravel() % p)
    basis = jnp.asarray(fourier.basis(p))
    key_idx = jnp.array([2, 6, 9])  # frequencies 3, 7, 10
    rng = np.random.default_rng(0)
    directions = np.asarray(basis)[np.asarray(key_idx)].reshape(-1, p)[:, np.asarray(targets)] / np.sqrt(p)
    class_mean = rng.normal(size=p)
    logits = jnp.asarray(class_mean + directions.T @ rng.normal(size=(len(directions), p)) * 4, jnp.float32)
    is_train = jnp.asarray(rng.random(p * p) < 0.4)
    restricted, excluded = fourier.restricted_losses(logits, targets, is_train, key_idx, basis, _loss)
    assert float(restricted) == pytest.approx(float(_loss(logits, targets).mean()), rel=1e-5)
    # Without the key directions only the class means are left: a constant prediction.
    const = _loss(jnp.broadcast_to(jnp.asarray(class_mean, jnp.float32), logits.shape), targets)
    assert float(excluded) == pytest.approx(float(const[is_train].mean()), rel=1e-4)
    # Logits with no component along the key directions are untouched by excluding them.
    other = jnp.asarray(rng.normal(size=(p * p, p)), jnp.float32)
    other = other - jnp.asarray(directions.T @ (directions @ np.asarray(other)))
    _, excluded = fourier.restricted_losses(other, targets, is_train, key_idx, basis, _loss)
    assert float(excluded) == pytest.approx(float(_loss(other, targets)[is_train].mean()), rel=1e-4)


# ---------------------------------------------------------------------------------------------
# The LLC on models with a known answer


def _sgld(loss, params, **kw):
    cfg = dict(epsilon=1e-4, gamma=0.0, nbeta=100.0, chains=8, draws=4000, burn_in=1000) | kw
    est = jax.jit(lambda key: llc.estimate(lambda w, k: loss(w), params, loss(params), key, **cfg))
    mean, std = est(jax.random.key(0))
    return float(mean), float(std)


def test_llc_of_a_regular_model_is_half_its_dimension():
    """L(w) = ½ Σ hᵢwᵢ² in d = 6 parameters: the posterior is Gaussian and nβ·E[L] = d/2 exactly."""
    h = jnp.array([0.5, 1.0, 2.0, 3.0, 4.0, 6.0])
    mean, std = _sgld(lambda w: 0.5 * (h * w["w"] ** 2).sum(), {"w": jnp.zeros(6)}, epsilon=2e-5)
    assert mean == pytest.approx(3.0, rel=0.15), (mean, std)
    assert 0 < std < 1


def test_llc_of_a_minimally_singular_model_is_below_half_its_dimension():
    """f(x) = a·b·x with truth ab = 0: K(a, b) = (ab)²/2, d = 2 but λ = 1/2 (Lau et al. 2025). At a
    finite nβ and localisation γ the exact target, nβ·E[K] under exp(−nβK − γ/2‖w‖²), comes from
    quadrature (b is Gaussian given a): it lies well below d/2 = 1 and approaches 1/2 as nβ/γ grows."""
    t, gamma = 1e6, 100.0
    density = lambda a: np.exp(-gamma * a * a / 2) / np.sqrt(t * a * a + gamma)  # noqa: E731
    inner = lambda a: t * a * a / (2 * (t * a * a + gamma))  # noqa: E731
    lim = 8 / np.sqrt(gamma)
    z = integrate.quad(density, -lim, lim, points=[0], limit=200)[0]
    exact = integrate.quad(lambda a: density(a) * inner(a), -lim, lim, points=[0], limit=200)[0] / z
    assert 0.3 < exact < 0.5
    mean, _ = _sgld(lambda w: 0.5 * (w["a"] * w["b"]) ** 2, {"a": jnp.zeros(()), "b": jnp.zeros(())},
                    epsilon=1e-6, gamma=gamma, nbeta=t, draws=20000, burn_in=5000)
    assert mean == pytest.approx(exact, rel=0.15), (mean, exact)
    assert mean < 0.75  # not the regular d/2 = 1


# ---------------------------------------------------------------------------------------------
# Inside the program


def _base(result):
    return np.stack([result.curves[m] for m in train.CURVES], -1)


def test_measures_change_no_training_curve_by_a_bit(tiny_sweep):
    train_cfg = {"steps": 300, "eval_every": 50, "chunk_steps": 100}
    off = {"dist_from_init": False, "fourier": False, "circularity": False, "restricted_loss": False}
    sweep_off = tiny_sweep(train=train_cfg, measures=off)
    every = {m.switch: True for m in MEASURES}  # every measure of the table, the later ones included
    sweep_on = tiny_sweep(train=train_cfg, measures={**every, "llc_every": 2, "llc_draws": 5, "curvature_every": 2})
    a, b = engine.train_sweep(sweep_off), engine.train_sweep(sweep_on)
    np.testing.assert_array_equal(_base(a), _base(b))
    assert np.isnan(a.curves["fourier_gini"]).all() and a.energies.shape == (6, 0)
    for m in COLUMNS:
        assert np.isfinite(b.curves[m][:, 1]).all(), m  # evaluation 1 (index 1): an LLC evaluation
    # The LLC at the first evaluation and every llc_every-th after it, not between.
    assert np.isfinite(b.curves["llc"]).all(0).tolist() == [True, True, False, True, False, True]


def test_minibatch_runs_and_the_llc_are_chunking_independent(tiny_sweep):
    cfg = {"steps": 300, "eval_every": 50, "batch_size": 64}
    m = {"llc": True, "llc_every": 3, "llc_draws": 5, "llc_batch_size": 32}
    a = engine.train_sweep(tiny_sweep(train=cfg | {"chunk_steps": 100}, measures=m))
    b = engine.train_sweep(tiny_sweep(train=cfg | {"chunk_steps": 300}, measures=m))
    for name in train.METRICS:
        np.testing.assert_array_equal(a.curves[name], b.curves[name], err_msg=name)


def test_measures_on_the_transformer_and_gromov(tiny_sweep):
    for model in ({"kind": "transformer", "d_model": 16, "n_heads": 2, "d_mlp": 32}, {"kind": "gromov", "d_hidden": 32}):
        # Every measure on, each at its smallest: the test is that each applies to these models, not its value.
        sweep = tiny_sweep(model=model, task={"op": "x-y", "p": 13}, train={"steps": 50, "eval_every": 50, "chunk_steps": 50},
                           measures={"llc": True, "llc_draws": 3, "llc_chains": 2, "numerics": True, "curvature": True,
                                     "curvature_iters": 3, "curvature_probes": 2, "flatness": True},
                           sweep={"seed": [0, 1], "weight_decay": 1.0, "learning_rate": 3e-3, "train_fraction": 0.5})
        r = engine.train_sweep(sweep)
        for name in COLUMNS:
            assert np.isfinite(r.curves[name][:, 0]).all(), (model["kind"], name)
        assert r.energies.shape == (2, 6)


def test_one_llc_chain_has_no_spread(tiny_sweep):
    """llc_chains = 1 compiles (its llc_std, NaN for every run alike, once failed to trace under
    shard_map: the branches of its cadence disagreed on varying over runs) and has no spread."""
    r = engine.train_sweep(tiny_sweep(train={"steps": 50, "eval_every": 50, "chunk_steps": 50},
                                      measures={"llc": True, "llc_chains": 1, "llc_draws": 3}))
    assert np.isfinite(r.curves["llc"]).all() and np.isnan(r.curves["llc_std"]).all()


def test_measures_that_do_not_apply_are_null_or_refused(tiny_sweep):
    r = engine.train_sweep(tiny_sweep(task={"op": "x*y", "p": 11}, train={"steps": 100, "eval_every": 50}))
    assert np.isnan(r.curves["restricted_loss"]).all() and np.isfinite(r.curves["fourier_gini"]).all()
    with pytest.raises(SweepError, match="measures.restricted_loss: defined for x"):
        tiny_sweep(task={"op": "x*y", "p": 11}, measures={"restricted_loss": True})
    with pytest.raises(SweepError, match="measures.fourier: needs a modular task"):
        tiny_sweep(task={"op": "s5"}, model={"kind": "mlp", "d_embed": 4, "d_hidden": 8}, measures={"fourier": True})
    s5 = tiny_sweep(task={"op": "s5"}, model={"kind": "mlp", "d_embed": 4, "d_hidden": 8})
    assert not s5.static.measures.fourier and not s5.static.measures.circularity


@pytest.mark.parametrize("key,value,problem", [
    ("llc_every", 0, "must be ≥ 1"),
    ("llc", "yes", "must be true or false"),
    ("key_freq_share", 1.5, "must be in (0, 1]"),
    ("llc_epsilon", -1e-3, "must be in (0, 1)"),
    ("llc_chains", 0, "must be 1 to 64"),
    ("lcc", True, "unknown key"),
])
def test_bad_measures_get_one_line(tiny_sweep, key, value, problem):
    with pytest.raises(SweepError, match=f"measures.{key}: .*{problem[:12]}".replace("(", r"\(").replace(")", r"\)")):
        tiny_sweep(measures={key: value})


def test_the_parquet_columns_are_the_measures():
    assert tuple(results.MEASURE_COLUMNS) == COLUMNS


def test_the_llc_on_the_vmapped_accelerator_path(tiny_sweep):
    """Runs and chains vmapped (the accelerator path), checked on CPU against one run at a time:
    batched kernels round differently in the last bit, so the comparison is approximate."""
    sweep = tiny_sweep(train={"steps": 20, "eval_every": 10}, measures={"llc": True, "llc_every": 1, "llc_draws": 5})
    mapped = engine.train_sweep(sweep)
    vmapped = engine.train_sweep(sweep, vectorize=True)
    for name in COLUMNS:
        np.testing.assert_allclose(vmapped.curves[name], mapped.curves[name], rtol=2e-3, atol=1e-4, err_msg=name)


def test_initial_key_share_and_its_random_expectation():
    from jaxgrok.measures import initial_key_share

    energies0 = np.array([[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    share, random = initial_key_share(energies0, [[4, 1], [2], []], p=9)
    np.testing.assert_allclose(share[:2], [0.5, 0.25])
    np.testing.assert_allclose(random[:2], [0.5, 0.25])
    assert np.isnan(share[2]) and np.isnan(random[2])  # no key frequencies: no ticket
    _, random = initial_key_share(np.ones((1, 4)), [[4]], p=8)  # even p: k = 4 has a cosine only
    np.testing.assert_allclose(random, [0.5 / 3.5])


def test_the_ticket_is_the_step_0_embeddings_share_in_the_final_key_frequencies(tiny_sweep, tmp_path):
    from jaxgrok import models, tasks
    from jaxgrok.cli import main
    from jaxgrok.measures import fourier

    sweep = tiny_sweep(train={"steps": 100, "eval_every": 50, "chunk_steps": 100, "max_runs_per_batch": 8})
    out = tmp_path / "out"
    from conftest import make_raw, write_raw
    path = write_raw(tmp_path / "s.toml", make_raw(train={"steps": 100, "eval_every": 50, "chunk_steps": 100,
                                                          "max_runs_per_batch": 8}))
    assert main(["run", str(path), "--out", str(out), "--quiet", "--no-analyze"]) == 0
    runs = pq.read_table(out / "runs.parquet").to_pandas()
    table = tasks.make_table(sweep.static.task)
    model = models.build(sweep.static.model, table.n_symbols, table.n_classes)
    basis = jnp.asarray(fourier.basis(table.n_symbols))
    for run in (0, 3):
        energy = np.asarray(fourier.energies(model.embedding(engine.params_at(sweep, run, [0])[0]), basis), np.float64)
        keys = np.asarray(runs.key_freqs[run]) - 1
        assert np.isclose(runs.init_key_share[run], energy[keys].sum() / energy.sum(), rtol=1e-5)
        assert np.isclose(runs.init_key_share_random[run], len(keys) / len(energy))
