"""The algebraic rewrites in the models compute the same function as the plain forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgrok import models, tasks
from jaxgrok.models import GromovConfig, MLPConfig, TransformerConfig
from jaxgrok.tasks import TaskConfig


def test_mlp_projection_rewrite_matches_plain_form():
    table = tasks.make_table(TaskConfig("x+y", 31))
    model = models.build(MLPConfig(), 31, 31)
    params = model.init(jax.random.key(0))
    pairs = jnp.asarray(table.inputs)
    np.testing.assert_allclose(model.apply(params, pairs), models.mlp_plain(params, pairs), rtol=1e-5, atol=1e-5)


def _plain_transformer(params, pairs, cfg, n_symbols):
    """Every position through every layer, textbook attention: the reference for the shortcut."""
    tokens = jnp.concatenate([pairs, jnp.full((len(pairs), 1), n_symbols)], 1)
    x = params["embed"][tokens] + params["pos"]
    mask = jnp.tril(jnp.ones((3, 3), bool))
    for layer in params["layers"]:
        q, k, v = (jnp.einsum("npd,dhk->nhpk", x, layer[w]) for w in ("wq", "wk", "wv"))
        att = jax.nn.softmax(jnp.where(mask, q @ k.swapaxes(-1, -2) / q.shape[-1] ** 0.5, -jnp.inf), -1)
        x = x + jnp.einsum("nhpk,hkd->npd", att @ v, layer["wo"])
        if cfg.layer_norm:
            x = models._layer_norm(x, layer["ln1_s"], layer["ln1_b"])
        x = x + jax.nn.relu(x @ layer["w_in"] + layer["b_in"]) @ layer["w_out"] + layer["b_out"]
        if cfg.layer_norm:
            x = models._layer_norm(x, layer["ln2_s"], layer["ln2_b"])
    return x[:, -1] @ params["unembed"]


@pytest.mark.parametrize("cfg", [TransformerConfig(d_model=32, d_mlp=64),
                                 TransformerConfig(n_layers=2, d_model=32, d_mlp=64, layer_norm=True)])
def test_transformer_last_position_shortcut_matches_plain_form(cfg):
    table = tasks.make_table(TaskConfig("x+y", 13))
    model = models.build(cfg, 13, 13)
    params = model.init(jax.random.key(1))
    pairs = jnp.asarray(table.inputs)
    np.testing.assert_allclose(model.apply(params, pairs), _plain_transformer(params, pairs, cfg, 13),
                               rtol=1e-5, atol=1e-5)


def test_gromov_gather_matches_one_hot_product():
    model = models.build(GromovConfig(d_hidden=20), 7, 7)
    params = model.init(jax.random.key(2))
    pairs = jnp.asarray(tasks.make_table(TaskConfig("x+y", 7)).inputs)
    one_hot = jnp.concatenate([jax.nn.one_hot(pairs[:, 0], 7), jax.nn.one_hot(pairs[:, 1], 7)], 1)
    np.testing.assert_allclose(model.apply(params, pairs), ((one_hot @ params["w1"]) ** 2) @ params["w2"],
                               rtol=1e-5, atol=1e-5)


def test_tasks_tables():
    t = tasks.make_table(TaskConfig("x/y", 7))
    assert len(t.targets) == 7 * 6 and (t.inputs[:, 1] != 0).all()
    a, b, c = t.inputs[:, 0], t.inputs[:, 1], t.targets
    assert ((c * b) % 7 == a).all()  # c = a / b
    t = tasks.make_table(TaskConfig("x^3+xy", 5))
    assert all((x**3 + x * y) % 5 == z for (x, y), z in zip(t.inputs.tolist(), t.targets.tolist()))
    s5 = tasks.make_table(TaskConfig("s5", 0))
    assert len(s5.targets) == 120 * 120 and s5.n_classes == 120
    table = s5.targets.reshape(120, 120)
    assert all(sorted(row) == list(range(120)) for row in table.tolist())  # a group: Latin square
    assert not (table == table.T).all()  # S5 is not commutative
