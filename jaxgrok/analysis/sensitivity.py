"""Initialization sensitivity: which seeds decide grokking time, does a fast seed stay fast, and how
close two initializations must be to grok alike (the perturbation map over init_noise)."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pyarrow as pa
from scipy import stats

from jaxgrok import results
from jaxgrok.analysis import variance
from jaxgrok.analysis.cells import cell_axes, cell_ids
from jaxgrok.sweep import AXES, SEED_AXES, varying


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


def cluster_resamples(cluster: np.ndarray, n_resamples: int, rng: np.random.Generator):
    """Bootstrap index sets that resample whole clusters (a seed's runs) with replacement."""
    levels = np.unique(cluster)
    members = [np.nonzero(cluster == lv)[0] for lv in levels]
    for _ in range(n_resamples):
        yield np.concatenate([members[j] for j in rng.integers(0, len(levels), len(levels))])


def _perturbation_share(components: dict) -> np.ndarray:
    """The share of the variance among perturbations of one base initialization (noise seed and
    residual) in the variance of the base and the perturbations together."""
    within = components["noise_seed"] + components["residual"]
    total = within + components["base initialization"]
    return within / np.where(total > 0, total, np.nan)


def perturbation_map(cols, n_resamples: int = 199, seed: int = 0) -> tuple[list[dict], list[str]]:
    """Per perturbation size ε: the share of the variance of log t_val that lies among perturbations
    of one base initialization (noise seeds) rather than across base initializations (the other
    seeds), censoring-aware with a parametric-bootstrap percentile interval; and Spearman ρ between each
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
        refused = variance.supported(design)
        lo, hi = (np.nan, np.nan) if refused else variance.interval(_perturbation_share(boot))
        if refused:
            notes.append(f"init_noise = {e:g}: {refused}")
        rows.append({"measure": "perturbation_share_log_t_val", "factor": "among perturbations of one base initialization",
                     "estimate": float(_perturbation_share(est)[0]), "ci_lo": lo, "ci_hi": hi, "n": len(runs),
                     "init_noise": float(e), "note": refused})
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
            reps = [stats.spearmanr(x[pick], y[pick]).statistic for pick in cluster_resamples(b, n_resamples, rng)]
        lo, hi = variance.interval(np.asarray(reps, float))
        rows.append({"measure": "rank_correlation_unperturbed", "factor": "perturbed run vs its unperturbed base",
                     "estimate": float(rho) if np.isfinite(rho) else None, "ci_lo": lo, "ci_hi": hi,
                     "n": len(pairs), "init_noise": float(e)})
    return rows, notes


def _withheld(rows: list[dict], design, notes: list[str]) -> list[dict]:
    """Rows of variance.components with the intervals variance.supported does not back withheld (and
    the estimates too where variance.estimates_supported does not back them) and its sentence in
    their `note` and, once, in the notes."""
    out = []
    blank = {} if variance.estimates_supported(design) else {"estimate": np.nan}
    for measure, kind in (("variance_component_log_t_val", "component"), ("variance_share_log_t_val", "share")):
        refused = variance.supported(design, kind)
        if refused and refused not in [n.removeprefix("Variance components: ") for n in notes]:
            notes.append(f"Variance components: {refused}")
        out += [r | ({"ci_lo": np.nan, "ci_hi": np.nan} | blank if refused else {}) | {"note": refused}
                for r in rows if r["measure"] == measure]
    return out


def sensitivity(cols: dict, keys: list[str], n_resamples: int = 199, seed: int = 0) -> tuple[list[dict], list[str]]:
    """Censoring-aware variance components of log t_val (analysis/variance.py) for the cells and every seed
    that varies; rank correlations between cells sharing seeds; and, where init_noise varies, the
    perturbation map. Returns rows (measure, factor, estimate, ci_lo, ci_hi, n, init_noise, note) and
    sentences for the report; `note` is variance.supported's sentence where the design is too small
    for the intervals (then withheld), else None."""
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
            rows += [r | {"init_noise": None} for r in _withheld(variance.components(design, n_resamples, seed), design, notes)]
        except ValueError as e:  # no residual degrees of freedom
            notes.append(f"Variance components: {e}.")
    rows += rank_correlations(cols, keys, ids, uniq)
    if "init_noise" in keys and "noise_seed" in cols:
        map_rows, map_notes = perturbation_map(cols, n_resamples, seed)
        rows += map_rows
        notes += map_notes
    return rows, notes

SENSITIVITY_SCHEMA = pa.schema([("measure", pa.string()), ("factor", pa.string()), ("estimate", pa.float64()),
                                ("ci_lo", pa.float64()), ("ci_hi", pa.float64()), ("n", pa.int64()),
                                ("init_noise", pa.float64()), ("note", pa.string())])


def sensitivity_table(rows: list[dict], resolved: dict) -> pa.Table:
    """sensitivity.parquet: the rows of sensitivity(), a withheld or undefined number null (never NaN)."""
    rows = [{k: None if isinstance(v, float) and not np.isfinite(v) else v for k, v in r.items()} for r in rows]
    return pa.Table.from_pylist(rows, schema=SENSITIVITY_SCHEMA.with_metadata(results.metadata("sensitivity", resolved)))
