"""Early warning of grokking: when each progress measure moves, how far ahead of t_val, and how well
its value at a fixed early moment ranks runs by grokking time.

Events, per run and measure (steps are evaluation steps):
- weight_norm, llc: the step of the peak (Omnigrok's rise-then-fall of the norm; the LLC's rise
  while memorising and fall through grokking, devinterp's grokking example);
- fourier_gini, circularity: the first step at which the measure has gone half-way from its first
  to its last value (Nanda et al. 2023: the Gini jumps at the clean-up; Zhong et al. 2023);
- excluded_loss: the first step after t_train at which it has risen half-way from its value at
  t_train to its later peak (Nanda et al. 2023: circuit formation raises it before the test loss falls).
Lead time = t_val − event. A run that did not grok has a lead time known only to exceed
budget − event: it is right-censored there, and cells are summarised by Kaplan–Meier as t_val is.

Ranking: at a landmark (t_train, and t_train + k evaluations) the runs that have memorised and not
yet grokked are ranked by each measure's value; Harrell's concordance index C says how often, of two
comparable runs (the earlier t_val observed), the one with the higher value grokked first. 0.5 is no
information; below 0.5 the measure ranks the other way. Pairs are formed within cells only, so
that hyperparameters do not pass for the measure's foresight. Intervals: percentile bootstrap over runs.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from scipy import stats

from jaxgrok import measures, results
from jaxgrok.analysis.cells import cell_ids, key_fields, survival
from jaxgrok.measures import Rule
from jaxgrok.tasks import MODULAR_OPS

# The event rule of each measure and the measures ranked at a landmark: declared with the measures.
EVENTS = measures.EVENTS
PREDICTORS = measures.PROGRESS
BASELINE = "weight_norm"


def curve_matrix(curves: pa.Table, run_ids: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps[evals], values[runs, evals]) of one curves.parquet column, rows in `run_ids` order;
    null becomes NaN."""
    step = curves.column("step").to_numpy()
    steps = np.unique(step)
    rid = curves.column("run_id").to_numpy()
    col = curves.column(name).cast(pa.float64()).to_numpy(zero_copy_only=False)
    out = np.full((len(run_ids), len(steps)), np.nan)
    row = {r: i for i, r in enumerate(run_ids)}
    rows = np.array([row.get(r, -1) for r in rid])
    keep = rows >= 0
    out[rows[keep], np.searchsorted(steps, step[keep])] = col[keep]
    return steps, out


def _first(mask: np.ndarray, steps: np.ndarray) -> np.ndarray:
    return np.where(mask.any(1), steps[mask.argmax(1)], np.nan)


def events(name: str, values: np.ndarray, steps: np.ndarray, t_train: np.ndarray) -> np.ndarray:
    """The event step of each run (NaN where there is none), by the rule in EVENTS."""
    finite = np.isfinite(values)
    has = finite.any(1)
    if EVENTS[name] is Rule.PEAK:
        peak = np.nanargmax(np.where(finite, values, -np.inf), 1)
        return np.where(has, steps[peak], np.nan)
    if EVENTS[name] is Rule.HALF_WAY_UP_FROM_T_TRAIN:
        after = steps[None, :] >= t_train[:, None]  # NaN t_train: never
        at_t_train = np.nanmax(np.where(steps[None, :] == t_train[:, None], values, np.nan), 1, initial=-np.inf)
        peak = np.nanmax(np.where(after & finite, values, -np.inf), 1)
        with np.errstate(invalid="ignore"):  # no value at or after t_train: -inf - -inf, not an event
            level = at_t_train + 0.5 * (peak - at_t_train)
        ok = np.isfinite(level) & (peak > at_t_train)
        return np.where(ok, _first(after & (values >= level[:, None]), steps), np.nan)
    # Rule.HALF_WAY: half-way from the first finite value to the last, whichever way it goes.
    idx = np.arange(values.shape[1])
    first_i = np.where(finite, idx, values.shape[1]).min(1)
    last_i = np.where(finite, idx, -1).max(1)
    rows = np.arange(len(values))
    start = np.where(has, values[rows, np.minimum(first_i, values.shape[1] - 1)], np.nan)
    final = np.where(has, values[rows, np.maximum(last_i, 0)], np.nan)
    mid = start + 0.5 * (final - start)
    up = final >= start
    crossed = np.where(up[:, None], values >= mid[:, None], values <= mid[:, None]) & finite
    return np.where(has & (final != start), _first(crossed, steps), np.nan)


