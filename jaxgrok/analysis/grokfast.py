"""The Grokfast speed-up (Lee et al. 2024): the Kaplan–Meier median t_val of unfiltered runs over that
of filtered ones, with an interval from resampling seeds.

Two comparisons, as the paper's code makes them: each filtered cell against the unfiltered runs at its
own weight decay (the filter alone), and, where the sweep holds weight decay 0, against the unfiltered
runs without weight decay (the paper's baseline: neither filter nor regularisation).

A baseline that mostly never groks has no median, only a lower bound (the longest any of its runs was
followed): the speed-up is then "at least" that bound over the filtered median, never a number made up
from the budget. The interval carries the same bounds through every bootstrap replicate.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from jaxgrok import results
from jaxgrok.analysis.cells import cell_ids, key_fields, km_median
from jaxgrok.analysis.sensitivity import cluster_resamples
from jaxgrok.sweep import SEED_AXES

FILTER_AXES = ("grokfast_lambda", "grokfast_alpha")


def applies(cols, keys) -> bool:
    """Whether the sweep holds a speed-up to measure: λ is a cell axis and some runs are unfiltered."""
    return "grokfast_lambda" in keys and bool((cols["grokfast_lambda"] == 0).any())


def median_bounds(t, observed, censor_at) -> tuple[float, float]:
    """(lo, hi) of a Kaplan–Meier median: the median twice where the survival curve falls to one
    half, else (the longest follow-up, +inf): a median not reached lies past every time observed."""
    m = km_median(t, observed, censor_at)
    if np.isfinite(m):
        return m, m
    return (float(np.max(np.where(observed, t, censor_at))) if len(t) else 0.0), np.inf


def ratio_bounds(base: tuple[float, float], arm: tuple[float, float]) -> tuple[float, float]:
    """Bounds of base median / arm median from bounds of each."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return base[0] / arm[1], base[1] / arm[0]


def grokfast_speedup(cols, keys, n_resamples: int = 499, seed: int = 0) -> list[dict]:
    """Per Grokfast setting (λ > 0, α), cell of the other axes and baseline weight decay (the
    cell's own, and 0 where swept): the speed-up, its bounds where a median is not reached, and a
    95% interval from resampling seeds (both arms share them, so they are resampled together)."""
    others = [k for k in keys if k not in FILTER_AXES]
    ids, uniq = cell_ids(cols, others)
    rest = [i for i, k in enumerate(others) if k != "weight_decay"]  # a baseline may differ in weight decay only
    lam, alpha, wd = cols["grokfast_lambda"], cols["grokfast_alpha"], cols["weight_decay"]
    observed, budget = ~cols["censored"], cols["steps"].astype(float)
    t = np.nan_to_num(cols["t_val"]).astype(float)
    seeds = np.unique(np.stack([cols[a] for a in SEED_AXES], 1), axis=0, return_inverse=True)[1].ravel()
    bounds = lambda m: median_bounds(t[m], observed[m], budget[m])  # noqa: E731
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(len(uniq)):
        cell = ids == c
        if not (cell & (lam > 0)).any():
            continue
        alike = np.isin(ids, [j for j in range(len(uniq)) if (uniq[j][rest] == uniq[c][rest]).all()])
        for base_wd in sorted({float(wd[cell][0]), 0.0} & set(wd.tolist())):
            base = alike & (lam == 0) & (wd == base_wd)
            if not base.any():
                continue
            base &= alpha == alpha[base].min()  # λ = 0 ignores α: one copy of the baseline
            for lv, av in sorted({(a, b) for a, b in zip(lam[cell & (lam > 0)], alpha[cell & (lam > 0)])}):
                arm = cell & (lam == lv) & (alpha == av)
                rows.append({k: uniq[c][i].item() for i, k in enumerate(others)}
                            | {"grokfast_lambda": float(lv), "grokfast_alpha": float(av), "baseline_weight_decay": float(base_wd)}
                            | _compare(base, arm, bounds, seeds, observed, n_resamples, rng))
    # A median that is not reached, and a ratio of one, is missing (null), not a number.
    return [{k: None if isinstance(v, float) and not np.isfinite(v) else v for k, v in r.items()} for r in rows]


def _compare(base, arm, bounds, seeds, observed, n_resamples, rng) -> dict:
    b, a = bounds(base), bounds(arm)
    lo, hi = ratio_bounds(b, a)
    both = np.nonzero(base | arm)[0]
    reps = np.array([ratio_bounds(bounds(both[pick][base[both[pick]]]), bounds(both[pick][arm[both[pick]]]))
                     for pick in cluster_resamples(seeds[both], n_resamples, rng)])
    # Each replicate is known to lie within its bounds: the lower quantile of the lower bounds and the
    # upper quantile of the upper bounds hold whatever the unreached medians are.
    with np.errstate(invalid="ignore"):  # quantiles among infinite upper bounds
        q_lo, q_hi = float(np.quantile(reps[:, 0], 0.025)), float(np.quantile(reps[:, 1], 0.975))
    return {"n_runs": int(arm.sum()), "n_grokked": int(observed[arm].sum()),
            "baseline_runs": int(base.sum()), "baseline_grokked": int(observed[base].sum()),
            "median_t_val": a[0] if a[0] == a[1] else np.nan, "baseline_median_t_val": b[0] if b[0] == b[1] else np.nan,
            "speedup": lo if lo == hi else np.nan,
            "speedup_at_least": lo if lo != hi and lo > 0 else np.nan,
            "speedup_at_most": hi if lo != hi and np.isfinite(hi) else np.nan,
            "speedup_lo": q_lo, "speedup_hi": q_hi}


SPEEDUP_FLOATS = ("median_t_val", "baseline_median_t_val", "speedup", "speedup_at_least", "speedup_at_most",
                  "speedup_lo", "speedup_hi")


def speedup_table(rows: list[dict], keys: list[str], resolved: dict) -> pa.Table:
    """grokfast.parquet: the rows of grokfast_speedup, the other cell axes first."""
    others = [k for k in keys if k not in FILTER_AXES]
    fields = key_fields(others) + [pa.field(k, pa.float64()) for k in (*FILTER_AXES, "baseline_weight_decay")]
    fields += [pa.field(k, pa.int64()) for k in ("n_runs", "n_grokked", "baseline_runs", "baseline_grokked")]
    fields += [pa.field(k, pa.float64()) for k in SPEEDUP_FLOATS]
    schema = pa.schema(fields).with_metadata(results.metadata("grokfast", resolved))
    return pa.Table.from_pylist(rows, schema=schema)
