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


def _plain_grokfast_decoder(params, pairs, n_symbols):
    """ironjr/grokfast main.py's Decoder, written out: tokens x, op, y, =; in each Block
    x = ln_1(x); x = x + attn(x); x = x + mlp(ln_2(x)); then ln_f and the head."""
    n = len(pairs)
    tokens = jnp.stack([pairs[:, 0], jnp.full(n, n_symbols + 1), pairs[:, 1], jnp.full(n, n_symbols)], 1)
    x = params["embed"][tokens] + params["pos"]
    mask = jnp.tril(jnp.ones((4, 4), bool))
    for layer in params["layers"]:
        x = models._layer_norm(x, layer["ln1_s"], layer["ln1_b"])
        q, k, v = (jnp.einsum("npd,dhk->nhpk", x, layer["w" + c]) + layer["b" + c][:, None] for c in "qkv")
        att = jax.nn.softmax(jnp.where(mask, q @ k.swapaxes(-1, -2) / q.shape[-1] ** 0.5, -jnp.inf), -1)
        x = x + jnp.einsum("nhpk,hkd->npd", att @ v, layer["wo"]) + layer["bo"]
        h = models._layer_norm(x, layer["ln2_s"], layer["ln2_b"])
        x = x + jax.nn.gelu(h @ layer["w_in"] + layer["b_in"], approximate=False) @ layer["w_out"] + layer["b_out"]
    return models._layer_norm(x[:, -1], params["lnf_s"], params["lnf_b"]) @ params["unembed"]


GROKFAST_MODEL = dict(n_layers=2, d_model=32, n_heads=4, d_mlp=128, activation="gelu_exact", layer_norm=True,
                      layer_norm_at="pre", init="torch", attention_bias=True, operator_token=True)


