"""Models as pure functions: `init(key) -> params` and `apply(params, pairs[N, 2]) -> logits[N, C]`.

Each built-in model is a config (the `[model]` table of a sweep file) with a `build` method, registered
by its kind like a model of your own (registry.py). The built-in models read two operands (a, b); a
registered model reads the L tokens of its task's examples.

Plain JAX over dict pytrees, so that `jax.vmap` over a run axis turns one model into hundreds.
Initializations follow the reference implementations each model comes from. jax is imported by the
builders, not by this module: reading and checking a sweep file (its analysis too) needs the configs only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jaxgrok import registry
from jaxgrok.registry import Model, checked, register_model  # noqa: F401 - jaxgrok.Model, jaxgrok.register_model

# "gelu" is jax.nn.gelu's tanh approximation; "gelu_exact" the erf form, PyTorch's nn.GELU().
ACTIVATIONS = ("relu", "gelu", "gelu_exact")
_ACTIVATION = checked(lambda v: v in ACTIVATIONS, f"must be one of {', '.join(ACTIVATIONS)}")
_POSITIVE = checked(lambda v: v > 0, "must be > 0")


@dataclass(frozen=True)
class MLPConfig:
    """Two token embeddings, concatenated, one hidden layer: the model that groks on a CPU."""

    kind: str = "mlp"
    d_embed: int = field(default=32, metadata=_POSITIVE)
    d_hidden: int = field(default=128, metadata=_POSITIVE)
    activation: str = field(default="relu", metadata=_ACTIVATION)
    # devinterp's grokking MLP: one embedding table shared by both operands, no output bias.
    tie_embeddings: bool = False
    output_bias: bool = True

    def validate(self, size) -> None:
        """The rules between the model and its task's sizes: ValueError("KEY: what is wrong")."""
        _two_operands(self, size)

    def build(self, n_symbols: int, n_classes: int, n_inputs: int = 2) -> Model:
        """The model over `n_symbols` operands and `n_classes` answers (two operands per example)."""
        return mlp(self, n_symbols, n_classes)


@dataclass(frozen=True)
class TransformerConfig:
    """Decoder-only transformer on the tokens "a b =" (or "a op b ="), logits read at the last position.

    Its defaults are Nanda et al.'s model; `layer_norm` adds Power et al.'s post-LN; `layer_norm_at =
    "pre"`, `init = "torch"`, `attention_bias` and `operator_token` together are Lee et al.'s (Grokfast)."""

    kind: str = "transformer"
    n_layers: int = field(default=1, metadata=checked(lambda v: v in (1, 2, 3, 4), "must be 1 to 4"))
    d_model: int = field(default=128, metadata=_POSITIVE)
    n_heads: int = field(default=4, metadata=_POSITIVE)
    d_mlp: int = field(default=512, metadata=_POSITIVE)
    activation: str = field(default="relu", metadata=_ACTIVATION)
    layer_norm: bool = False
    # "post": LayerNorm after each residual addition (Power et al.'s code). "pre": ironjr/grokfast's
    # Block, x = LN(x); x = x + attn(x); x = x + mlp(LN(x)), the attention added to the normalised
    # stream, and a final LayerNorm before the unembedding.
    layer_norm_at: str = field(default="post", metadata=checked(lambda v: v in ("post", "pre"), "must be post or pre"))
    # "nanda": N(0, 1/d_model) everywhere (unembedding 1/vocab), zero biases. "torch": PyTorch's own
    # defaults as Lee et al.'s model gets them: nn.Embedding N(0, 1) for tokens and positions,
    # nn.MultiheadAttention's Xavier-uniform in-projection and zero biases, nn.Linear's U(±1/√fan_in).
    init: str = field(default="nanda", metadata=checked(lambda v: v in ("nanda", "torch"), "must be nanda or torch"))
    attention_bias: bool = False  # biases on the query, key, value and output projections (nn.MultiheadAttention's)
    operator_token: bool = False  # the input "a op b =", four tokens, as Power et al.'s and Lee et al.'s data

    def validate(self, size) -> None:
        """The rules between the model and its task's sizes: ValueError("KEY: what is wrong")."""
        _two_operands(self, size)
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads: must divide d_model ({self.d_model}), got {self.n_heads}")
        if self.layer_norm_at == "pre" and not self.layer_norm:
            raise ValueError("layer_norm_at: \"pre\" places LayerNorms: needs layer_norm = true")

    def build(self, n_symbols: int, n_classes: int, n_inputs: int = 2) -> Model:
        """The model over `n_symbols` operands and `n_classes` answers (two operands per example)."""
        return transformer(self, n_symbols, n_classes)


