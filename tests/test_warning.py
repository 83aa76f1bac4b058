"""Early warning: events on constructed curves, lead times with censoring, Harrell's C against
Kendall's τ, and the analysis end to end."""

import numpy as np
import pyarrow.parquet as pq
import pytest
from scipy import stats

from jaxgrok.analysis import warning
from jaxgrok.cli import main

STEPS = np.arange(1, 11) * 100.0


def test_peak_and_half_way_events():
    norm = np.array([[1, 3, 5, 4, 3, 2, 2, 2, 2, 2.0]])
    assert warning.events("weight_norm", norm, STEPS, np.array([100.0]))[0] == 300
    gini = np.array([[0.1, 0.1, 0.2, 0.3, 0.6, 0.8, 0.9, 0.9, 0.9, 0.9]])  # half-way: 0.5
    assert warning.events("fourier_gini", gini, STEPS, np.array([100.0]))[0] == 500
    falling = 1 - gini  # half-way down counts too
    assert warning.events("circularity", falling, STEPS, np.array([100.0]))[0] == 500
    flat = np.full((1, 10), 0.3)
    assert np.isnan(warning.events("circularity", flat, STEPS, np.array([100.0]))[0])
    llc = np.array([[5, np.nan, np.nan, 9, np.nan, np.nan, 4, np.nan, np.nan, 3]])  # sparse, like the LLC
    assert warning.events("llc", llc, STEPS, np.array([100.0]))[0] == 400


def test_excluded_loss_event_is_measured_from_t_train():
    excl = np.array([[5, 0.1, 0.1, 0.2, 1.0, 2.0, 0.5, 0.1, 0.1, 0.1],
                     [5, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]])
    ev = warning.events("excluded_loss", excl, STEPS, np.array([200.0, 200.0]))
    assert ev[0] == 600  # 0.1 at t_train, peak 2.0 after it: half-way (1.05) first reached at step 600
    assert np.isnan(ev[1])  # never rises


def test_concordance_is_kendall_tau_without_censoring_or_ties():
    rng = np.random.default_rng(0)
    time = rng.permutation(40).astype(float) + 1
    risk = -time + rng.normal(0, 8, 40)
    c, n = warning.concordance(risk, time, np.ones(40, bool), np.zeros(40))
    tau = stats.kendalltau(risk, -time).statistic
    assert n == 40 * 39 / 2 and c == pytest.approx((1 + tau) / 2)


def test_concordance_with_censoring_and_groups():
    # Runs 0, 1 grok at 100, 300; run 2 censored at 200; run 3 in another group.
    time = np.array([100.0, 300, 200, 50])
    observed = np.array([True, True, False, True])
    group = np.array([0, 0, 0, 1])
    risk = np.array([3.0, 1, 2, 0])
    # Comparable: (0,1) and (0,2): run 0 has the higher risk in both. (1,2): 2 censored before 1's event: not comparable.
    c, n = warning.concordance(risk, time, observed, group)
    assert (c, n) == (1.0, 2)
    c, _ = warning.concordance(-risk, time, observed, group)
    assert c == 0.0


@pytest.fixture(scope="module")
def grokked_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("w") / "res"
    assert main(["run", "sweeps/quickstart.toml", "--out", str(out), "--quiet", "--set", "steps=2000",
                 "--set", "chunk_steps=1000", "--set", "seed={count=6}", "--set", "data_seed={count=6}",
                 "--set", "weight_decay=1.0", "--set", "llc=true", "--set", "llc_every=8",
                 "--set", "llc_draws=20", "--set", "curvature=true", "--set", "curvature_every=8"]) == 0
    return out


def test_the_early_warning_section_is_written(grokked_dir):
    runs = pq.read_table(grokked_dir / "runs.parquet")
    assert runs.column("censored").to_numpy().sum() < 6  # some runs grokked
    assert all(1 <= len(k) <= 15 for k in runs.column("key_freqs").to_pylist())
    events = pq.read_table(grokked_dir / "events.parquet").to_pandas()
    assert set(events.measure) == set(warning.EVENTS)
    grokked = events[~events.censored]
    run_tval = dict(zip(runs.column("run_id").to_pylist(), runs.column("t_val").to_pylist()))
    assert (grokked.lead_time == [run_tval[r] - e for r, e in zip(grokked.run_id, grokked.event_step)]).all()
    conc = pq.read_table(grokked_dir / "concordance.parquet").to_pandas()
    assert {"weight_norm", "fourier_gini", "llc"} <= set(conc.measure) and conc.baseline.sum() == 2
    assert ((conc.c_index >= 0) & (conc.c_index <= 1)).all()
    lead = pq.read_table(grokked_dir / "lead_times.parquet").to_pandas()
    assert set(lead.measure) == set(warning.EVENTS)
    html = (grokked_dir / "report.html").read_text()
    assert "Early warning" in html and "Harrell" in html
    for name in ("measures_aligned", "circle_forming"):
        assert (grokked_dir / "figures" / f"{name}.png").exists() and f'alt="{name}"' in html
    curves = pq.read_table(grokked_dir / "curves.parquet")
    assert curves.schema.field("n_key_freqs").type == "int32"
    llc = curves.column("llc").to_numpy(zero_copy_only=False)
    assert np.isfinite(llc[:80][[0, 7, 15]]).all() and np.isnan(llc[1])  # steps 25, 200, 400 of run 0; null between


def test_the_c_interval_survives_resamples_without_comparable_pairs():
    # Two cells of 6 runs with tied times: some resamples hold no comparable pair (C undefined there);
    # the interval comes from the others instead of being NaN.
    rng = np.random.default_rng(0)
    time = np.repeat([1000.0, 2000.0, 3000.0], 4)  # 1% of 999 resamples hold no comparable pair
    args = (rng.normal(size=12), time, np.ones(12, bool), np.repeat([0.0, 1.0], 6))
    lo, hi = warning.c_interval(args, 999, 0)
    c, _ = warning.concordance(*args)
    assert 0 <= lo <= c <= hi <= 1
