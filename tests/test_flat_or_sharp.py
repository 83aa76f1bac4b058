"""The flat-or-sharp table on curves whose answer is known: a measure that doubles from memorisation to
after grokking in every run, one that halves, runs that never grokked counted and not compared."""

import numpy as np
import pyarrow as pa

from jaxgrok.analysis import curvature


def _runs_and_curves(n=12, evals=40, every=10):
    rng = np.random.default_rng(0)
    t_train = np.full(n, 50.0)
    t_val = rng.integers(10, 20, n) * every * 1.0
    censored = np.arange(n) >= n - 2  # two runs never grok
    cols = {"run_id": np.arange(n), "seed": np.arange(n), "data_seed": np.arange(n), "batch_seed": np.arange(n),
            "noise_seed": np.zeros(n, int), "weight_decay": np.where(np.arange(n) % 2, 1.0, 2.0), "t_train": t_train,
            "t_val": np.where(censored, np.nan, t_val), "censored": censored}
    steps = np.arange(1, evals + 1) * every
    base = rng.uniform(1, 2, n)[:, None]
    after = steps[None, :] >= (np.where(censored, np.inf, t_val)[:, None] + 5 * every)
    sharp = np.where(after, 2 * base, base)  # doubles once grokked
    flat = np.where(after, base / 2, base)
    measured = (np.arange(evals) % 3 == 0)[None, :]  # a cadence: every third evaluation
    table = {"run_id": np.repeat(np.arange(n), evals).astype(np.int32), "step": np.tile(steps, n).astype(np.int64)}
    for name, values in (("hessian_max", sharp), ("precond_sharpness", flat)):
        table[name] = pa.array(np.where(measured, values, np.nan).ravel(), mask=~np.broadcast_to(measured, values.shape).ravel())
    return cols, pa.table(table)


def test_a_measure_that_doubles_and_one_that_halves():
    cols, curves = _runs_and_curves()
    assert curvature.applies(curves)
    rows = curvature.flat_or_sharp(cols, curves, ["weight_decay"], eval_every=10, n_resamples=99)
    by = {(r["measure"], r["weight_decay"]): r for r in rows}
    for wd in (1.0, 2.0):
        sharp, flat = by[("hessian_max", wd)], by[("precond_sharpness", wd)]
        assert sharp["n_runs"] == 6 and sharp["n_grokked"] == 5 and sharp["n_compared"] == 5  # censored: not compared
        assert sharp["n_higher_after"] == 5 and np.isclose(sharp["median_ratio"], 2.0)
        assert np.isclose(sharp["ratio_lo"], 2.0) and np.isclose(sharp["ratio_hi"], 2.0)
        assert flat["n_higher_after"] == 0 and np.isclose(flat["median_ratio"], 0.5)
        assert np.isclose(sharp["sign_test_p"], 2 * 0.5**5)  # two-sided, 5 of 5
    said = curvature.sentences(rows, ["weight_decay"])
    assert any("Hessian λ_max higher after grokking than at memorisation in 5 of 5 runs" in s for s in said)
    assert not any("disagree" in s for s in said)  # p = 0.0625 with 5 runs: no verdict to disagree on
    table = curvature.flat_or_sharp_table(rows, ["weight_decay"], {"name": "x"})
    assert table.num_rows == 4


def test_without_curvature_columns_nothing_applies():
    cols, curves = _runs_and_curves()
    assert not curvature.applies(curves.drop_columns(["hessian_max", "precond_sharpness"]))
    assert not curvature.applies(None)


def test_the_softmax_numerics_are_drawn_per_cell_over_every_run():
    cols, _ = _runs_and_curves()
    n, evals = len(cols["run_id"]), 40
    steps = np.arange(1, evals + 1) * 10
    collapse = np.tile(np.where(steps >= 200, 1.0, 0.0), (n, 1))  # every run collapses at step 200
    curves = pa.table({"run_id": np.repeat(np.arange(n), evals).astype(np.int32), "step": np.tile(steps, n),
                       "val_acc": np.zeros(n * evals), "softmax_collapse": collapse.ravel()})
    out = curvature.median_curves(cols, curves, ["weight_decay"])
    assert out["names"] == ["val_acc", "softmax_collapse"] and len(out["cells"]) == 2
    for _, medians in out["cells"]:  # the censored runs count too
        np.testing.assert_array_equal(medians["softmax_collapse"], np.where(steps >= 200, 1.0, 0.0))
    assert curvature.median_curves(cols, curves.drop_columns(["softmax_collapse"]), ["weight_decay"]) is None
