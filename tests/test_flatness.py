"""Relative flatness (Petzka et al. 2021; Han et al. 2025): ‖W‖²·Tr∇²_W L against jax.hessian with respect
to the output weight, invariant where the full Hessian's trace is not, and inside the compiled program."""

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_raw
from jax.flatten_util import ravel_pytree

import jaxgrok
from jaxgrok import engine, models, train
from jaxgrok.measures import flatness
from jaxgrok.sweep import SweepError, sweep_from_dict

P = 7  # x+y mod 7: 49 pairs, 7 classes; the MLP below has 191 parameters


def _setup(scale=1.0):
    model = models.mlp(models.MLPConfig(d_embed=4, d_hidden=8), P, P)
    params = jax.tree.map(lambda w: w * scale, model.init(jax.random.key(0)))
    a, b = np.meshgrid(np.arange(P), np.arange(P), indexing="ij")
    pairs = jnp.asarray(np.stack([a.ravel(), b.ravel()], 1), jnp.int32)
    targets = jnp.asarray((a + b).ravel() % P, jnp.int32)
    is_train = jnp.asarray(np.random.default_rng(0).random(P * P) < 0.5)
    return model, params, pairs, targets, is_train


def _train_loss(model, loss, pairs, targets, is_train, params):
    w = is_train.astype(jnp.float32)
    return (w * train.per_example_loss(loss, P, model.apply(params, pairs), targets)).sum() / w.sum()


def _measured(model, loss, params, pairs, targets, is_train):
    h, w_out = model.features(params, pairs)
    return float(flatness.relative_flatness(h, w_out, model.apply(params, pairs), targets, is_train, loss,
                                            partial(train.per_example_loss, loss, P)))


@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "stablemax"])
def test_relative_flatness_is_the_norm_times_the_hessian_trace_in_the_output_weight(loss):
    model, params, pairs, targets, is_train = _setup(scale=3.0)  # logits of a few units: p far from uniform
    shape = params["w2"].shape

    def in_w(flat):
        return _train_loss(model, loss, pairs, targets, is_train, {**params, "w2": flat.reshape(shape)})

    hessian = np.asarray(jax.jit(jax.hessian(in_w))(params["w2"].ravel()), np.float64)  # [56, 56]
    expected = float(np.sum(np.asarray(params["w2"], np.float64) ** 2) * np.trace(hessian))
    assert expected > 0 or loss == "stablemax"  # StableMax's log is not convex in z: its trace may be < 0
    assert _measured(model, loss, params, pairs, targets, is_train) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "stablemax"])
def test_the_logit_hessian_traces_are_those_of_jax_hessian(loss):
    logits = 4 * jax.random.normal(jax.random.key(1), (20, P))
    targets = jax.random.randint(jax.random.key(2), (20,), 0, P)
    one = lambda z, y: train.per_example_loss(loss, P, z[None], y[None])[0]  # noqa: E731
    exact = jnp.trace(jax.jit(jax.vmap(jax.hessian(one)))(logits, targets), axis1=1, axis2=2)
    generic = jax.jit(partial(flatness.logit_hessian_trace, partial(train.per_example_loss, loss, P)))(logits, targets)
    np.testing.assert_allclose(generic, exact, rtol=1e-5, atol=1e-6)
    closed = flatness.closed_form_trace(loss, logits)
    if loss == "stablemax":
        assert closed is None
    else:  # 1 − ‖p‖² for cross-entropy; 2 for the mean over classes of squared errors
        np.testing.assert_allclose(closed, exact, rtol=1e-5, atol=1e-6)
        assert float(closed.min()) > 0


def test_invariant_to_rescaling_a_relu_layer_where_the_hessian_trace_is_not():
    model, params, pairs, targets, is_train = _setup()
    c = 4.0
    scaled = {**params, "w1": c * params["w1"], "b1": c * params["b1"], "w2": params["w2"] / c}
    np.testing.assert_allclose(model.apply(scaled, pairs), model.apply(params, pairs), rtol=1e-5, atol=1e-5)
    for loss in ("cross_entropy", "mse"):
        before = _measured(model, loss, params, pairs, targets, is_train)
        after = _measured(model, loss, scaled, pairs, targets, is_train)
        assert after == pytest.approx(before, rel=1e-4)

        def trace(p, loss=loss):
            flat, unravel = ravel_pytree(p)
            return float(jnp.trace(jax.jit(jax.hessian(lambda f: _train_loss(model, loss, pairs, targets, is_train,
                                                                         unravel(f))))(flat)))

        assert abs(trace(scaled) / trace(params) - 1) > 0.5, loss  # the full Hessian trace moves


# ---------------------------------------------------------------------------------------------
# Inside the program