def c_interval(args, n_resamples: int, seed: int) -> tuple[float, float]:
    """The 95% percentile-bootstrap interval of Harrell's C over runs. A resample can hold no
    comparable pair (C undefined): the interval is taken over the resamples where C is defined, when
    at least 95% are (one undefined resample would otherwise make it NaN), else NaN."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        boot = stats.bootstrap(args, lambda *a: concordance(*a)[0], paired=True, vectorized=False,
                               n_resamples=n_resamples, method="percentile", random_state=np.random.default_rng(seed))
    dist = boot.bootstrap_distribution[np.isfinite(boot.bootstrap_distribution)]
    if dist.size < 0.95 * n_resamples:
        return np.nan, np.nan
    lo, hi = np.percentile(dist, [2.5, 97.5])
    return float(lo), float(hi)


def concordance(risk: np.ndarray, time: np.ndarray, observed: np.ndarray, group: np.ndarray) -> tuple[float, int]:
    """Harrell's C within groups: over pairs whose earlier time is an observed event (ties in time
    count when the event is observed and the other censored), the share in which the earlier run has
    the higher risk; ties in risk count half. Returns (C, comparable pairs); C is NaN without pairs."""
    observed = np.asarray(observed, bool)  # the bootstrap hands every argument over as floats
    earlier = (time[:, None] < time[None, :]) | ((time[:, None] == time[None, :]) & ~observed[None, :])
    comparable = earlier & observed[:, None] & (group[:, None] == group[None, :])
    np.fill_diagonal(comparable, False)
    n = int(comparable.sum())
    if n == 0:
        return float("nan"), 0
    score = (risk[:, None] > risk[None, :]) + 0.5 * (risk[:, None] == risk[None, :])
    return float((score * comparable).sum() / n), n


def _at(values: np.ndarray, steps: np.ndarray, moment: np.ndarray) -> np.ndarray:
    """Each run's latest finite value at or before its moment (the LLC is estimated every few
    evaluations); NaN if none."""
    ok = np.isfinite(values) & (steps[None, :] <= moment[:, None])
    last = np.where(ok, np.arange(values.shape[1]), -1).max(1)
    return np.where(last >= 0, values[np.arange(len(values)), np.maximum(last, 0)], np.nan)


def analyse(cols: dict, curves: pa.Table, cell: np.ndarray, k: int = 10, n_resamples: int = 999, seed: int = 0):
    """Events, lead times and landmark concordance for every measure curves.parquet holds.

    `cols`: runs.parquet columns (cells.load_runs); `cell`: each run's cell id. Returns
    (events rows, concordance rows, {measure: values[runs, evals]}, steps)."""
    run_ids = cols["run_id"]
    t_train, t_val = cols["t_train"], cols["t_val"]
    budget = cols["steps"].astype(float)
    grokked = ~cols["censored"]
    present, steps = {}, None
    for name in PREDICTORS:
        if name in curves.column_names:
            steps, values = curve_matrix(curves, run_ids, name)
            if np.isfinite(values).any():
                present[name] = values
    event_rows = []
    for name, values in present.items():
        if name not in EVENTS:
            continue
        ev = events(name, values, steps, t_train)
        lead = np.where(grokked, t_val - ev, budget - ev)
        for i in np.nonzero(np.isfinite(ev))[0]:
            event_rows.append({"run_id": int(run_ids[i]), "measure": name, "event": EVENTS[name].value,
                               "event_step": int(ev[i]), "lead_time": int(lead[i]), "censored": bool(~grokked[i])})

    eval_every = int(steps[1] - steps[0]) if steps is not None and len(steps) > 1 else 0
    conc_rows = []
    for label, offset in (("t_train", 0), (f"t_train+{k} evals", k * eval_every)):
        moment = t_train + offset
        at_risk = np.isfinite(t_train) & (~grokked | (t_val > moment))
        time = np.where(grokked, t_val, budget)
        for name, values in present.items():
            risk = _at(values, steps, moment)
            use = at_risk & np.isfinite(risk)
            if use.sum() < 4:
                continue
            args = (risk[use], time[use], grokked[use], cell[use])
            c, n_pairs = concordance(*args)
            lo, hi = c_interval(args, n_resamples, seed) if n_pairs and len(np.unique(args[0])) > 1 else (np.nan, np.nan)
            conc_rows.append({"measure": name, "moment": label, "c_index": c, "ci_lo": lo, "ci_hi": hi,
                              "n_runs": int(use.sum()), "n_pairs": n_pairs, "baseline": name == BASELINE})
    conc_rows += _ticket_concordance(cols, cell, grokked, budget, n_resamples, seed)
    return event_rows, conc_rows, present, steps


def _ticket_concordance(cols: dict, cell, grokked, budget, n_resamples: int, seed: int) -> list[dict]:
    """Does a strong initial ticket grok sooner? Harrell's C of the step-0 embedding's excess share in
    the run's final key frequencies (init_key_share less its random expectation) against t_val,
    every run at risk (censored ones as censored)."""
    if "init_key_share" not in cols:
        return []
    risk = np.asarray(cols["init_key_share"], float) - np.asarray(cols["init_key_share_random"], float)
    use = np.isfinite(risk)
    if use.sum() < 4:
        return []
    args = (risk[use], np.where(grokked, cols["t_val"], budget)[use], grokked[use], cell[use])
    c, n_pairs = concordance(*args)
    lo, hi = c_interval(args, n_resamples, seed) if n_pairs and len(np.unique(args[0])) > 1 else (np.nan, np.nan)
    return [{"measure": "init_key_share", "moment": "step 0", "c_index": c, "ci_lo": lo, "ci_hi": hi,
             "n_runs": int(use.sum()), "n_pairs": n_pairs, "baseline": False}]


def lead_time_stats(event_rows: list[dict], cols: dict, keys: list[str], ids: np.ndarray, uniq: np.ndarray) -> list[dict]:
    """Per cell and measure: Kaplan–Meier median lead time (95% interval) and quartiles, with
    the runs that did not grok censored at budget − event."""
    position = {int(r): i for i, r in enumerate(cols["run_id"])}
    out = []
    for name in dict.fromkeys(r["measure"] for r in event_rows):
        rows = [r for r in event_rows if r["measure"] == name]
        at = np.array([position[r["run_id"]] for r in rows])
        lead = np.array([r["lead_time"] for r in rows], float)
        observed = ~np.array([r["censored"] for r in rows])
        for c in range(len(uniq)):
            m = ids[at] == c
            if not m.any():
                continue
            row = {"measure": name, "event": EVENTS[name].value}
            row |= {key: uniq[c][i].item() for i, key in enumerate(keys)}
            row |= {"n_runs": int(m.sum()), "n_grokked": int(observed[m].sum())}
            s = survival(lead[m], observed[m], lead[m]) if observed[m].any() else None
            for stat in ("median", "median_lo", "median_hi", "q25", "q75"):
                row[f"lead_{stat}"] = None if s is None else s[stat]
            out.append(row)
    return out


EVENTS_SCHEMA = pa.schema([("run_id", pa.int32()), ("measure", pa.string()), ("event", pa.string()),
                           ("event_step", pa.int64()), ("lead_time", pa.int64()), ("censored", pa.bool_())])
CONCORDANCE_SCHEMA = pa.schema([("measure", pa.string()), ("moment", pa.string()), ("c_index", pa.float64()),
                                ("ci_lo", pa.float64()), ("ci_hi", pa.float64()), ("n_runs", pa.int64()),
                                ("n_pairs", pa.int64()), ("baseline", pa.bool_())])


@dataclass(frozen=True)
class Snapshots:
    """One run's embedding at a few moments, and the plane its residues form a circle on."""

    run_id: int
    embeddings: dict[int, np.ndarray]  # step -> embedding[p, D]
    labels: dict[int, str]  # step -> what the moment is
    frequency: int  # the final top frequency k, counted from 0 (k = frequency + 1)
    plane: np.ndarray  # [D, 2]: orthonormal, spanned by that frequency's cos and sin components


