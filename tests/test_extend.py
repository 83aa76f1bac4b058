"""A raised budget: runs continue from their stored final state (or, retired, are kept as they are)
and end equal to a fresh sweep at the new budget."""

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import make_raw

from jaxgrok import engine, pipeline, train
from jaxgrok.store import Store
from jaxgrok.sweep import SweepError, sweep_from_dict

N = 4  # runs: at 1,000 steps two have grokked and two not


def sweep(steps, stop=0):
    """Quick runs; chunks of 300 steps, so a budget of 1,000 ends inside a chunk of the larger one."""
    return sweep_from_dict(make_raw(train={"steps": steps, "eval_every": 50, "chunk_steps": 300, "stop_after_grokking": stop},
                                    sweep={"seed": {"count": N}, "weight_decay": 1.0, "learning_rate": 1e-2,
                                           "train_fraction": 0.6}), "s.toml")


def run(s, out):
    pipeline.run(s, out=out, quiet=True, analyze=False)
    return pq.read_table(out / "runs.parquet"), pq.read_table(out / "curves.parquet")


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """(steps, stop) -> the files of a fresh sweep at that budget (each trained once)."""
    cache = {}

    def get(steps, stop=0):
        if (steps, stop) not in cache:
            cache[steps, stop] = run(sweep(steps, stop), tmp_path_factory.mktemp("fresh"))
        return cache[steps, stop]
    return get


@pytest.mark.parametrize("stop", [0, 150])
def test_a_raised_budget_continues_and_equals_a_fresh_sweep(tmp_path, stop, fresh):
    small = run(sweep(1000, stop), tmp_path / "out")
    censored = np.array(small[0].column("censored").to_pylist())
    assert censored.any() and not censored.all()  # grokked and censored runs alike
    assert list((tmp_path / "out" / "parts").glob("state-*.npz"))  # final states kept for a larger budget
    # A run that grokked early enough is retired by step 1,000 (here one is; which, the rounding decides):
    # it is kept as it is; every other run continues from its state at 1,000.
    retired = np.array([s is not None for s in small[0].column("stopped_at").to_pylist()])
    assert stop or not retired.any()
    store = Store(tmp_path / "out", sweep(2500, stop))
    kept, continued = store.carry_over(np.arange(N))
    assert kept == retired.sum() and sorted(continued) == np.flatnonzero(~retired).tolist()
    assert set(continued.values()) == {1000 // 50}
    result = engine.train_sweep(sweep(2500, stop), store=store)
    store.merge()
    want = fresh(2500, stop)
    ends = want[0].column("stopped_at").fill_null(2500).to_numpy()
    assert result.trained_steps == (ends[~retired] - 1000).sum()  # from step 1,000 on, not from 0
    extended = pq.read_table(tmp_path / "out" / "runs.parquet"), pq.read_table(tmp_path / "out" / "curves.parquet")
    assert extended[0].equals(want[0]) and extended[1].equals(want[1])


def test_retired_runs_are_kept_as_they_are(tmp_path, fresh):
    first = run(sweep(1500, 200), tmp_path / "out")
    stopped = first[0].column("stopped_at").to_pylist()
    assert 0 < sum(s is not None for s in stopped) < N  # some retired within 1,500 steps, some not
    store = Store(tmp_path / "out", sweep(2500, 200))
    kept, continued = store.carry_over(np.arange(N))
    assert kept == sum(s is not None for s in stopped) and len(continued) == N - kept
    extended, want = run(sweep(2500, 200), tmp_path / "out"), fresh(2500, 200)
    assert extended[0].equals(want[0]) and extended[1].equals(want[1])


def test_a_damaged_state_trains_its_runs_from_step_0(tmp_path, capfd, fresh):
    run(sweep(1000), tmp_path / "out")
    for path in (tmp_path / "out" / "parts").glob("state-*.npz"):
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF  # a flipped bit inside a member: its CRC-32 no longer matches
        path.write_bytes(bytes(data))
    extended = run(sweep(2500), tmp_path / "out")
    assert "unreadable" in capfd.readouterr().err
    want = fresh(2500)
    assert extended[0].equals(want[0]) and extended[1].equals(want[1])


def test_a_budget_the_training_depends_on_refuses_to_extend(tmp_path, monkeypatch):
    run(sweep(1000), tmp_path / "out")
    monkeypatch.setattr(train, "depends_on_budget", lambda static: True)
    with pytest.raises(SweepError, match=r"train.steps: raised to 2,500, but this sweep's training depends on its budget"):
        Store(tmp_path / "out", sweep(2500)).carry_over(np.arange(N))
