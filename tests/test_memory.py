"""Batches sized to the device's memory, and a batch that still runs out of it halved, with nothing lost."""

import jax
import numpy as np
import pytest
from conftest import make_raw

from jaxgrok import engine, memory, train
from jaxgrok.cli import main
from jaxgrok.store import Store
from jaxgrok.sweep import sweep_from_dict

SWEEP = {"seed": {"count": 24}, "weight_decay": 1.0, "learning_rate": 1e-2, "train_fraction": 0.5}
OFF = {"dist_from_init": False, "fourier": False, "circularity": False, "restricted_loss": False}  # faster compiles


def _curves(result):
    return np.stack([result.curves[m] for m in train.METRICS], -1)


def _bytes_for(sweep, runs_per_device: int) -> int:
    """What XLA says a batch of `runs_per_device` runs on each of the 8 devices needs."""
    program = train.make_program(sweep.static)
    init, chunk = memory.compile_batch(program, 8 * runs_per_device)
    return memory.batch_bytes(init, chunk, memory.metrics_bytes(program, runs_per_device))


@pytest.fixture(scope="module")
def sweep():
    return sweep_from_dict(make_raw(train={"steps": 100, "eval_every": 50, "chunk_steps": 50}, sweep=SWEEP, measures=OFF),
                           "tiny.toml")


@pytest.fixture(scope="module")
def reference(sweep):
    return engine.train_sweep(sweep)  # all 24 runs in one batch: the budget is 40% of host RAM


@pytest.fixture(scope="module")
def budget(sweep):
    return int(_bytes_for(sweep, 2) * 1.02)  # room for 2 runs per device, not for 3


def test_batches_are_sized_from_what_xla_says_the_program_needs(sweep, reference, budget, monkeypatch):
    monkeypatch.setenv("JAXGROK_MEMORY_BUDGET", str(budget))
    program = train.make_program(sweep.static)
    # The analytic estimate is generous: alone it would put fewer runs in a batch.
    assert memory.runs_per_batch(sweep.static, program, 24, budget) < 16
    result = engine.train_sweep(sweep)
    assert result.runs_per_batch == 16 and result.batch_bytes <= budget
    assert reference.runs_per_batch == 24
    np.testing.assert_array_equal(_curves(result), _curves(reference))  # 2 batches, same runs, same bits


def test_a_batch_that_runs_out_of_memory_is_halved_and_nothing_is_lost(sweep, reference, budget, monkeypatch, tmp_path):
    """XLA's out-of-memory error cannot be provoked on a CPU: the compiled chunk is wrapped so that
    the second batch of 16 runs fails as it would on a GPU, after the first batch was written."""
    monkeypatch.setenv("JAXGROK_MEMORY_BUDGET", str(budget))
    real_compile, sizes, calls = memory.compile_batch, [], {"n": 0}

    def compile_failing_at_16(program, per_batch):
        init, chunk = real_compile(program, per_batch)
        sizes.append(per_batch)

        def failing(state, hp, first_eval):
            calls["n"] += 1
            if per_batch == 16 and calls["n"] == 3:  # the second batch's first chunk (2 chunks a batch)
                raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.2GiB")
            return chunk(state, hp, first_eval)

        failing.memory_analysis = chunk.memory_analysis
        return init, failing

    monkeypatch.setattr(memory, "compile_batch", compile_failing_at_16)
    store = Store(tmp_path / "out", sweep)
    result = engine.train_sweep(sweep, store=store)
    assert sizes[-2:] == [16, 8]  # sized at 16 per batch (after probing sizes), then halved once
    assert result.runs_per_batch == 8
    order = np.argsort(result.index)
    assert list(result.index[order]) == list(range(24))  # every run once: none lost, none twice
    np.testing.assert_array_equal(_curves(result)[order], _curves(reference))
    store.merge()
    assert len(store.pending(np.arange(24))) == 0


def test_an_error_that_is_not_out_of_memory_is_raised(sweep, monkeypatch):
    real_compile = memory.compile_batch

    def broken(program, per_batch):
        init, chunk = real_compile(program, per_batch)

        def failing(*args):
            raise jax.errors.JaxRuntimeError("INTERNAL: something else")

        failing.memory_analysis = chunk.memory_analysis
        return init, failing

    monkeypatch.setattr(memory, "compile_batch", broken)
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        engine.train_sweep(sweep)


def test_a_run_larger_than_the_budget_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    path = tmp_path / "s.toml"
    path.write_text('name = "s"\npaper = "test"\n[task]\nop = "x+y"\np = 31\n[model]\nkind = "mlp"\n'
                    '[train]\nsteps = 100\neval_every = 50\n'
                    '[sweep]\nweight_decay = 1.0\nlearning_rate = 1e-2\ntrain_fraction = 0.5\n')
    monkeypatch.setenv("JAXGROK_MEMORY_BUDGET", "1000")
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and "one run needs" in err and "1000 B" in err
    monkeypatch.setenv("JAXGROK_MEMORY_BUDGET", "lots")
    assert main(["run", str(path), "--out", str(tmp_path / "out2"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "JAXGROK_MEMORY_BUDGET" in err and "'lots'" in err
    assert not (tmp_path / "out2").exists()


def test_a_checkpoint_of_another_batch_size_is_not_restored(sweep):
    """After a halving, a checkpoint holds arrays for 8 runs: a batch of 16 cannot take them back."""

    class Saved:
        cleared = False

        def __init__(self, saved_batch):
            self.saved_batch = saved_batch

        def pending(self, index):
            return index

        manager = type("Manager", (), {"directory": "checkpoints"})

        def checkpointed_batch(self):
            return {"run_hashes": [sweep.run_hashes[i] for i in (3, 4)], "steps_done": 100,
                    "runs_per_batch": self.saved_batch}

        def clear_checkpoints(self):
            self.cleared = True

        def done_hashes(self):
            return set()

        def carry_over(self, index):
            return 0, {}

    index = np.arange(24)
    for saved_batch, resumed in ((16, True), (8, False)):
        store = Saved(saved_batch)
        batches, resume = engine._plan(sweep, index, 16, store)
        assert resume == resumed and store.cleared == (not resumed)
        assert sorted(np.concatenate(batches).tolist()) == list(range(24))  # every run planned once
        if resumed:
            assert batches[0].tolist() == [3, 4]