def test_in_the_program_it_is_the_hessian_of_the_runs_training_loss_and_changes_no_curve(tiny_sweep):
    # Two runs train; two, at a learning rate of 1e-30, keep their initial weights bit for bit (each
    # update is far below an ulp), where the expected value is computed from their init.
    sweep = lambda on: tiny_sweep(  # noqa: E731
        task={"op": "x+y", "p": P}, model={"kind": "mlp", "d_embed": 4, "d_hidden": 8},
        train={"steps": 40, "eval_every": 20}, measures={"flatness": on},
        sweep={"seed": [0, 1], "weight_decay": 1.0, "learning_rate": [1e-30, 1e-2], "train_fraction": 0.5})
    off, on = engine.train_sweep(sweep(False)), engine.train_sweep(sweep(True))
    for name in train.CURVES:
        np.testing.assert_array_equal(off.curves[name], on.curves[name], err_msg=name)
    assert np.isnan(off.curves["relative_flatness"]).all() and np.isfinite(on.curves["relative_flatness"]).all()
    still = np.flatnonzero(on.sweep.runs["learning_rate"] < 1e-20)
    norm = on.curves["weight_norm"]
    assert len(still) == 2 and (norm[still, 0] == norm[still, -1]).all() and (norm[:, 0] != norm[:, -1]).sum() == 2
    run = still[0]
    s = train._setup(on.sweep.static, vectorize=False)
    state = train.init_run(s, jax.tree.map(lambda x: x[0], train.hparams_for(on.sweep, still[:1])))
    params, n_train = state.params, int(on.sweep.n_train[run])
    in_w = lambda w: train.full_batch_loss(s, {**params, "w2": w.reshape(params["w2"].shape)}, state.order, n_train)  # noqa: E731
    expected = float(jnp.sum(params["w2"] ** 2) * jnp.trace(jax.jit(jax.hessian(in_w))(params["w2"].ravel())))
    assert float(on.curves["relative_flatness"][run, -1]) == pytest.approx(expected, rel=1e-4)


def test_finite_on_the_transformer_and_gromov(tiny_sweep):
    # Cross-entropy's closed form after the transformer's last LayerNorm; StableMax's C Hessian-vector
    # products in the logits on gromov (its MSE closed form is the unit tests').
    for model, loss in (({"kind": "transformer", "d_model": 16, "n_heads": 2, "d_mlp": 32, "layer_norm": True}, "cross_entropy"),
                        ({"kind": "gromov", "d_hidden": 32}, "stablemax")):
        r = engine.train_sweep(tiny_sweep(
            model=model, task={"op": "x-y", "p": 13}, train={"steps": 100, "eval_every": 50, "loss": loss},
            measures={"flatness": True}, sweep={"seed": [0, 1], "weight_decay": 1.0, "learning_rate": 3e-3,
                                                "train_fraction": 0.5}))
        assert np.isfinite(r.curves["relative_flatness"]).all(), model["kind"]


# ---------------------------------------------------------------------------------------------
# A registered model: on with features, off (or refused where asked) without


@jaxgrok.register_model("flatness_linear_test")
@dataclass(frozen=True)
class Linear:
    """Logits = (E[a] + E[b]) W: features h = E[a] + E[b] where asked to give them."""

    features: str = ""  # "", "yes" or "bad" (W of the wrong shape)

    def build(self, n_symbols, n_classes, n_inputs):
        def hidden(params, inputs):
            return params["e"][inputs].sum(1)

        def features(params, inputs):
            return hidden(params, inputs), params["w"][:, 1:] if self.features == "bad" else params["w"]

        return jaxgrok.Model(
            init=lambda key: {"e": jax.random.normal(key, (n_symbols, 5)), "w": jnp.ones((5, n_classes))},
            apply=lambda params, inputs: hidden(params, inputs) @ params["w"],
            forward_flops=lambda n: 0, activations=lambda n: n * n_classes,
            features=features if self.features else None)


def test_a_registered_model_without_features_has_the_measure_off_or_refused():
    raw = make_raw(task={"op": "x+y", "p": 13}, model={"kind": "flatness_linear_test"})
    assert not sweep_from_dict(raw, "r.toml").static.measures.flatness  # off by default anyway
    with pytest.raises(SweepError, match="measures.flatness: model flatness_linear_test has no features"):
        sweep_from_dict({**raw, "measures": {"flatness": True}}, "r.toml")
    with_features = {**raw, "model": {"kind": "flatness_linear_test", "features": "yes"}, "measures": {"flatness": True}}
    assert sweep_from_dict(with_features, "r.toml").static.measures.flatness
    with pytest.raises(SweepError, match=r"features\(params, inputs int32\[4, 2\]\) must give"):
        sweep_from_dict({**with_features, "model": {"kind": "flatness_linear_test", "features": "bad"}}, "r.toml")
