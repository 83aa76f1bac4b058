"""The Grokfast speed-up (Lee et al. 2024): per filter setting, the Kaplan–Meier median t_val of the
unfiltered runs over that of the filtered ones, with an interval from resampling seeds."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from jaxgrok import results
from jaxgrok.analysis import variance
from jaxgrok.analysis.cells import cell_ids, key_fields, km_median
from jaxgrok.analysis.sensitivity import cluster_resamples
from jaxgrok.sweep import SEED_AXES

FILTER_AXES = ("grokfast_lambda", "grokfast_alpha")


def applies(cols, keys) -> bool:
    """Whether the sweep holds a speed-up to measure: λ is a cell axis and some runs are unfiltered."""
    return "grokfast_lambda" in keys and bool((cols["grokfast_lambda"] == 0).any())


def grokfast_speedup(cols, keys, n_resamples: int = 499, seed: int = 0) -> list[dict]:
    """Per Grokfast setting (λ > 0, α) and cell of the other axes: the Kaplan–Meier median t_val of
    the unfiltered runs (λ = 0) over that of the filtered ones, with a percentile interval from
    resampling seeds (both arms share them, so they are resampled together)."""
    others = [k for k in keys if k not in FILTER_AXES]
    ids, uniq = cell_ids(cols, others)
    lam, alpha = cols["grokfast_lambda"], cols["grokfast_alpha"]
    observed, budget = ~cols["censored"], cols["steps"].astype(float)
    t = np.nan_to_num(cols["t_val"]).astype(float)
    seeds = np.unique(np.stack([cols[a] for a in SEED_AXES], 1), axis=0, return_inverse=True)[1].ravel()
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(len(uniq)):
        cell = ids == c
        base = cell & (lam == 0)
        if not base.any():
            continue
        base &= alpha == alpha[base].min()  # λ = 0 ignores α: one copy of the baseline
        for lv, av in sorted({(a, b) for a, b in zip(lam[cell & (lam > 0)], alpha[cell & (lam > 0)])}):
            arm = cell & (lam == lv) & (alpha == av)
            med = lambda m: km_median(t[m], observed[m], budget[m])  # noqa: E731
            m_base, m_arm = med(base), med(arm)
            both = np.nonzero(base | arm)[0]
            reps = []
            for pick in cluster_resamples(seeds[both], n_resamples, rng):
                b_i, a_i = both[pick][base[both[pick]]], both[pick][arm[both[pick]]]
                reps.append(km_median(t[b_i], observed[b_i], budget[b_i]) / km_median(t[a_i], observed[a_i], budget[a_i]))
            lo, hi = variance.interval(np.asarray(reps))
            row = {k: uniq[c][i].item() for i, k in enumerate(others)}
            rows.append(row | {"grokfast_lambda": float(lv), "grokfast_alpha": float(av),
                               "n_runs": int(arm.sum()), "n_grokked": int(observed[arm].sum()),
                               "baseline_runs": int(base.sum()), "baseline_grokked": int(observed[base].sum()),
                               "median_t_val": m_arm, "baseline_median_t_val": m_base,
                               "speedup": m_base / m_arm, "speedup_lo": lo, "speedup_hi": hi})
    # A median that is not reached, and a ratio of one, is missing (null), not a number.
    return [{k: None if isinstance(v, float) and not np.isfinite(v) else v for k, v in r.items()} for r in rows]




def speedup_table(rows: list[dict], keys: list[str], resolved: dict) -> pa.Table:
    """grokfast.parquet: the rows of grokfast_speedup, the other cell axes first."""
    others = [k for k in keys if k not in FILTER_AXES]
    fields = key_fields(others) + [pa.field("grokfast_lambda", pa.float64()), pa.field("grokfast_alpha", pa.float64())]
    fields += [pa.field(k, pa.int64()) for k in ("n_runs", "n_grokked", "baseline_runs", "baseline_grokked")]
    fields += [pa.field(k, pa.float64()) for k in ("median_t_val", "baseline_median_t_val", "speedup", "speedup_lo", "speedup_hi")]
    schema = pa.schema(fields).with_metadata(results.metadata("grokfast", resolved))
    return pa.Table.from_pylist(rows, schema=schema)