@dataclass(frozen=True)
class EarlyWarning:
    """The early-warning analysis: rows for the report, curves for the figures, Parquet tables."""

    lead_times: list[dict]
    concordance: list[dict]
    present: dict[str, np.ndarray]  # measure -> values[runs, evals], the measures with a finite value
    steps: np.ndarray  # the evaluation steps
    ids: np.ndarray  # each run's cell
    uniq: np.ndarray  # each cell's key values
    tables: dict[str, pa.Table]  # events, lead_times, concordance
    aligned: tuple  # aligned(): (cells shown, cells with a grokked run, {measure: [Band | None]})
    snapshots: Snapshots | None = None


def _fill_gaps(values: np.ndarray) -> np.ndarray:
    """Linear interpolation across the evaluations a measure skips (the LLC's cadence), inside each
    run's first and last value only: for the aligned bands that are drawn, never for the tables."""
    out = values.copy()
    x = np.arange(values.shape[1])
    for row in out:
        ok = np.isfinite(row)
        if 1 < ok.sum() < len(row):
            inside = (x >= x[ok][0]) & (x <= x[ok][-1])
            row[inside] = np.interp(x[inside], x[ok], row[ok])
    return out


@dataclass(frozen=True)
class Band:
    """One cell's median and interquartile range of a measure against step − t_val."""

    n_runs: int  # the cell's grokked runs
    offsets: np.ndarray  # step − t_val, where enough runs have a value
    quartiles: np.ndarray  # [3, offsets]: the 25th, 50th and 75th percentiles there