@dataclass(frozen=True)
class GromovConfig:
    """Gromov 2023: one-hot (a, b) -> W1 -> x² -> W2, no biases, trained with MSE."""

    kind: str = "gromov"
    d_hidden: int = field(default=500, metadata=_POSITIVE)
    default_loss = "mse"  # what [train] loss = "auto" means for it (not a field: no annotation)

    def validate(self, size) -> None:
        """The rules between the model and its task's sizes: ValueError("KEY: what is wrong")."""
        _two_operands(self, size)

    def build(self, n_symbols: int, n_classes: int, n_inputs: int = 2) -> Model:
        """The model over `n_symbols` operands and `n_classes` answers (two operands per example)."""
        return gromov(self, n_symbols, n_classes)


MODELS = {"mlp": MLPConfig, "transformer": TransformerConfig, "gromov": GromovConfig}
for _kind, _cls in MODELS.items():
    registry.builtin("model", [_kind], _cls)


def _two_operands(cfg, size) -> None:
    if size.n_inputs != 2:
        raise ValueError(f"kind: {cfg.kind} reads two operands (a, b); the task's examples have "
                         f"{size.n_inputs} tokens: use a model registered for it")


def build(cfg, n_symbols: int, n_classes: int, n_inputs: int = 2) -> Model:
    """A built-in model of two operands, or a registered one (its own `build`, held to the contract)."""
    if registry.is_builtin(cfg):
        return cfg.build(n_symbols, n_classes, n_inputs)
    return registry.check_model(cfg, n_symbols, n_classes, n_inputs)


def n_params(params) -> int:
    """The number of parameters of a params pytree."""
    import jax

    return sum(x.size for x in jax.tree.leaves(params))


