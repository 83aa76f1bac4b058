"""The compiled program: batching, sharding, tracing, divergence, and that it truly groks."""

import jax
import numpy as np
import pytest

from jaxgrok import engine, train


def _curves(result):
    return np.stack([result.curves[m] for m in train.METRICS], -1)


def test_a_run_in_a_batch_equals_the_run_alone(tiny_sweep):
    """Within 1e-6 over 50 steps. XLA picks its CPU kernels by the batch's shape (a batch of one
    is squeezed into an unbatched matmul), and they round differently in the last bit; training
    amplifies such differences step by step, so no fixed tolerance holds over thousands of steps."""
    sweep = tiny_sweep(train={"steps": 50, "eval_every": 25})
    one = jax.devices()[:1]
    batch = engine.train_sweep(sweep, devices=one)
    for i in (0, 4):
        alone = engine.train_sweep(sweep, index=[i], devices=one)
        np.testing.assert_allclose(_curves(alone)[0], _curves(batch)[i], rtol=1e-6, atol=1e-6)
        pair = engine.train_sweep(sweep, index=[i, 5 - i], devices=one)
        np.testing.assert_allclose(_curves(pair)[0], _curves(batch)[i], rtol=1e-6, atol=1e-6)


def test_same_results_on_one_and_on_eight_devices(tiny_sweep):
    assert len(jax.devices()) == 8, "conftest asks for 8 CPU devices"
    # 11 runs: not a multiple of 8, so the last shard is padded. 50 steps: see the test above.
    sweep = tiny_sweep(train={"steps": 50, "eval_every": 25},
                       sweep={"seed": {"count": 11}, "weight_decay": 1.0, "learning_rate": 1e-2, "train_fraction": 0.5})
    single = engine.train_sweep(sweep, devices=jax.devices()[:1])
    sharded = engine.train_sweep(sweep)
    assert sharded.curves["val_acc"].shape == (11, 2)
    # Per device the batch is 2 runs, not 11: other kernels, other last bits (the test above).
    # Measured worst case after 50 steps: 4e-6 relative, on a memorising run's validation loss.
    # A sharding mistake (mixed-up or dropped runs) would differ by O(1).
    np.testing.assert_allclose(_curves(sharded), _curves(single), rtol=1e-5, atol=1e-6)
    for key in ("t_train", "censored", "phase"):
        np.testing.assert_array_equal(sharded.outcomes[key], single.outcomes[key])


def test_the_chunk_is_traced_once_per_sweep(tiny_sweep):
    # 4 chunks per batch and 2 batches (8 runs per batch, 11 runs): one trace, one compile.
    sweep = tiny_sweep(train={"steps": 400, "eval_every": 50, "chunk_steps": 100, "max_runs_per_batch": 8},
                       sweep={"seed": {"count": 11}, "weight_decay": 1.0, "learning_rate": 1e-2, "train_fraction": 0.5})
    train.TRACES.clear()
    result = engine.train_sweep(sweep)
    assert train.TRACES["chunk"] == 1
    assert np.isfinite(result.curves["val_acc"]).all() and result.curves["val_acc"].shape == (11, 8)


def test_divergence_stays_local(tiny_sweep):
    sweep = tiny_sweep(sweep={"seed": 0, "weight_decay": 1.0, "learning_rate": [1e-2, 1e30], "train_fraction": 0.5})
    both = engine.train_sweep(sweep)
    healthy = engine.train_sweep(sweep, index=[0])
    assert list(both.outcomes["diverged"]) == [False, True]
    assert np.isnan(both.curves["val_loss"][1, -1]) and both.outcomes["censored"][1]
    np.testing.assert_allclose(_curves(both)[0], _curves(healthy)[0], rtol=1e-6, atol=1e-6)


def test_minibatches_train_too(tiny_sweep):
    sweep = tiny_sweep(train={"steps": 200, "eval_every": 50, "batch_size": 128})
    result = engine.train_sweep(sweep)
    assert (result.curves["train_acc"][:, -1] > result.curves["train_acc"][:, 0]).all()


@pytest.mark.parametrize("model,task", [
    ({"kind": "transformer", "d_model": 32, "n_heads": 4, "d_mlp": 64}, {"op": "x-y", "p": 11}),
    ({"kind": "transformer", "n_layers": 2, "d_model": 32, "d_mlp": 64, "layer_norm": True}, {"op": "x/y", "p": 11}),
    ({"kind": "gromov", "d_hidden": 64}, {"op": "x*y", "p": 11}),
    ({"kind": "mlp", "d_embed": 8, "d_hidden": 16}, {"op": "s5"}),
])
def test_every_model_and_task_trains(tiny_sweep, model, task):
    sweep = tiny_sweep(model=model, task=task, train={"steps": 100, "eval_every": 50},
                       sweep={"seed": [0, 1], "weight_decay": 1.0, "learning_rate": 3e-3, "train_fraction": 0.5})
    result = engine.train_sweep(sweep)
    loss = result.curves["train_loss"]
    assert np.isfinite(loss).all() and (loss[:, -1] < loss[:, 0]).all()


def test_a_small_configuration_truly_groks(tiny_sweep):
    """Train accuracy reaches 1 early; validation reaches ≥ 0.99 much later."""
    sweep = tiny_sweep(train={"steps": 2000, "eval_every": 25, "chunk_steps": 500},
                       sweep={"seed": {"count": 4}, "weight_decay": 1.0, "learning_rate": 1e-2, "train_fraction": 0.6})
    result = engine.train_sweep(sweep)
    o = result.outcomes
    grokked = ~o["censored"]
    assert grokked.sum() >= 3, o["t_val"]
    assert (o["t_train"][grokked] <= 200).all()
    assert (o["t_val"][grokked] >= 4 * o["t_train"][grokked]).all()
    early = result.steps <= 200
    assert (result.curves["val_acc"][grokked][:, early] < 0.5).all()  # memorised, not generalised
    assert (result.curves["val_acc"][grokked, -1] >= 0.99).all()