def aligned(present: dict, steps: np.ndarray, cols: dict, ids: np.ndarray, n_cells: int, max_cells: int = 6):
    """Each measure aligned on each grokked run's t_val, per cell (the first `max_cells` cells with a
    grokked run): a Band where an offset is reached by at least 3 runs (or a quarter of them, or
    all), else None. Returns (those cells, how many cells have a grokked run, {measure: [Band]})."""
    grokked = ~cols["censored"]
    cells = [c for c in range(n_cells) if (grokked & (ids == c)).any()]
    shown = cells[:max_cells]
    every = steps[1] - steps[0] if len(steps) > 1 else 1
    n = len(steps)
    offsets = (np.arange(2 * n - 1) - (n - 1)) * every
    bands = {}
    for name, values in present.items():
        bands[name] = []
        for c in shown:
            runs = np.nonzero(grokked & (ids == c))[0]
            grid = np.full((len(runs), 2 * n - 1), np.nan)
            shift = ((steps[None, :] - cols["t_val"][runs, None]) // every + (n - 1)).astype(int)
            grid[np.arange(len(runs))[:, None], shift] = _fill_gaps(values[runs])
            # Offsets reached by few runs (the longest waits) would draw noise as structure.
            enough = np.isfinite(grid).sum(0) >= min(len(runs), max(3, len(runs) // 4))
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # all-NaN columns outside `enough` are not kept
                q = np.nanpercentile(grid[:, enough], [25, 50, 75], axis=0)
            bands[name].append(Band(len(runs), offsets[enough], q) if enough.any() else None)
    return shown, len(cells), bands


def early_warning(cols: dict, curves: pa.Table, resolved: dict, keys: list[str]) -> EarlyWarning:
    """Events (per run and measure), lead times (per cell and measure) and concordance (per measure
    and moment), as rows and as the tables events, lead_times and concordance; no snapshots."""
    ids, uniq = cell_ids(cols, keys)
    event_rows, conc_rows, present, steps = analyse(cols, curves, ids)
    lead_rows = lead_time_stats(event_rows, cols, keys, ids, uniq)
    fields = [pa.field("measure", pa.string()), pa.field("event", pa.string())]
    fields += key_fields(keys)
    fields += [pa.field("n_runs", pa.int64()), pa.field("n_grokked", pa.int64())]
    fields += [pa.field(f"lead_{s}", pa.float64()) for s in ("median", "median_lo", "median_hi", "q25", "q75")]
    meta = lambda kind: results.metadata(kind, resolved)  # noqa: E731
    tables = {
        "events": pa.Table.from_pylist(event_rows, schema=EVENTS_SCHEMA.with_metadata(meta("events"))),
        "lead_times": pa.Table.from_pylist(lead_rows, schema=pa.schema(fields).with_metadata(meta("lead_times"))),
        "concordance": pa.Table.from_pylist(conc_rows, schema=CONCORDANCE_SCHEMA.with_metadata(meta("concordance"))),
    }
    bands = aligned(present, steps, cols, ids, len(uniq)) if steps is not None else ([], 0, {})
    return EarlyWarning(lead_rows, conc_rows, present, steps, ids, uniq, tables, bands)


def snapshot_moments(resolved: dict, cols: dict, n_moments: int = 5) -> tuple[int, list[int], dict[int, str]] | None:
    """Which run and which moments to show the embedding of: one typical grokked run (median t_val of
    the grokked runs) at initialization, t_train, half-way to t_val, t_val, and 2·t_val (within the
    budget, or where the run retired). Returns (run_id, steps, {step: what the moment is}), or None when no run grokked or the
    task has no residues."""
    grokked = np.nonzero(~cols["censored"] & np.isfinite(cols["t_train"]))[0]
    if not len(grokked) or resolved["task"]["op"] not in MODULAR_OPS:
        return None
    t_val = cols["t_val"][grokked]
    i = grokked[np.argsort(t_val, kind="stable")[len(t_val) // 2]]
    every = resolved["train"]["eval_every"]
    t_train, t_v, end, last = int(cols["t_train"][i]), int(cols["t_val"][i]), int(cols["steps"][i]), "2·t_val"
    if np.isfinite(stopped := float(cols["stopped_at"][i])) and stopped < 2 * t_v:  # frozen from there
        end, last = int(stopped), "retired"
    half = (t_train + t_v) // 2 // every * every
    labels = {min(end, 2 * t_v): last, t_v: "t_val", half: "half-way", t_train: "t_train", 0: "init"}
    return int(cols["run_id"][i]), sorted(labels)[:n_moments], labels


def snapshots(run_id: int, embeddings: dict[int, np.ndarray], labels: dict[int, str]) -> Snapshots:
    """The snapshots with the plane of the last embedding's top frequency (measures.fourier)."""
    from jaxgrok.measures import fourier  # jax: imported only where there are snapshots

    last = embeddings[max(embeddings)]
    p = last.shape[0]
    coef = np.asarray(fourier.coefficients(last - last.mean(0), fourier.basis(p)))
    k = int(((coef**2).sum((1, 2))).argmax())
    plane = np.linalg.qr(coef[k].T)[0]
    return Snapshots(run_id, embeddings, labels, k, plane)