def _activation(name: str):
    import jax

    return {"relu": jax.nn.relu, "gelu": jax.nn.gelu, "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False)}[name]


def _uniform(key, shape, fan_in, bound=None):
    """PyTorch's nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases (or
    U(-bound, bound))."""
    import jax
    import jax.numpy as jnp

    bound = 1.0 / fan_in**0.5 if bound is None else bound
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


# ---------------------------------------------------------------------------------------------
# Embedding + MLP: two token embeddings, concatenated, one hidden layer.


def mlp(cfg, n_symbols: int, n_classes: int) -> Model:
    """The MLP of an MLPConfig over `n_symbols` operands and `n_classes` answers."""
    import jax
    import jax.numpy as jnp

    d, h = cfg.d_embed, cfg.d_hidden
    act = _activation(cfg.activation)

    tied, out_bias = getattr(cfg, "tie_embeddings", False), getattr(cfg, "output_bias", True)

    def init(key):
        k = jax.random.split(key, 6)
        params = {
            "embed_a": jax.random.normal(k[0], (n_symbols, d), jnp.float32),  # nn.Embedding: N(0, 1)
            "embed_b": jax.random.normal(k[1], (n_symbols, d), jnp.float32),
            "w1": _uniform(k[2], (2 * d, h), 2 * d),
            "b1": _uniform(k[3], (h,), 2 * d),
            "w2": _uniform(k[4], (h, n_classes), h),
            "b2": _uniform(k[5], (n_classes,), h),
        }
        if tied:  # one table for both operands; two d -> h maps, each with fan-in d (devinterp)
            del params["embed_b"]
            params["w1"], params["b1"] = _uniform(k[2], (2 * d, h), d), _uniform(k[3], (h,), d)
        if not out_bias:
            del params["b2"]
        return params

    def hidden(params, pairs):
        # concat(Ea[a], Eb[b]) @ W1 == (Ea @ W1[:d])[a] + (Eb @ W1[d:])[b]: project the n_symbols
        # embeddings once instead of the embeddings of all N pairs (N = n_symbols² here).
        proj_a = params["embed_a"] @ params["w1"][:d]
        proj_b = params["embed_a" if tied else "embed_b"] @ params["w1"][d:]
        return act(proj_a[pairs[:, 0]] + proj_b[pairs[:, 1]] + params["b1"])

    def apply(params, pairs):
        out = hidden(params, pairs) @ params["w2"]
        return out + params["b2"] if out_bias else out

    def embedding(params):
        return params["embed_a"] if tied else jnp.concatenate([params["embed_a"], params["embed_b"]], 1)

    return Model(
        init, apply,
        forward_flops=lambda n: 2 * (2 * n_symbols * d * h) + n * 2 * h * n_classes,
        activations=lambda n: 2 * n_symbols * h + n * (2 * h + n_classes),
        embedding=embedding,
        features=lambda params, pairs: (hidden(params, pairs), params["w2"]),
    )


def mlp_plain(params, pairs, activation="relu"):
    """The textbook form of `mlp`'s forward pass: the reference that the rewrite is tested against."""
    import jax.numpy as jnp

    x = jnp.concatenate([params["embed_a"][pairs[:, 0]], params["embed_b"][pairs[:, 1]]], axis=-1)
    hidden = _activation(activation)(x @ params["w1"] + params["b1"])
    return hidden @ params["w2"] + params["b2"]


# ---------------------------------------------------------------------------------------------
# Decoder-only transformer on "a b =" (Nanda et al. 2023; Power et al. 2022 with layer_norm; Lee et al. 2024).


def _layer_norm(x, scale, bias, eps=1e-5):
    import jax

    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias


def _transformer_init(cfg, n_symbols: int, n_classes: int, n_ctx: int, vocab: int):
    """init(key) of the transformer: Nanda et al.'s Gaussians, or PyTorch's defaults (cfg.init)."""
    import jax
    import jax.numpy as jnp

    d, H, m, L = cfg.d_model, cfg.n_heads, cfg.d_mlp, cfg.n_layers
    dh, torch = d // H, cfg.init == "torch"

    def init(key):
        # Nanda's draws keep their order and count (6 per layer): stored runs keep their initialization.
        keys = iter(jax.random.split(key, 3 + (8 if torch else 6) * L))
        normal = lambda shape, fan: jax.random.normal(next(keys), shape, jnp.float32) / fan**0.5  # noqa: E731
        linear = lambda shape, fan: _uniform(next(keys), shape, fan)  # noqa: E731
        # nn.MultiheadAttention's in_proj_weight [3d, d] is Xavier-uniform as one matrix.
        xavier = lambda shape: _uniform(next(keys), shape, d, bound=(6 / (d + 3 * d)) ** 0.5)  # noqa: E731
        params = {
            "embed": normal((vocab, d), 1 if torch else d),
            "pos": normal((n_ctx, d), 1 if torch else d),
            "unembed": linear((d, n_classes), d) if torch else normal((d, n_classes), vocab),
            "layers": [],
        }
        for _ in range(L):
            w = xavier if torch else (lambda shape: normal(shape, d))
            layer = {"wq": w((d, H, dh)), "wk": w((d, H, dh)), "wv": w((d, H, dh)),
                     "wo": linear((H, dh, d), d) if torch else normal((H, dh, d), d)}
            if torch:  # nn.Linear's weights and biases
                layer |= {"w_in": linear((d, m), d), "b_in": linear((m,), d),
                          "w_out": linear((m, d), m), "b_out": linear((d,), m)}
            else:
                layer |= {"w_in": normal((d, m), d), "b_in": jnp.zeros(m), "w_out": normal((m, d), d), "b_out": jnp.zeros(d)}
            if cfg.attention_bias:  # zero, as nn.MultiheadAttention sets them
                layer |= {"bq": jnp.zeros((H, dh)), "bk": jnp.zeros((H, dh)), "bv": jnp.zeros((H, dh)), "bo": jnp.zeros(d)}
            if cfg.layer_norm:
                layer |= {"ln1_s": jnp.ones(d), "ln1_b": jnp.zeros(d), "ln2_s": jnp.ones(d), "ln2_b": jnp.zeros(d)}
            params["layers"].append(layer)
        if cfg.layer_norm_at == "pre":
            params |= {"lnf_s": jnp.ones(d), "lnf_b": jnp.zeros(d)}
        return params

    return init


def transformer(cfg, n_symbols: int, n_classes: int) -> Model:
    """The transformer of a TransformerConfig over `n_symbols` operands and `n_classes` answers."""
    import jax
    import jax.numpy as jnp

    d, H, m, L = cfg.d_model, cfg.n_heads, cfg.d_mlp, cfg.n_layers
    dh = d // H
    op_token = getattr(cfg, "operator_token", False)
    pre = getattr(cfg, "layer_norm_at", "post") == "pre"
    bias = getattr(cfg, "attention_bias", False)
    # Tokens a, b and "=" (id n_symbols); with the operator, a, op (id n_symbols + 1), b and "=".
    n_ctx, vocab = (4, n_symbols + 2) if op_token else (3, n_symbols + 1)
    act = _activation(cfg.activation)
    causal = jnp.tril(jnp.ones((n_ctx, n_ctx), bool))

    def heads(x, layer, w):
        out = jnp.einsum("npd,dhk->nhpk", x, layer[w])
        return out + layer["b" + w[1]][:, None] if bias else out

    def block(layer, x, last_only):
        if pre:
            x = _layer_norm(x, layer["ln1_s"], layer["ln1_b"])
        # In the last layer only position "=" feeds the logits: compute its query and MLP alone.
        xq = x[:, -1:] if last_only else x
        q, k, v = heads(xq, layer, "wq"), heads(x, layer, "wk"), heads(x, layer, "wv")
        scores = jnp.einsum("nhqk,nhsk->nhqs", q, k) / dh**0.5
        scores = jnp.where(causal[-1:] if last_only else causal, scores, -jnp.inf)
        z = jnp.einsum("nhqs,nhsk->nhqk", jax.nn.softmax(scores, -1), v)
        attn = jnp.einsum("nhqk,hkd->nqd", z, layer["wo"])
        x = xq + (attn + layer["bo"] if bias else attn)
        if cfg.layer_norm and not pre:  # post-LN, as in Power et al.'s code
            x = _layer_norm(x, layer["ln1_s"], layer["ln1_b"])
        h = _layer_norm(x, layer["ln2_s"], layer["ln2_b"]) if pre else x
        x = x + act(h @ layer["w_in"] + layer["b_in"]) @ layer["w_out"] + layer["b_out"]
        if cfg.layer_norm and not pre:
            x = _layer_norm(x, layer["ln2_s"], layer["ln2_b"])
        return x

    def residual(params, pairs):
        # The residual stream at "=" after the last block (and its LayerNorm): what the unembedding reads.
        n = pairs.shape[0]
        eq = jnp.full((n, 1), n_symbols, pairs.dtype)
        if op_token:
            tokens = jnp.concatenate([pairs[:, :1], jnp.full((n, 1), n_symbols + 1, pairs.dtype), pairs[:, 1:], eq], 1)
        else:
            tokens = jnp.concatenate([pairs, eq], 1)
        x = params["embed"][tokens] + params["pos"]
        for i, layer in enumerate(params["layers"]):
            x = block(layer, x, last_only=i == L - 1)
        x = x[:, -1]
        return _layer_norm(x, params["lnf_s"], params["lnf_b"]) if pre else x

    def apply(params, pairs):
        return residual(params, pairs) @ params["unembed"]

    # Per pair, forward: QKV on n_ctx positions (in the last layer K, V on all, Q only at "="),
    # attention, O, MLP.
    c = n_ctx
    full = c * (3 * 2 * d * d) + 2 * 2 * c * c * d + c * 2 * d * d + c * 2 * 2 * d * m
    last = (2 * c + 1) * 2 * d * d + 2 * 2 * c * d + 2 * d * d + 2 * 2 * d * m
    return Model(
        _transformer_init(cfg, n_symbols, n_classes, n_ctx, vocab), apply,
        forward_flops=lambda n: n * ((L - 1) * full + last + 2 * d * n_classes),
        activations=lambda n: n * (L * n_ctx * (6 * d + 3 * H * n_ctx + 2 * m) + n_classes),
        embedding=lambda params: params["embed"][:n_symbols],  # without the "=" (and operator) token
        features=lambda params, pairs: (residual(params, pairs), params["unembed"]),
    )


# ---------------------------------------------------------------------------------------------
# Gromov 2023: one-hot (a, b) -> W1 -> x² -> W2, no biases.


def gromov(cfg, n_symbols: int, n_classes: int) -> Model:
    """Gromov's network of a GromovConfig over `n_symbols` operands and `n_classes` answers."""
    import jax
    import jax.numpy as jnp

    n = cfg.d_hidden

    def init(key):
        k1, k2 = jax.random.split(key)
        return {
            "w1": jax.random.normal(k1, (2 * n_symbols, n), jnp.float32) / (2 * n_symbols) ** 0.5,
            "w2": jax.random.normal(k2, (n, n_classes), jnp.float32) / n**0.5,
        }

    def hidden(params, pairs):
        # one_hot(a, b) @ W1 is a sum of two rows of W1: gather them instead of multiplying.
        pre = params["w1"][pairs[:, 0]] + params["w1"][n_symbols + pairs[:, 1]]
        return pre**2

    def apply(params, pairs):
        return hidden(params, pairs) @ params["w2"]

    return Model(
        init, apply,
        forward_flops=lambda pairs: pairs * 2 * n * n_classes,
        activations=lambda pairs: pairs * (2 * n + n_classes),
        # The first layer's rows for operand a beside those for operand b.
        embedding=lambda params: jnp.concatenate([params["w1"][:n_symbols], params["w1"][n_symbols:]], 1),
        features=lambda params, pairs: (hidden(params, pairs), params["w2"]),
    )
