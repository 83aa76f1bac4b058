"""Tests that guard the design of the training program (equinox's and big_vision's habits): strict
dtype promotion and no hidden host transfer inside a chunk (one trace per sweep: test_engine)."""

import jax
import numpy as np
import pytest

from jaxgrok import train

CONFIGS = {
    "mlp_llc": {"measures": {"llc": True, "llc_every": 1, "llc_draws": 4}},
    "minibatch_adam_grokfast": {"train": {"batch_size": 32, "optimizer": "adam"},
                                "sweep": {"seed": [0, 1], "grokfast_lambda": [0.0, 2.0], "weight_decay": 1.0,
                                          "learning_rate": 1e-2, "train_fraction": 0.5}},
    "transformer_ln": {"model": {"kind": "transformer", "d_model": 32, "n_heads": 4, "d_mlp": 64, "layer_norm": True}},
    "gromov_sgd_bf16": {"model": {"kind": "gromov", "d_hidden": 32}, "train": {"optimizer": "sgd", "precision": "bfloat16"}},
}


def _chunk_twice(sweep, guard: bool = False):
    """Init and two chunks of every run on one device; the second under the transfer guard."""
    program = train.make_program(sweep.static, devices=jax.devices()[:1])
    hp = jax.device_put(train.hparams_for(sweep, np.arange(sweep.n_runs)), program.sharding)
    first, second = (jax.device_put(train.first_evals(sweep.n_runs, e), program.sharding)
                     for e in (0, program.evals_per_chunk))
    state, m0 = program.chunk(program.init(hp), hp, first)
    m0 = np.asarray(m0)
    if guard:  # any implicit host<->device copy inside the chunk is an error here
        with jax.transfer_guard("disallow"):
            state, m1 = program.chunk(state, hp, second)
            jax.block_until_ready(m1)
    else:
        state, m1 = program.chunk(state, hp, second)
    return np.concatenate([m0, np.asarray(m1)], 1)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_program_traces_under_strict_dtype_promotion_and_computes_the_same(tiny_sweep, name):
    """No implicit promotion in jaxgrok's arithmetic (optax's own is run under standard promotion,
    optim._promoted_as_optax_expects); the curves are bit for bit those of the standard mode."""
    sweep = tiny_sweep(**CONFIGS[name])
    standard = _chunk_twice(sweep)
    with jax.numpy_dtype_promotion("strict"):
        strict = _chunk_twice(sweep)
    np.testing.assert_array_equal(strict, standard)


def test_a_chunk_makes_no_host_transfer(tiny_sweep):
    sweep = tiny_sweep(measures={"llc": True, "llc_every": 2, "llc_draws": 4})
    metrics = _chunk_twice(sweep, guard=True)
    assert np.isfinite(metrics[..., train.METRICS.index("val_acc")]).all()