def _nonzero_biases(params, key):
    """The attention biases start at zero: give them values so that a test sees where they enter."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def test_grokfast_transformer_matches_the_papers_block():
    table = tasks.make_table(TaskConfig("x*y", 13, y_nonzero=True))
    model = models.build(TransformerConfig(**GROKFAST_MODEL), 13, 13)
    params = _nonzero_biases(model.init(jax.random.key(3)), jax.random.key(4))
    pairs = jnp.asarray(table.inputs)
    np.testing.assert_allclose(model.apply(params, pairs), _plain_grokfast_decoder(params, pairs, 13), rtol=1e-5, atol=1e-5)


def test_grokfast_transformer_initialization_is_pytorchs():
    """Per tensor, the spread of PyTorch's default: N(0, 1) embeddings, Xavier-uniform attention
    projections, U(±1/√fan_in) linear layers, zero attention biases, unit LayerNorms."""
    d, m = 64, 256
    params = models.build(TransformerConfig(**GROKFAST_MODEL | dict(d_model=d, d_mlp=m)), 97, 97).init(jax.random.key(5))
    uniform_sd = lambda bound: bound / 3**0.5  # noqa: E731
    assert params["embed"].shape == (99, d) and params["pos"].shape == (4, d)
    np.testing.assert_allclose(params["embed"].std(), 1.0, rtol=0.05)
    layer = params["layers"][0]
    np.testing.assert_allclose(layer["wq"].std(), uniform_sd((6 / (4 * d)) ** 0.5), rtol=0.05)
    np.testing.assert_allclose(layer["w_in"].std(), uniform_sd(d**-0.5), rtol=0.05)
    np.testing.assert_allclose(layer["w_out"].std(), uniform_sd(m**-0.5), rtol=0.05)
    np.testing.assert_allclose(params["unembed"].std(), uniform_sd(d**-0.5), rtol=0.1)
    assert not layer["bq"].any() and not layer["bo"].any() and (layer["ln1_s"] == 1).all()
    assert layer["b_in"].any()  # nn.Linear's bias is drawn, not zero


def test_grokfast_transformer_equals_pytorch_decoder():
    """The paper's own model (ironjr/grokfast main.py's Decoder, copied here) given our weights
    computes our logits."""
    torch = pytest.importorskip("torch")
    import torch.nn as nn

    class Block(nn.Module):  # main.py, verbatim but for the mask's 'mps' fix
        def __init__(self, dim, num_heads):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.attn = nn.MultiheadAttention(dim, num_heads)
            self.mlp = nn.Sequential(nn.Linear(dim, dim * 4), nn.GELU(), nn.Linear(dim * 4, dim))

        def forward(self, x):
            attn_mask = torch.triu(torch.full((len(x), len(x)), -float("Inf")), diagonal=1)
            x = self.ln_1(x)
            a, _ = self.attn(x, x, x, attn_mask=attn_mask, need_weights=False)
            x = x + a
            return x + self.mlp(self.ln_2(x))

    d, h, p = 32, 4, 13
    cfg = TransformerConfig(**GROKFAST_MODEL | dict(d_model=d, d_mlp=4 * d))
    params = _nonzero_biases(models.build(cfg, p, p).init(jax.random.key(6)), jax.random.key(7))
    blocks = [Block(d, h) for _ in range(2)]
    t = lambda a: torch.tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    with torch.no_grad():
        for blk, layer in zip(blocks, params["layers"]):
            blk.attn.in_proj_weight.copy_(torch.cat([t(layer[w].reshape(d, d)).T for w in ("wq", "wk", "wv")]))
            blk.attn.in_proj_bias.copy_(torch.cat([t(layer[b].reshape(d)) for b in ("bq", "bk", "bv")]))
            blk.attn.out_proj.weight.copy_(t(layer["wo"].reshape(d, d)).T)
            blk.attn.out_proj.bias.copy_(t(layer["bo"]))
            for ln, s in ((blk.ln_1, "ln1"), (blk.ln_2, "ln2")):
                ln.weight.copy_(t(layer[s + "_s"]))
                ln.bias.copy_(t(layer[s + "_b"]))
            blk.mlp[0].weight.copy_(t(layer["w_in"]).T)
            blk.mlp[0].bias.copy_(t(layer["b_in"]))
            blk.mlp[2].weight.copy_(t(layer["w_out"]).T)
            blk.mlp[2].bias.copy_(t(layer["b_out"]))
        pairs = tasks.make_table(TaskConfig("x*y", p, y_nonzero=True)).inputs
        n = len(pairs)
        tokens = torch.tensor(np.stack([pairs[:, 0], np.full(n, p + 1), pairs[:, 1], np.full(n, p)]), dtype=torch.long)
        x = t(params["embed"])[tokens] + t(params["pos"])[:, None]  # sequence first, as main.py
        for blk in blocks:
            x = blk(x)
        ln_f = nn.LayerNorm(d)
        ln_f.weight.copy_(t(params["lnf_s"]))
        ln_f.bias.copy_(t(params["lnf_b"]))
        ref = (ln_f(x[-1]) @ t(params["unembed"])).numpy()
    ours = models.build(cfg, p, p).apply(params, jnp.asarray(pairs))
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


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
    t = tasks.make_table(TaskConfig("x*y", 7, y_nonzero=True))
    assert len(t.targets) == TaskConfig("x*y", 7, y_nonzero=True).sizes().n_pairs == 42 and (t.inputs[:, 1] != 0).all()
    t = tasks.make_table(TaskConfig("x^3+xy", 5))
    assert all((x**3 + x * y) % 5 == z for (x, y), z in zip(t.inputs.tolist(), t.targets.tolist()))
    s5 = tasks.make_table(TaskConfig("s5", 0))
    assert len(s5.targets) == 120 * 120 and s5.n_classes == 120
    table = s5.targets.reshape(120, 120)
    assert all(sorted(row) == list(range(120)) for row in table.tolist())  # a group: Latin square
    assert not (table == table.T).all()  # S5 is not commutative
