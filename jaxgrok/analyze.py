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

from jaxgrok import results, variance
from jaxgrok.sweep import AXES, SEED_AXES, varying

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


class AnalysisError(ValueError):
    """Input that cannot be analysed; the message is one line."""


def load_runs(results_dir: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """runs.parquet as numpy columns (nullable integers become float with NaN), and its sweep."""
    table = results.upgrade_runs(results.read(Path(results_dir) / "runs.parquet", "runs"))
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
    if len(times) and observed.all() and np.ptp(times) == 0:  # every run at one step: known exactly
        out["median_lo"] = out["median_hi"] = out["median"]
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
        # The spread of log t_val, censoring-aware: ML of a normal right-censored at the budget.
        row["t_val_log_sd"] = variance.log_sd(np.nan_to_num(t_val, nan=1.0), grokked, budget[m])
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


def random_factors(cols, runs: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The seeds that vary among `runs` (all by default) as random factors: name -> level per run.
    Seeds that always vary together (zipped, or batch_seed following seed) are one factor."""
    runs = np.arange(len(cols["run_id"])) if runs is None else runs
    sub = {a: cols[a][runs] for a in SEED_AXES}
    vary = varying(sub | {k: np.zeros(len(runs)) for k in AXES if k not in SEED_AXES})
    codes = {a: np.unique(sub[a], return_inverse=True)[1].ravel() for a in SEED_AXES if a in vary}
    factors: dict[str, np.ndarray] = {}
    for axis, code in codes.items():
        for name, level in factors.items():
            joint = len({(x, y) for x, y in zip(level, code)})
            if joint == len(np.unique(level)) == len(np.unique(code)):  # one determines the other
                factors[f"{name} and {axis}"] = factors.pop(name)
                break
        else:
            factors[axis] = code
    return factors


def rank_correlations(cols, keys, ids, uniq) -> list[dict]:
    """Does a fast seed stay fast? Spearman ρ of t_val between two cells over the seeds they share
    (a censored run ranks after every grokked one)."""
    rows = []
    seeds = np.stack([cols[a] for a in SEED_AXES], 1)
    t = np.where(cols["censored"], np.inf, cols["t_val"])
    for a, b in itertools.combinations(range(len(uniq)), 2):
        ka = {tuple(s): t[i] for i, s in enumerate(seeds) if ids[i] == a}
        kb = {tuple(s): t[i] for i, s in enumerate(seeds) if ids[i] == b}
        shared = sorted(set(ka) & set(kb))
        xa, xb = np.array([ka[s] for s in shared]), np.array([kb[s] for s in shared])
        if len(shared) < 4 or np.isinf(xa).all() or np.isinf(xb).all():
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # constant input: ρ is NaN and skipped
            rho = stats.spearmanr(xa, xb).statistic
        if np.isfinite(rho):
            label = lambda c: ", ".join(f"{k}={v:g}" for k, v in zip(keys, uniq[c]))  # noqa: E731
            rows.append({"measure": "rank_correlation_t_val", "factor": f"{label(a)} vs {label(b)}",
                         "estimate": float(rho), "ci_lo": None, "ci_hi": None, "n": len(shared), "init_noise": None})
    return rows


def _cluster_resamples(cluster: np.ndarray, n_resamples: int, rng: np.random.Generator):
    """Bootstrap index sets that resample whole clusters (a seed's runs) with replacement."""
    levels = np.unique(cluster)
    members = [np.nonzero(cluster == lv)[0] for lv in levels]
    for _ in range(n_resamples):
        yield np.concatenate([members[j] for j in rng.integers(0, len(levels), len(levels))])


def perturbation_map(cols, n_resamples: int = 199, seed: int = 0) -> tuple[list[dict], list[str]]:
    """Per perturbation size ε: the share of the variance of log t_val that lies among perturbations
    of one base initialization (noise seeds) rather than across base initializations (the other
    seeds), censoring-aware with a pigeonhole-bootstrap interval; and Spearman ρ between each
    perturbed run and its unperturbed base (ε = 0), with an interval from resampling base seeds."""
    rows, notes = [], []
    eps = cols["init_noise"]
    others = [k for k in cell_axes(cols) if k != "init_noise"]
    base_axes = [a for a in SEED_AXES if a != "noise_seed"]
    base = np.unique(np.stack([cols[a] for a in base_axes], 1), axis=0, return_inverse=True)[1].ravel()
    t = np.where(cols["censored"], np.inf, cols["t_val"])
    rng = np.random.default_rng(seed)
    for e in np.unique(eps[eps > 0]):
        runs = np.nonzero(eps == e)[0]
        factors = {"base initialization": base[runs], "noise_seed": cols["noise_seed"][runs]}
        if min(len(np.unique(f)) for f in factors.values()) < 2:
            notes.append(f"init_noise = {e:g}: needs ≥ 2 base seeds and ≥ 2 noise seeds for the perturbation share.")
            continue
        sub = {k: v[runs] for k, v in cols.items()}
        design = variance.grid(sub, cell_ids(sub, others)[0], factors)
        if isinstance(design, str):
            notes.append(f"init_noise = {e:g}: {design}.")
            continue
        est, boot, _ = variance.estimate(design, n_resamples, seed)
        within = lambda d: d["noise_seed"] + d["residual"]  # noqa: E731
        share = lambda d: within(d) / np.where(within(d) + d["base initialization"] > 0,  # noqa: E731
                                               within(d) + d["base initialization"], np.nan)
        lo, hi = variance.interval(share(boot))
        rows.append({"measure": "perturbation_share_log_t_val", "factor": "among perturbations of one base initialization",
                     "estimate": float(share(est)[0]), "ci_lo": lo, "ci_hi": hi, "n": len(runs), "init_noise": float(e)})
        # Rank correlation with the unperturbed run of the same base (and the same other cell values).
        zero = {(base[i], *[cols[k][i] for k in others]): t[i] for i in np.nonzero(eps == 0)[0]}
        pairs = [(zero.get((base[i], *[cols[k][i] for k in others])), t[i], base[i]) for i in runs]
        pairs = [p for p in pairs if p[0] is not None]
        if len(pairs) < 4:
            continue
        x, y, b = (np.array(v) for v in zip(*pairs))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rho = stats.spearmanr(x, y).statistic
            reps = [stats.spearmanr(x[pick], y[pick]).statistic for pick in _cluster_resamples(b, n_resamples, rng)]
        lo, hi = variance.interval(np.asarray(reps, float))
        rows.append({"measure": "rank_correlation_unperturbed", "factor": "perturbed run vs its unperturbed base",
                     "estimate": float(rho) if np.isfinite(rho) else None, "ci_lo": lo, "ci_hi": hi,
                     "n": len(pairs), "init_noise": float(e)})
    return rows, notes


def sensitivity(cols: dict, keys: list[str], n_resamples: int = 199, seed: int = 0) -> tuple[list[dict], list[str]]:
    """Censoring-aware variance components of log t_val (variance.py) for the cells and every seed
    that varies; rank correlations between cells sharing seeds; and, where init_noise varies, the
    perturbation map. Returns rows (measure, factor, estimate, ci_lo, ci_hi, n, init_noise) and
    sentences for the report."""
    rows, notes = [], []
    ids, uniq = cell_ids(cols, keys)
    factors = random_factors(cols)
    if len(np.unique(cols["seed"])) > 1 and len(np.unique(cols["data_seed"])) > 1 and "seed and data_seed" in factors:
        notes.append("Model and data seeds vary together (zipped), so their effects cannot be told apart.")
    design = variance.grid(cols, ids, factors) if factors else "no seed varies"
    if isinstance(design, str):
        notes.append(f"Variance components: {design}.")
    else:
        try:
            rows += [r | {"init_noise": None} for r in variance.components(design, n_resamples, seed)]
        except ValueError as e:  # no residual degrees of freedom
            notes.append(f"Variance components: {e}.")
    rows += rank_correlations(cols, keys, ids, uniq)
    if "init_noise" in keys and "noise_seed" in cols:
        map_rows, map_notes = perturbation_map(cols, n_resamples, seed)
        rows += map_rows
        notes += map_notes
    return rows, notes


def km_median(t: np.ndarray, observed: np.ndarray, censor_at: np.ndarray) -> float:
    """The Kaplan–Meier median (NaN where the survival curve never falls to one half)."""
    if not observed.any():
        return np.nan
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        sf = stats.ecdf(stats.CensoredData(uncensored=t[observed], right=censor_at[~observed])).sf
    m = _first_at_or_below(sf.quantiles, sf.probabilities, 0.5)
    return np.nan if m is None else m


def grokfast_speedup(cols, keys, n_resamples: int = 499, seed: int = 0) -> list[dict]:
    """Per Grokfast setting (λ > 0, α) and cell of the other axes: the Kaplan–Meier median t_val of
    the unfiltered runs (λ = 0) over that of the filtered ones, with a percentile interval from
    resampling seeds (both arms share them, so they are resampled together)."""
    others = [k for k in keys if k not in ("grokfast_lambda", "grokfast_alpha")]
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
            for pick in _cluster_resamples(seeds[both], n_resamples, rng):
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


SENSITIVITY_SCHEMA = pa.schema([("measure", pa.string()), ("factor", pa.string()), ("estimate", pa.float64()),
                                ("ci_lo", pa.float64()), ("ci_hi", pa.float64()), ("n", pa.int64()),
                                ("init_noise", pa.float64())])


# ---------------------------------------------------------------------------------------------
# The whole analysis


def analyze(results_dir: str | Path, x: str | None = None, y: str | None = None) -> dict[str, Path]:
    """Read DIR/runs.parquet (and curves.parquet), write stats.parquet, sensitivity.parquet (where
    seeds vary), figures/ and report.html into DIR. Returns the paths written."""
    from jaxgrok import report

    results_dir = Path(results_dir)
    cols, resolved = load_runs(results_dir)
    curves_path = results_dir / "curves.parquet"
    curves = None
    if curves_path.exists():  # read and checked before anything is written
        results.check_pair(results_dir / "runs.parquet", curves_path)
        curves = results.read(curves_path, "curves")
        n_evals = resolved["train"]["steps"] // resolved["train"]["eval_every"]
        if not results.every_evaluation(curves.column("run_id").to_pylist(), cols["run_id"].tolist(), n_evals):
            raise AnalysisError(f"{results_dir / 'runs.parquet'} and {curves_path} disagree: the curves hold "
                                f"{curves.num_rows} rows, not the {n_evals} evaluations of each of {len(cols['run_id'])} runs")
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
    if any(a in SEED_AXES for a in swept):
        sens_rows, sens_notes = sensitivity(cols, keys)
        notes += sens_notes
        written["sensitivity"] = results_dir / "sensitivity.parquet"
        table = pa.Table.from_pylist(sens_rows, schema=SENSITIVITY_SCHEMA.with_metadata(results.metadata("sensitivity", resolved)))
        results.write_atomic(table, written["sensitivity"])
    else:
        sens_rows = []
        notes.append("Seeds do not vary: no initialization sensitivity to report.")
    speedup = []
    if "grokfast_lambda" in keys and (cols["grokfast_lambda"] == 0).any():
        speedup = grokfast_speedup(cols, keys)
        others = [k for k in keys if k not in ("grokfast_lambda", "grokfast_alpha")]
        fields = key_fields(others) + [pa.field("grokfast_lambda", pa.float64()), pa.field("grokfast_alpha", pa.float64())]
        fields += [pa.field(k, pa.int64()) for k in ("n_runs", "n_grokked", "baseline_runs", "baseline_grokked")]
        fields += [pa.field(k, pa.float64()) for k in ("median_t_val", "baseline_median_t_val", "speedup", "speedup_lo", "speedup_hi")]
        written["grokfast"] = results_dir / "grokfast.parquet"
        schema = pa.schema(fields).with_metadata(results.metadata("grokfast", resolved))
        results.write_atomic(pa.Table.from_pylist(speedup, schema=schema), written["grokfast"])
    warn = None
    if curves is not None:
        warn, tables = early_warning(cols, curves, resolved, keys)
        for name, table in tables.items():
            written[name] = results_dir / f"{name}.parquet"
            results.write_atomic(table, written[name])
    written |= report.write(results_dir, cols, resolved, rows, keys, sens_rows, notes, curves, x, y, warn, speedup)
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
