"""Is the memorising solution flat or sharp? Each curvature measure's paired change in a run, from
memorisation (t_train) to after grokking (t_val + 10 evaluations).

Raw sharpness and scale-aware measures can disagree: with cross-entropy the Hessian shrinks as the
logits grow, whatever the basin (Granziol 2020), while Adam's preconditioned sharpness and the LLC
do not shrink with the logits that way. So each measure gets its own verdict, side by side: per cell,
the median ratio after/before over the runs that grokked, a percentile interval from resampling
seeds, and a sign test of "higher after than before" (scipy.stats.binomtest). The comparison is
conditional on grokking: a run that did not grok has no "after", and the table counts those runs.
"""

from __future__ import annotations

import warnings

import numpy as np
import pyarrow as pa
from scipy import stats

from jaxgrok import measures, results
from jaxgrok.analysis import variance
from jaxgrok.analysis.cells import cell_ids, key_fields
from jaxgrok.analysis.sensitivity import cluster_resamples
from jaxgrok.analysis.warning import curve_matrix
from jaxgrok.sweep import SEED_AXES

NUMERICS = ("val_acc", "softmax_collapse", "zero_loss_frac", "nlm_cosine")  # drawn over training where measured
COMPARED = ("hessian_max", "hessian_trace", "precond_sharpness", "relative_flatness", "llc")  # raw, raw, scale-aware ×2, SLT
AFTER = 10  # evaluations after t_val: past the jump itself


def applies(curves: pa.Table | None) -> bool:
    """Whether some compared measure was taken (a column with a value)."""
    return curves is not None and any(name in curves.column_names and curves.column(name).null_count < curves.num_rows
                                      for name in COMPARED)


def _at_or_after(steps: np.ndarray, values: np.ndarray, when: np.ndarray) -> np.ndarray:
    """Per run, the measure at its first measured evaluation at or after `when` (NaN: none)."""
    measured = np.isfinite(values) & (steps[None, :] >= when[:, None])
    return np.where(measured.any(1), values[np.arange(len(values)), measured.argmax(1)], np.nan)


def paired(cols: dict, curves: pa.Table, name: str, eval_every: int) -> tuple[np.ndarray, np.ndarray]:
    """(before, after) per run: the measure at memorisation and 10 evaluations after grokking (NaN
    where the run did not memorise, did not grok, or was not measured then)."""
    steps, values = curve_matrix(curves, cols["run_id"], name)
    t_train = np.where(np.isfinite(cols["t_train"]), cols["t_train"], np.inf)
    t_val = np.where(~cols["censored"] & np.isfinite(cols["t_val"]), cols["t_val"], np.inf)
    return _at_or_after(steps, values, t_train), _at_or_after(steps, values, t_val + AFTER * eval_every)


def flat_or_sharp(cols: dict, curves: pa.Table, keys: list[str], eval_every: int, n_resamples: int = 499,
                  seed: int = 0) -> list[dict]:
    """Per cell and compared measure: runs, runs that grokked, runs compared, how many were higher
    after, the median ratio after/before with its seed-bootstrap interval, and the sign test's p."""
    ids, uniq = cell_ids(cols, keys)
    seeds = np.unique(np.stack([cols[a] for a in SEED_AXES], 1), axis=0, return_inverse=True)[1].ravel()
    rng = np.random.default_rng(seed)
    rows = []
    for name in (n for n in COMPARED if n in curves.column_names):
        before, after = paired(cols, curves, name, eval_every)
        ok = np.isfinite(before) & np.isfinite(after) & (before != 0)
        for c in range(len(uniq)):
            cell = np.nonzero((ids == c) & ok)[0]
            n_runs, grokked = int((ids == c).sum()), int(((ids == c) & ~cols["censored"]).sum())
            if not len(cell):
                if grokked:  # measured nowhere it could be compared: say so rather than leave it out
                    rows.append(_row(keys, uniq[c], name, n_runs, grokked, 0, 0, np.nan, (np.nan, np.nan), np.nan))
                continue
            ratio = after[cell] / before[cell]
            higher, ties = int((after[cell] > before[cell]).sum()), int((after[cell] == before[cell]).sum())
            p = stats.binomtest(higher, len(cell) - ties).pvalue if len(cell) > ties else np.nan
            reps = np.array([np.median(ratio[pick]) for pick in cluster_resamples(seeds[cell], n_resamples, rng)])
            rows.append(_row(keys, uniq[c], name, n_runs, grokked, len(cell), higher, float(np.median(ratio)),
                             variance.interval(reps), p))
    return rows


