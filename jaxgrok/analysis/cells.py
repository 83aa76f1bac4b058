"""Cells and their grokking times: runs.parquet read, runs grouped into cells, Kaplan–Meier statistics.

A *cell* is the runs that share every swept value except the seeds. Runs that did not grok within
their budget are right-censored at it: Kaplan–Meier (scipy.stats.ecdf on CensoredData) estimates
the median and quantiles, which are null where the survival curve never falls that low.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
from scipy import stats

from jaxgrok import results
from jaxgrok.analysis import variance
from jaxgrok.sweep import INT_AXES, SEED_AXES, varying

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def load_runs(results_dir: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """runs.parquet as numpy columns (nullable integers become float with NaN), and its sweep."""
    table = results.upgrade_runs(results.read(Path(results_dir) / "runs.parquet", "runs"))
    cols = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    return cols, results.sweep_config(table)


def swept_axes(cols) -> list[str]:
    """The axes whose value differs between runs, seeds included."""
    return varying(cols)


def cell_axes(cols) -> list[str]:
    """The swept axes that name a cell: every swept axis but the seeds."""
    return [a for a in swept_axes(cols) if a not in SEED_AXES]


def cell_ids(cols, keys) -> tuple[np.ndarray, np.ndarray]:
    """(id per run, the unique key rows), cells in sorted order of their values."""
    if not keys:
        return np.zeros(len(cols["run_id"]), int), np.zeros((1, 0))
    values = np.stack([cols[k] for k in keys], 1)
    uniq, inverse = np.unique(values, axis=0, return_inverse=True)
    return inverse.ravel(), uniq


# ---------------------------------------------------------------------------------------------
# Survival statistics


def _first_at_or_below(times, probs, level):
    hit = np.nonzero(probs <= level + 1e-12)[0]
    return float(times[hit[0]]) if len(hit) else None


def survival(times: np.ndarray, observed: np.ndarray, censor_at: np.ndarray) -> dict:
    """Kaplan–Meier summary of event times; runs with observed=False are censored at censor_at.

    Returns median (with a 95% interval from the log-log pointwise band), quantiles (None where
    never reached), the restricted mean up to the largest censoring time, and the ECDF result.
    """
    data = stats.CensoredData(uncensored=times[observed], right=censor_at[~observed])
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        res = stats.ecdf(data)
        sf = res.sf
        band = sf.confidence_interval(0.95, method="log-log") if observed.any() else None
    t, s = sf.quantiles, sf.probabilities
    horizon = float(np.max(censor_at)) if len(censor_at) else float(t[-1])
    # ∫₀^horizon S(t) dt of the step function: S = 1 before the first event.
    edges = np.clip(np.concatenate([[0.0], t, [horizon]]), 0, horizon)
    levels = np.concatenate([[1.0], s])
    out = {
        "median": _first_at_or_below(t, s, 0.5),
        "median_lo": _first_at_or_below(band.low.quantiles, band.low.probabilities, 0.5) if band else None,
        "median_hi": _first_at_or_below(band.high.quantiles, band.high.probabilities, 0.5) if band else None,
        "restricted_mean": float(np.sum(np.diff(edges) * levels)),
        "ecdf": res,
    }
    for q in QUANTILES:
        out[f"q{int(q * 100)}"] = _first_at_or_below(t, s, 1 - q)
    if len(times) and observed.all() and np.ptp(times) == 0:  # every run at one step: known exactly
        out["median_lo"] = out["median_hi"] = out["median"]
    return out


def cell_stats(cols: dict, keys: list[str]) -> list[dict]:
    """One dict per cell (runs grouped by `keys`): counts, the exact binomial interval of the
    grokked fraction, and Kaplan–Meier summaries of t_val, t_train and the delay. Two private
    entries are not written to stats.parquet: "_survival" (the t_val ECDF result) and "_runs" (the
    positions of the cell's runs in `cols`)."""
    ids, uniq = cell_ids(cols, keys)
    budget = cols["steps"].astype(float)
    rows = []
    for c in range(len(uniq)):
        m = ids == c
        n, grokked = int(m.sum()), ~cols["censored"][m]
        k = int(grokked.sum())
        ci = stats.binomtest(k, n).proportion_ci(method="exact")
        row = {key: uniq[c][i].item() for i, key in enumerate(keys)}
        row |= {"n_runs": n, "n_grokked": k, "frac_grokked": k / n,
                "frac_grokked_lo": ci.low, "frac_grokked_hi": ci.high}
        t_train, t_val = cols["t_train"][m], cols["t_val"][m]
        memorised = ~np.isnan(t_train)
        series = {
            "t_val": survival(np.nan_to_num(t_val), grokked, budget[m]),
            "t_train": survival(np.nan_to_num(t_train), memorised, budget[m]),
            # The delay is defined for runs that memorised; one that never grokked is censored
            # at the steps it had left.
            "delay": survival(np.nan_to_num(t_val - t_train)[memorised], grokked[memorised],
                              (budget[m] - np.nan_to_num(t_train))[memorised]) if memorised.any() else None,
        }
        for name, s in series.items():
            for stat in ("median", "median_lo", "median_hi", "restricted_mean") + tuple(f"q{int(q * 100)}" for q in QUANTILES):
                row[f"{name}_{stat}"] = None if s is None else s[stat]
        # The spread of log t_val, censoring-aware: ML of a normal right-censored at the budget.
        row["t_val_log_sd"] = variance.log_sd(np.nan_to_num(t_val, nan=1.0), grokked, budget[m])
        phases, counts = np.unique(cols["phase"][m], return_counts=True)
        row["phase"] = str(phases[np.argmax(counts)])
        row["_survival"] = series["t_val"]["ecdf"]
        row["_runs"] = np.nonzero(m)[0]  # for figures that draw the cell's runs themselves
        rows.append(row)
    return rows


def key_fields(keys: list[str]) -> list[pa.Field]:
    """Parquet fields of the swept values that name a cell."""
    return [pa.field(k, pa.int64() if k in INT_AXES else pa.float64()) for k in keys]


def stats_table(rows: list[dict], keys: list[str], resolved: dict) -> pa.Table:
    """stats.parquet: the cell rows of cell_stats (their private "_" entries left out), with the
    resolved sweep in the metadata."""
    fields = key_fields(keys)
    fields += [pa.field("n_runs", pa.int64()), pa.field("n_grokked", pa.int64()), pa.field("phase", pa.string())]
    fields += [pa.field(k, pa.float64()) for k in rows[0] if k not in {f.name for f in fields} and not k.startswith("_")]
    schema = pa.schema(fields).with_metadata(results.metadata("stats", resolved))
    return pa.Table.from_pylist([{f.name: r[f.name] for f in fields} for r in rows], schema=schema)


def km_median(t: np.ndarray, observed: np.ndarray, censor_at: np.ndarray) -> float:
    """The Kaplan–Meier median (NaN where the survival curve never falls to one half)."""
    if not observed.any():
        return np.nan
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        sf = stats.ecdf(stats.CensoredData(uncensored=t[observed], right=censor_at[~observed])).sf
    m = _first_at_or_below(sf.quantiles, sf.probabilities, 0.5)
    return np.nan if m is None else m


