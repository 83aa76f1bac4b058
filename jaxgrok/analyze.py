"""From runs.parquet to what the grokking times mean: per-cell statistics, seed sensitivity, figures.

A *cell* is the runs that share every swept value except the seeds. Runs that did not grok within
their budget are right-censored at it: Kaplan–Meier (scipy.stats.ecdf on CensoredData) estimates
the median and quantiles, which are null where the survival curve never falls that low.
"""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
from scipy import stats

from jaxgrok import results
from jaxgrok.sweep import AXES, SEED_AXES, varying

HYPERPARAMETERS = tuple(a for a in AXES if a not in SEED_AXES)
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


class AnalysisError(ValueError):
    """Input that cannot be analysed; the message is one line."""


def load_runs(results_dir: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """runs.parquet as numpy columns (nullable integers become float with NaN), and its sweep."""
    table = results.read(Path(results_dir) / "runs.parquet", "runs")
    cols = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    return cols, results.sweep_config(table)


def swept_axes(cols) -> list[str]:
    return varying(cols)


def cell_axes(cols) -> list[str]:
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
    return out


def cell_stats(cols: dict, keys: list[str]) -> list[dict]:
    """One dict per cell (runs grouped by `keys`): counts, the exact binomial interval of the
    grokked fraction, and Kaplan–Meier summaries of t_val, t_train and the delay."""
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
        logs = np.log(t_val[grokked])
        row["t_val_log_cv"] = float(stats.variation(logs)) if k >= 2 else None
        phases, counts = np.unique(cols["phase"][m], return_counts=True)
        row["phase"] = str(phases[np.argmax(counts)])
        row["_survival"] = series["t_val"]["ecdf"]
        rows.append(row)
    return rows


def key_fields(keys: list[str]) -> list[pa.Field]:
    """Parquet fields of the swept values that name a cell."""
    return [pa.field(k, pa.int64() if k in SEED_AXES else pa.float64()) for k in keys]


def stats_table(rows: list[dict], keys: list[str], resolved: dict) -> pa.Table:
    fields = key_fields(keys)
    fields += [pa.field("n_runs", pa.int64()), pa.field("n_grokked", pa.int64()), pa.field("phase", pa.string())]
    fields += [pa.field(k, pa.float64()) for k in rows[0] if k not in {f.name for f in fields} and not k.startswith("_")]
    schema = pa.schema(fields).with_metadata(results.metadata("stats", resolved))
    return pa.Table.from_pylist([{f.name: r[f.name] for f in fields} for r in rows], schema=schema)


# ---------------------------------------------------------------------------------------------
# Initialization sensitivity


def _shares(y, groups: dict[str, np.ndarray]) -> np.ndarray:
    """Share of the variance of y explained by the cell, then by each seed factor within cells."""
    total = ((y - y.mean()) ** 2).sum()
    out, resid = [], y
    for name, g in groups.items():
        _, inv = np.unique(g, return_inverse=True)
        means = np.bincount(inv, resid) / np.bincount(inv)
        out.append(((means[inv] - resid.mean()) ** 2).sum() / total if total > 0 else np.nan)
        if name == "hyperparameters":
            resid = resid - means[inv]  # seeds are judged within cells
    return np.asarray(out)


def sensitivity(cols: dict, keys: list[str], n_resamples: int = 999, seed: int = 0) -> tuple[list[dict], list[str]]:
    """Variance shares of log t_val (grokked runs) and rank correlations between cells sharing seeds.
    Returns rows (measure, factor, estimate, ci_lo, ci_hi, n) and sentences for the report."""
    rows, notes = [], []
    g = ~cols["censored"]
    ids, uniq = cell_ids(cols, keys)
    seed, data = cols["seed"], cols["data_seed"]
    n_pairs = len({(a, b) for a, b in zip(seed, data)})
    groups = {}
    if keys:
        groups["hyperparameters"] = ids[g]
    if n_pairs > max(len(np.unique(seed)), len(np.unique(data))):  # crossed: the two can be told apart
        groups["seed"], groups["data_seed"] = seed[g], data[g]
    elif n_pairs > 1:
        groups["seed and data_seed together" if len(np.unique(data)) > 1 else "seed"] = seed[g] * 2**31 + data[g]
        if len(np.unique(data)) > 1:
            notes.append("Model and data seeds vary together (zipped), so their effects cannot be told apart.")
    if g.sum() < 4 or not any(k != "hyperparameters" for k in groups):
        notes.append("Fewer than 2 seeds per cell or fewer than 4 grokked runs: no spread to report.")
    else:
        y = np.log(cols["t_val"][g])
        idx = np.arange(len(y))
        est = _shares(y, groups)
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            boot = stats.bootstrap((idx,), lambda i: _shares(y[i], {k: v[i] for k, v in groups.items()}),
                                   n_resamples=n_resamples, vectorized=False, method="percentile",
                                   random_state=np.random.default_rng(seed))
        notes.append("Variance-share intervals resample runs (percentile bootstrap); the share is biased upward "
                     "under resampling, so the interval of a small share can sit above its estimate.")
        for name, e, lo, hi in zip(groups, est, np.atleast_1d(boot.confidence_interval.low),
                                   np.atleast_1d(boot.confidence_interval.high)):
            rows.append({"measure": "variance_share_log_t_val", "factor": name, "estimate": float(e),
                         "ci_lo": float(lo), "ci_hi": float(hi), "n": int(g.sum())})
    # Does a fast seed stay fast? Spearman ρ of t_val between two cells over the seeds they share
    # (a censored run ranks after every grokked one).
    t = np.where(g, cols["t_val"], np.inf)
    for a, b in itertools.combinations(range(len(uniq)), 2):
        ka = {(s, d): t[i] for i, (s, d) in enumerate(zip(seed, data)) if ids[i] == a}
        kb = {(s, d): t[i] for i, (s, d) in enumerate(zip(seed, data)) if ids[i] == b}
        shared = sorted(set(ka) & set(kb))
        xa, xb = np.array([ka[s] for s in shared]), np.array([kb[s] for s in shared])
        if len(shared) < 4 or np.isinf(xa).all() or np.isinf(xb).all():
            continue
        rho = stats.spearmanr(xa, xb).statistic
        if np.isfinite(rho):
            label = lambda c: ", ".join(f"{k}={v:g}" for k, v in zip(keys, uniq[c]))  # noqa: E731
            rows.append({"measure": "rank_correlation_t_val", "factor": f"{label(a)} vs {label(b)}",
                         "estimate": float(rho), "ci_lo": None, "ci_hi": None, "n": len(shared)})
    return rows, notes


SENSITIVITY_SCHEMA = pa.schema([("measure", pa.string()), ("factor", pa.string()), ("estimate", pa.float64()),
                                ("ci_lo", pa.float64()), ("ci_hi", pa.float64()), ("n", pa.int64())])


# ---------------------------------------------------------------------------------------------
# The whole analysis


def analyze(results_dir: str | Path, x: str | None = None, y: str | None = None) -> dict[str, Path]:
    """Read DIR/runs.parquet (and curves.parquet), write stats.parquet, sensitivity.parquet (where
    seeds vary), figures/ and report.html into DIR. Returns the paths written."""
    from jaxgrok import report

    results_dir = Path(results_dir)
    cols, resolved = load_runs(results_dir)
    keys = cell_axes(cols)
    swept = swept_axes(cols)
    for flag, axis in (("--x", x), ("--y", y)):
        if axis is not None and axis not in swept:
            raise AnalysisError(f"{results_dir}: {flag} {axis}: not a swept axis (swept: {', '.join(swept) or 'none'})")
    notes = []
    if len(cols["run_id"]) < 2:
        notes.append("A single run: no distribution to estimate.")
    rows = cell_stats(cols, keys)
    if all(r["n_runs"] < 2 for r in rows):
        notes.append("Fewer than 2 seeds in every cell: no spread to report.")
    written = {"stats": results_dir / "stats.parquet"}
    results.write_atomic(stats_table(rows, keys, resolved), written["stats"])
    if len(np.unique(cols["seed"])) > 1 or len(np.unique(cols["data_seed"])) > 1:
        sens_rows, sens_notes = sensitivity(cols, keys)
        notes += sens_notes
        written["sensitivity"] = results_dir / "sensitivity.parquet"
        table = pa.Table.from_pylist(sens_rows, schema=SENSITIVITY_SCHEMA.with_metadata(results.metadata("sensitivity", resolved)))
        results.write_atomic(table, written["sensitivity"])
    else:
        sens_rows = []
        notes.append("Seeds do not vary: no initialization sensitivity to report.")
    curves_path = results_dir / "curves.parquet"
    curves = results.read(curves_path, "curves") if curves_path.exists() else None
    warn = None
    if curves is not None:
        warn, tables = early_warning(cols, curves, resolved, keys)
        for name, table in tables.items():
            written[name] = results_dir / f"{name}.parquet"
            results.write_atomic(table, written[name])
    written |= report.write(results_dir, cols, resolved, rows, keys, sens_rows, notes, curves, x, y, warn)
    return written


def early_warning(cols: dict, curves: pa.Table, resolved: dict, keys: list[str]) -> tuple[dict, dict[str, pa.Table]]:
    """The early-warning analysis (warning.py) as data for the report and as tables: events
    (per run and measure), lead_times (per cell and measure), concordance (per measure and moment)."""
    from jaxgrok import warning

    ids, uniq = cell_ids(cols, keys)
    event_rows, conc_rows, present, steps = warning.analyse(cols, curves, ids)
    lead_rows = warning.lead_time_stats(event_rows, cols, keys, ids, uniq)
    fields = [pa.field("measure", pa.string()), pa.field("event", pa.string())]
    fields += key_fields(keys)
    fields += [pa.field("n_runs", pa.int64()), pa.field("n_grokked", pa.int64())]
    fields += [pa.field(f"lead_{s}", pa.float64()) for s in ("median", "median_lo", "median_hi", "q25", "q75")]
    meta = lambda kind: results.metadata(kind, resolved)  # noqa: E731
    tables = {
        "events": pa.Table.from_pylist(event_rows, schema=warning.EVENTS_SCHEMA.with_metadata(meta("events"))),
        "lead_times": pa.Table.from_pylist(lead_rows, schema=pa.schema(fields).with_metadata(meta("lead_times"))),
        "concordance": pa.Table.from_pylist(conc_rows, schema=warning.CONCORDANCE_SCHEMA.with_metadata(meta("concordance"))),
    }
    snapshots = warning.embedding_snapshots(resolved, cols) if resolved.get("measures", {}).get("fourier") else None
    warn = {"lead_times": lead_rows, "concordance": conc_rows, "present": present, "steps": steps,
            "ids": ids, "uniq": uniq, "snapshots": snapshots}
    return warn, tables