def _row(keys, values, name, n_runs, grokked, compared, higher, ratio, ci, p) -> dict:
    row = {k: values[i].item() for i, k in enumerate(keys)}
    out = row | {"measure": name, "n_runs": n_runs, "n_grokked": grokked, "n_compared": compared, "n_higher_after": higher,
                 "median_ratio": ratio, "ratio_lo": ci[0], "ratio_hi": ci[1], "sign_test_p": p}
    return {k: None if isinstance(v, float) and not np.isfinite(v) else v for k, v in out.items()}


def sentences(rows: list[dict], keys: list[str]) -> list[str]:
    """One sentence per cell and measure saying which way it points, and one where the raw and the
    scale-aware measures disagree."""
    out, verdict = [], {}
    for r in rows:
        where = ", ".join(f"{k}={r[k]:g}" for k in keys) or "all runs"
        label = measures.BY_NAME[r["measure"]].label
        if not r["n_compared"]:
            out.append(f"{where}: {label} was not measured both at memorisation and {AFTER} evaluations after grokking "
                       f"in any of its {r['n_grokked']} grokked runs.")
            continue
        higher, n = r["n_higher_after"], r["n_compared"]
        way = "higher" if 2 * higher > n else "lower" if 2 * higher < n else "neither higher nor lower"
        ci = "" if r["ratio_lo"] is None else f", 95% CI {r['ratio_lo']:.3g}–{r['ratio_hi']:.3g}"
        p = "" if r["sign_test_p"] is None else f"; sign test p = {r['sign_test_p']:.2g}"
        out.append(f"{where}: {label} {way} after grokking than at memorisation in {max(higher, n - higher)} of {n} runs "
                   f"(median ratio {r['median_ratio']:.3g}{ci}{p}).")
        # A verdict: the sign test at 5%, else "no clear change".
        verdict.setdefault(where, {})[r["measure"]] = way if r["sign_test_p"] is not None and r["sign_test_p"] < 0.05 else None
    for where, v in verdict.items():
        raw = v.get("hessian_max")
        for aware, name in (("precond_sharpness", "Adam's preconditioned sharpness P⁻¹H"),
                            ("relative_flatness", "the relative flatness"), ("llc", "the LLC")):
            if raw and aware in v and v[aware] != raw:
                said = f"is {v[aware]}" if v[aware] else "shows no clear change"
                out.append(f"{where}: raw sharpness is {raw} after grokking but {name} {said}: with cross-entropy "
                           "the Hessian shrinks as the logits grow, whatever the basin, so read the raw measure with that in mind.")
    return out


def flat_or_sharp_table(rows: list[dict], keys: list[str], resolved: dict) -> pa.Table:
    """curvature.parquet: the rows of flat_or_sharp."""
    fields = key_fields(keys) + [pa.field("measure", pa.string())]
    fields += [pa.field(k, pa.int64()) for k in ("n_runs", "n_grokked", "n_compared", "n_higher_after")]
    fields += [pa.field(k, pa.float64()) for k in ("median_ratio", "ratio_lo", "ratio_hi", "sign_test_p")]
    return pa.Table.from_pylist(rows, schema=pa.schema(fields).with_metadata(results.metadata("curvature", resolved)))


def median_curves(cols: dict, curves: pa.Table | None, keys: list[str], names=NUMERICS, max_cells: int = 6) -> dict | None:
    """Per cell (at most `max_cells`), the median over its runs of each of `names` at every evaluation,
    grokked or not (softmax collapse happens in runs that never grok): {"steps", "names", "cells":
    [(values of `keys`, {name: medians})]}; None where no numerics column was measured."""
    if curves is None or not any(n in curves.column_names and curves.column(n).null_count < curves.num_rows
                                 for n in names[1:]):
        return None
    present = [n for n in names if n in curves.column_names and curves.column(n).null_count < curves.num_rows]
    ids, uniq = cell_ids(cols, keys)
    matrices = {n: curve_matrix(curves, cols["run_id"], n) for n in present}
    steps = next(iter(matrices.values()))[0]
    cells = []
    for c in range(min(len(uniq), max_cells)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an evaluation where no run has a value
            medians = {n: np.nanmedian(v[ids == c], 0) for n, (_, v) in matrices.items()}
        cells.append(({k: uniq[c][i].item() for i, k in enumerate(keys)}, medians))
    return {"steps": steps, "names": present, "cells": cells}
