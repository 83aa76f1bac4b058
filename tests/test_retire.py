"""Retiring grokked runs and refilling their slots ([train] stop_after_grokking): a run's arithmetic
stays its own whether it trained alone, from the start of a batch, or in a slot another run left."""

import signal

import jax
import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import make_raw

from jaxgrok import engine, grokking, pipeline
from jaxgrok.store import Interrupted, Store
from jaxgrok.sweep import SweepError, sweep_from_dict

WINDOW = 100  # steps validation must stay at the threshold after t_val


def raw(stop=WINDOW, seeds=8, **train_keys):
    """Quick-grokking runs (about half grok within the budget), 2 devices of 2 slots each."""
    return make_raw(train={"steps": 2500, "eval_every": 50, "chunk_steps": 250, "max_runs_per_batch": 2,
                           "stop_after_grokking": stop, **train_keys},
                    sweep={"seed": {"count": seeds}, "weight_decay": 1.0, "learning_rate": 1e-2,
                           "train_fraction": 0.6})


def train_(sweep, index=None, n_devices=2, store=None):
    return engine.train_sweep(sweep, index=index, devices=jax.devices()[:n_devices], store=store)


def by_run(result):
    """run -> (curves [evals, M] to the run's end, its outcomes)."""
    ends = np.isfinite(result.curves["train_loss"]).sum(1)
    return {int(r): ({m: c[i, :ends[i]] for m, c in result.curves.items()},
                     {k: v[i] for k, v in result.outcomes.items()}) for i, r in enumerate(result.index)}


@pytest.fixture(scope="module")
def trained():
    """The sweep with retiring (2 slots, so that 6 of its 8 runs start in slots that others left) and
    without it."""
    retiring, fixed = sweep_from_dict(raw(), "r.toml"), sweep_from_dict(raw(stop=0), "f.toml")
    return retiring, train_(retiring), train_(fixed)


def test_the_rule_retires_after_the_window_and_never_before_grokking():
    nan = np.nan
    val = np.array([[0, 0, 1, 1, 1, 1, 1, 1],   # t_val at evaluation 2: retires at 4 (window 2 evaluations)
                    [0, 1, 1, 0, 1, 1, 1, 1],   # a streak that broke: the next one counts
                    [0, 0, 0, 0, 0, 0, 0, 0],   # never grokked: never retired
                    [0, 1, nan, nan, 0, 0, 0, 0],  # diverged at evaluation 2: at once
                    [0, 0, 0, 0, 0, 0, 1, 1]])  # grokking, but the window not over: trains on
    losses = np.where(np.isnan(val), nan, 0.0)
    keep = grokking.retire(val, losses, np.full(5, 8), 50, 0.99, 100)
    assert keep.tolist() == [5, 7, 0, 3, 0]
    # Only the evaluations done count: the first run, 4 evaluations in, has not finished its window.
    assert grokking.retire(val, losses, np.full(5, 4), 50, 0.99, 100).tolist() == [0, 0, 0, 3, 0]
    # A window not a multiple of eval_every is rounded up to the next evaluation.
    assert grokking.retire(val, losses, np.full(5, 8), 50, 0.99, 60)[0] == 5


def test_a_run_is_the_same_alone_in_a_fresh_batch_and_in_a_refilled_slot(trained):
    sweep, retiring, fixed = trained
    got, full = by_run(retiring), by_run(fixed)
    assert sorted(got) == list(range(8))
    refilled = [int(r) for r in retiring.index[2:]]  # finished after the first two: started in a left slot
    retired = [r for r in got if np.isfinite(retiring.stopped_at[list(retiring.index).index(r)])]
    assert retired, "no run retired: the fixture no longer groks within its budget"
    assert 0 < len(retired) < 8  # some censored runs too
    alone = {r: by_run(train_(sweep, index=[r], n_devices=1))[r] for r in (retired[0], refilled[-1])}
    for r, (curves, outcomes) in got.items():
        end = len(curves["train_loss"])
        for m in curves:  # the same arithmetic as without retiring, up to where it retired
            np.testing.assert_array_equal(curves[m], full[r][0][m][:end], err_msg=f"run {r} {m}")
            if r in alone:
                np.testing.assert_array_equal(curves[m], alone[r][0][m], err_msg=f"run {r} {m} alone")
        if r not in retired:  # a run that did not retire trained its whole budget
            assert end == 2500 // 50
            assert outcomes["censored"] == full[r][1]["censored"]
        else:
            assert outcomes["t_val"] == full[r][1]["t_val"] or _falls_back(full[r][0]["val_acc"], end)
            assert end - 1 == (outcomes["t_val"] + WINDOW) // 50 - 1  # the window, on the evaluation grid


def _falls_back(val_acc, end) -> bool:
    """Validation accuracy drops below the threshold after the window (then t_val differs by definition)."""
    return bool((val_acc[end:] < 0.99).any())


