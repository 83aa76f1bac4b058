"""The compiled program: batching, sharding, tracing, divergence, and that it truly groks."""

import jax
import numpy as np
import pytest

from jaxgrok import engine, train


def _curves(result):
    return np.stack([result.curves[m] for m in train.METRICS], -1)


def test_a_run_in_a_batch_equals_the_run_alone(tiny_sweep):
    """Bit for bit on CPU, where each device trains its runs one at a time with unbatched kernels."""
    sweep = tiny_sweep(train={"steps": 400, "eval_every": 50})
    one = jax.devices()[:1]
    batch = engine.train_sweep(sweep, devices=one)
    for i in (0, 4):
        alone = engine.train_sweep(sweep, index=[i], devices=one)
        np.testing.assert_array_equal(_curves(alone)[0], _curves(batch)[i])


def test_same_results_on_one_and_on_eight_devices(tiny_sweep):
    assert len(jax.devices()) == 8, "conftest asks for 8 CPU devices"
    # 11 runs: not a multiple of 8, so the last shard is padded.
    sweep = tiny_sweep(sweep={"seed": {"count": 11}, "weight_decay": 1.0, "learning_rate": 1e-2, "train_fraction": 0.5})
    single = engine.train_sweep(sweep, devices=jax.devices()[:1])
    sharded = engine.train_sweep(sweep)
    assert sharded.curves["val_acc"].shape == (11, 4)
    np.testing.assert_array_equal(_curves(sharded), _curves(single))
    for key in ("t_train", "t_val", "phase"):
        np.testing.assert_array_equal(sharded.outcomes[key], single.outcomes[key])


def test_vmapped_runs_match_runs_one_at_a_time(tiny_sweep):
    """The accelerator path (all of a device's runs in one vmapped kernel), checked on CPU. Batched
    kernels round differently in the last bit and training amplifies that step by step, so the
    comparison is over 20 steps (by step 50 one run is 2e-4 apart); a mix-up of runs or of their
    hyperparameters would differ by O(1)."""
    sweep = tiny_sweep(train={"steps": 20, "eval_every": 10})
    mapped = engine.train_sweep(sweep)
    vmapped = engine.train_sweep(sweep, vectorize=True)
    np.testing.assert_allclose(_curves(vmapped), _curves(mapped), rtol=1e-5, atol=1e-6)


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
    np.testing.assert_array_equal(_curves(both)[0], _curves(healthy)[0])


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


def test_no_warm_up_trains_at_the_full_learning_rate(tiny_sweep):
    """warmup_steps = 0 once meant optax's linear schedule over 0 steps: a learning rate of 0 forever."""
    result = engine.train_sweep(tiny_sweep(train={"steps": 100, "eval_every": 50, "warmup_steps": 0}))
    # Untrained, the loss is above ln 31 ≈ 3.4; 50 steps at lr 1e-2 memorise most of the training set.
    assert (result.curves["train_loss"][:, 0] < 1.0).all() and (result.curves["train_acc"][:, 0] > 0.9).all()
