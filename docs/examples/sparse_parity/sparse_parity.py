"""Sparse parity (Barak et al. 2022), registered with jaxgrok: a task that is not modular arithmetic.

An example is an n-bit string; its label is the parity (XOR) of k of its bits. Barak et al. train a
one-hidden-layer ReLU MLP on the bits as ±1 with minibatch SGD; on a fixed training sample the network
fits the training set long before it finds the k bits, and then generalises abruptly: grokking
without modular arithmetic (Merrill et al. 2023, "A tale of two circuits", n = 40, k = 3, 1000
training samples). jaxgrok finds both classes through this package's entry points (pyproject.toml);
in a notebook, the two decorators register them instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

import jaxgrok


@jaxgrok.register_task("sparse_parity")
@dataclass(frozen=True)
class SparseParity:
    """`n_samples` distinct n-bit strings drawn with `seed`; the label is the XOR of the first k bits
    (which k bits does not matter to a model that treats its inputs alike)."""

    n_bits: int = 40
    k: int = 3
    n_samples: int = 2000
    seed: int = 0

    def __post_init__(self):
        if not 1 <= self.k <= self.n_bits <= 62:
            raise ValueError(f"k, n_bits: need 1 ≤ k ≤ n_bits ≤ 62, got k = {self.k}, n_bits = {self.n_bits}")
        if not 2 <= self.n_samples <= min(2**self.n_bits, 10**7):
            raise ValueError(f"n_samples: between 2 and min(2^n_bits, 10^7), got {self.n_samples}")

    def table(self) -> jaxgrok.Table:
        rng = np.random.default_rng(self.seed)
        codes = rng.choice(2**self.n_bits, self.n_samples, replace=False)  # distinct strings
        bits = (codes[:, None] >> np.arange(self.n_bits)) & 1
        parity = bits[:, : self.k].sum(1) % 2
        return jaxgrok.Table(inputs=bits.astype(np.int32), targets=parity.astype(np.int32), n_symbols=2, n_classes=2)


@jaxgrok.register_model("parity_mlp")
@dataclass(frozen=True)
class ParityMLP:
    """Barak et al.'s network: the bits as ±1, one ReLU hidden layer of `width`, one logit per class;
    PyTorch's nn.Linear initialization."""

    width: int = 1000

    def __post_init__(self):
        if self.width < 1:
            raise ValueError(f"width: must be ≥ 1, got {self.width}")

    def build(self, n_symbols: int, n_classes: int, n_inputs: int) -> jaxgrok.Model:
        if n_symbols != 2:
            raise ValueError(f"parity_mlp reads bits: the task must have 2 symbols, not {n_symbols}")
        w = self.width

        def uniform(key, shape, fan_in):
            return jax.random.uniform(key, shape, jnp.float32, -(fan_in**-0.5), fan_in**-0.5)

        def init(key):
            k = jax.random.split(key, 4)
            return {"w1": uniform(k[0], (n_inputs, w), n_inputs), "b1": uniform(k[1], (w,), n_inputs),
                    "w2": uniform(k[2], (w, n_classes), w), "b2": uniform(k[3], (n_classes,), w)}

        def apply(params, inputs):
            x = 2.0 * inputs.astype(jnp.float32) - 1.0  # bits {0, 1} -> {-1, +1}
            return jax.nn.relu(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]

        return jaxgrok.Model(
            init, apply,
            forward_flops=lambda n: 2 * n * w * (n_inputs + n_classes),
            activations=lambda n: n * (n_inputs + 2 * w + n_classes),
        )