def test_a_censored_run_is_never_retired(trained):
    _, retiring, fixed = trained
    for i, r in enumerate(retiring.index):
        if retiring.outcomes["censored"][i]:
            assert np.isnan(retiring.stopped_at[i])
            j = list(fixed.index).index(r)
            np.testing.assert_array_equal(retiring.curves["val_acc"][i], fixed.curves["val_acc"][j])


def test_retiring_trains_fewer_model_steps(trained):
    _, retiring, fixed = trained
    assert fixed.trained_steps == 8 * 2500
    assert retiring.trained_steps < fixed.trained_steps


def test_off_keeps_every_run_hash():
    with_key = sweep_from_dict(raw(stop=0), "a.toml")
    without = sweep_from_dict(make_raw(train={"steps": 2500, "eval_every": 50, "chunk_steps": 250, "max_runs_per_batch": 2},
                                       sweep={"seed": {"count": 8}, "weight_decay": 1.0, "learning_rate": 1e-2,
                                              "train_fraction": 0.6}), "b.toml")
    assert with_key.run_hashes == without.run_hashes
    on = sweep_from_dict(raw(), "c.toml")
    assert not set(on.run_hashes) & set(without.run_hashes)  # retired curves end early: other results
    higher = sweep_from_dict({**raw(), "grokking": {"threshold": 0.95}}, "d.toml")
    assert not set(higher.run_hashes) & set(on.run_hashes)  # the threshold decides where they end


def test_a_negative_window_is_refused_in_one_line():
    with pytest.raises(SweepError, match=r"train.stop_after_grokking: must be ≥ 0"):
        sweep_from_dict(raw(stop=-1), "bad.toml")


def test_interrupted_with_retiring_and_refilling_resumes_bit_identically(tmp_path, trained, capsys):
    sweep, retiring, _ = trained
    out = tmp_path / "out"
    for after in (3, 7):  # stop twice: in the first slots' runs, then after some have retired
        store = Store(out, sweep, checkpoint_every=100)
        seen = []

        def on_chunk(progress, store=store, seen=seen, after=after):
            if progress.compiled_s is None:
                seen.append(progress)
                if len(seen) == after:
                    store.stop_signal = signal.SIGTERM

        with pytest.raises(Interrupted):
            engine.train_sweep(sweep, devices=jax.devices()[:2], store=store, on_chunk=on_chunk)
    store = Store(out, sweep)
    train_(sweep, store=store)
    store.merge()
    runs, curves = pq.read_table(out / "runs.parquet"), pq.read_table(out / "curves.parquet")
    expect = by_run(retiring)
    assert runs.num_rows == 8
    ids = curves.column("run_id").to_numpy()
    for r in range(8):
        mine = curves.filter(ids == r)
        for m in ("val_acc", "train_loss", "weight_norm"):
            np.testing.assert_array_equal(mine.column(m).to_numpy(), expect[r][0][m], err_msg=f"run {r} {m}")
    stopped = runs.column("stopped_at").to_numpy(zero_copy_only=False)
    want = retiring.stopped_at[np.argsort(retiring.index)]
    np.testing.assert_array_equal(np.nan_to_num(np.asarray(stopped, float), nan=-1), np.nan_to_num(want, nan=-1))
    # The merged files: each run's curves end at its stopped_at (or the budget), WINDOW after its t_val.
    steps = curves.column("step").to_numpy()
    for r, stop, t_val in zip(*(runs.column(c).to_pylist() for c in ("run_id", "stopped_at", "t_val")), strict=True):
        assert steps[ids == r].max() == (stop if stop is not None else 2500)
        assert stop is None or stop == t_val + WINDOW
    # --dry-run estimates what retiring trains from the grokking times in DIR: here, exactly what it did.
    capsys.readouterr()
    pipeline.run(sweep, out=out, dry_run=True)
    assert f"about {retiring.trained_steps:,} (" in capsys.readouterr().out


def test_a_run_that_retired_diverged_is_diverged_and_censored():
    """Retired at its first non-finite evaluation: diverged, censored, never given a t_val."""
    nan = np.nan
    curves = {"val_acc": np.array([[0.1, 0.2, nan, nan, nan], [0.1, 1.0, 1.0, 1.0, nan]]),
              "train_acc": np.array([[0.5, 1.0, nan, nan, nan], [1.0, 1.0, 1.0, 1.0, nan]]),
              "train_loss": np.array([[1.0, 0.5, nan, nan, nan], [0.1, 0.1, 0.1, 0.1, nan]]),
              "val_loss": np.array([[1.0, 0.9, nan, nan, nan], [0.1, 0.1, 0.1, 0.1, nan]])}
    ends = grokking.retire(curves["val_acc"], curves["train_loss"] + curves["val_loss"], np.array([5, 5]), 10, 0.99, 20)
    assert ends.tolist() == [3, 4]

    class Cfg:
        threshold, phase_accuracy, phase_gap = 0.99, 0.9, 1000

    out = grokking.analyse(curves, np.arange(1, 6) * 10, Cfg, ends)
    assert out["diverged"].tolist() == [True, False] and out["censored"].tolist() == [True, False]
    assert np.isnan(out["t_val"][0]) and out["t_val"][1] == 20
