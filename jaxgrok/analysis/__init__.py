"""From a results directory to what its grokking times mean.

`analyze(dir)` reads runs.parquet (and curves.parquet) and computes everything into an `Analysis`;
`write(analysis, dir)` writes its Parquet tables and has the report draw it. One module per question:
cells (Kaplan–Meier per cell), variance (Tobit variance components), sensitivity (seeds and the
perturbation map), grokfast (the speed-up), warning (early warning), curvature (flat or sharp),
compare (`jaxgrok compare`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from jaxgrok import results
from jaxgrok.analysis import cells, curvature, grokfast, sensitivity, warning
from jaxgrok.sweep import SEED_AXES


class AnalysisError(ValueError):
    """Input that cannot be analysed; the message is one line."""


@dataclass(frozen=True)
class Analysis:
    """Everything `jaxgrok analyze` computes for one results directory; the report draws it."""

    runs: dict[str, np.ndarray]  # runs.parquet as numpy columns (cells.load_runs)
    sweep: dict  # the resolved sweep the runs were trained under
    curves: pa.Table | None  # curves.parquet, where there is one
    swept: list[str]  # the axes that vary, seeds included
    keys: list[str]  # the axes that name a cell
    cells: list[dict]  # cells.cell_stats over `keys`
    plot_axes: list[str]  # the phase diagram's one or two axes (--x, --y, or the first two keys)
    plot_cells: list[dict]  # cells.cell_stats over `plot_axes` (other axes pooled)
    sensitivity: list[dict]  # sensitivity.sensitivity rows; empty where no seed varies
    rank_correlation: tuple[float, int] | None  # median Spearman ρ between cells sharing seeds, and of how many pairs
    speedup: list[dict]  # grokfast.grokfast_speedup rows; empty without unfiltered runs
    warning: warning.EarlyWarning | None  # without curves.parquet: None
    flat_or_sharp: list[dict]  # curvature.flat_or_sharp rows; empty where no curvature measure was taken
    curvature_said: tuple[str, ...]  # curvature.sentences of those rows
    numerics: dict | None  # curvature.median_curves of the softmax numerics per cell; None where not measured
    notes: tuple[str, ...]  # sentences for the report
    tables: dict[str, pa.Table]  # name -> the table written as name.parquet, in the order written
    # nanda.signatures rows with the final key frequencies (analyze --final-keys), and whether the
    # second pass reproduced the runs bit for bit; empty and None without it
    nanda: tuple[dict, ...] = ()
    nanda_exact: bool | None = None


def _read_curves(results_dir: Path, cols: dict, resolved: dict) -> pa.Table | None:
    """curves.parquet, checked against runs.parquet, or None where there is none."""
    curves_path = results_dir / "curves.parquet"
    if not curves_path.exists():
        return None
    results.check_pair(results_dir / "runs.parquet", curves_path)
    curves = results.read(curves_path, "curves")
    cfg = resolved["train"]
    counts = results.evaluations(cols["stopped_at"], cfg["steps"], cfg["eval_every"])
    if not results.every_evaluation(curves.column("run_id").to_pylist(), cols["run_id"].tolist(), counts):
        raise AnalysisError(f"{results_dir / 'runs.parquet'} and {curves_path} disagree: the curves hold "
                            f"{curves.num_rows} rows, not the {cfg['steps'] // cfg['eval_every']} evaluations of each "
                            f"of {len(cols['run_id'])} runs (or to its stopped_at)")
    return curves


def _embedding_snapshots(resolved: dict, cols: dict) -> warning.Snapshots | None:
    """The embedding of the run and moments warning.snapshot_moments picks, retrained from the sweep
    in the metadata by the engine (bit for bit on CPU); None where the model has no embedding."""
    from jaxgrok import engine, models, tasks  # jax: imported only where the snapshots are wanted
    from jaxgrok.sweep import sweep_from_dict

    picked = warning.snapshot_moments(resolved, cols)
    if picked is None:
        return None
    run_id, moments, labels = picked
    sweep = sweep_from_dict(resolved, "<metadata>")
    table = tasks.make_table(sweep.static.task)
    model = models.build(sweep.static.model, table.n_symbols, table.n_classes)
    if model.embedding is None:  # a registered model may have none
        return None
    params = engine.params_at(sweep, run_id, moments)
    return warning.snapshots(run_id, {s: np.asarray(model.embedding(p)) for s, p in params.items()}, labels)


def _notes(cols: dict, rows: list[dict], resolved: dict) -> list[str]:
    """What the report says about the runs before anything is estimated."""
    notes = []
    if window := resolved["train"].get("stop_after_grokking"):
        retired = int(np.isfinite(np.asarray(cols["stopped_at"], float)).sum())
        notes.append(f"{retired} of {len(cols['run_id'])} runs retired {window:,} steps after they grokked "
                     f"(stop_after_grokking): their curves end at stopped_at, and t_val is the first step from which "
                     f"validation accuracy stays ≥ {resolved['grokking']['threshold']:g} through that window, not to "
                     f"the budget. A run that would have fallen back later keeps it; runs that did not grok trained "
                     f"their whole budget.")
    if len(cols["run_id"]) < 2:
        notes.append("A single run: no distribution to estimate.")
    if all(r["n_runs"] < 2 for r in rows):
        notes.append("Fewer than 2 seeds in every cell: no spread to report.")
    return notes


def _not_reached(cols: dict, rows: list[dict], keys: list[str]) -> list[str]:
    """A sentence per cell whose median grokking time is not reached."""
    budget = int(cols["steps"].max())
    label = lambda r: ", ".join(f"{k}={r[k]:g}" for k in keys) or "all runs"  # noqa: E731
    return [f"{label(r)}: median grokking time not reached ({r['n_runs'] - r['n_grokked']} of {r['n_runs']} runs "
            f"censored at {budget})." for r in rows if r["t_val_median"] is None]


def analyze(results_dir: str | Path, x: str | None = None, y: str | None = None, final_keys: bool = False) -> Analysis:
    """Read DIR/runs.parquet (and curves.parquet) and compute every statistic, table and snapshot
    `jaxgrok analyze DIR [--x X --y Y] [--final-keys]` reports; nothing is written. `final_keys`:
    retrain the runs for Nanda's restricted and excluded losses (analysis/nanda.py). Raises
    AnalysisError (one line) for input that cannot be analysed, results.ResultsError for a file that
    is not jaxgrok's."""
    results_dir = Path(results_dir)
    cols, resolved = cells.load_runs(results_dir)
    curves = _read_curves(results_dir, cols, resolved)  # read and checked before anything is computed
    keys, swept = cells.cell_axes(cols), cells.swept_axes(cols)
    for flag, axis in (("--x", x), ("--y", y)):
        if axis is not None and axis not in swept:
            raise AnalysisError(f"{results_dir}: {flag} {axis}: not a swept axis (swept: {', '.join(swept) or 'none'})")
    rows = cells.cell_stats(cols, keys)
    notes = _notes(cols, rows, resolved)
    tables = {"stats": cells.stats_table(rows, keys, resolved)}
    sens_rows = []
    if any(a in SEED_AXES for a in swept):
        sens_rows, sens_notes = sensitivity.sensitivity(cols, keys)
        notes += sens_notes
        tables["sensitivity"] = sensitivity.sensitivity_table(sens_rows, resolved)
    else:
        notes.append("Seeds do not vary: no initialization sensitivity to report.")
    speedup = []
    if grokfast.applies(cols, keys):
        speedup = grokfast.grokfast_speedup(cols, keys)
        tables["grokfast"] = grokfast.speedup_table(speedup, keys, resolved)
    warn = None
    if curves is not None:
        warn = warning.early_warning(cols, curves, resolved, keys)
        tables |= warn.tables
        if resolved.get("measures", {}).get("fourier"):
            warn = dataclasses.replace(warn, snapshots=_embedding_snapshots(resolved, cols))
    sharp = []
    if curvature.applies(curves):
        sharp = curvature.flat_or_sharp(cols, curves, keys, resolved["train"]["eval_every"])
        tables["curvature"] = curvature.flat_or_sharp_table(sharp, keys, resolved)
    said, exact = (), None
    if final_keys:
        said, exact, tables["final_key_losses"] = _final_key_losses(results_dir, cols, curves, resolved)
    plot_axes = [a for a in (x, y) if a] or keys[:2]
    plot_cells = rows if plot_axes == keys else cells.cell_stats(cols, plot_axes) if plot_axes else []  # others pooled
    rhos = [s["estimate"] for s in sens_rows if s["measure"] == "rank_correlation_t_val"]
    return Analysis(
        runs=cols, sweep=resolved, curves=curves, swept=swept, keys=keys, cells=rows, plot_axes=plot_axes,
        plot_cells=plot_cells, sensitivity=sens_rows, rank_correlation=(np.median(rhos), len(rhos)) if rhos else None,
        speedup=speedup, warning=warn, flat_or_sharp=sharp, curvature_said=tuple(curvature.sentences(sharp, keys)),
        numerics=curvature.median_curves(cols, curves, keys), notes=tuple(notes + _not_reached(cols, rows, keys)), tables=tables,
        nanda=said, nanda_exact=exact)


def _final_key_losses(results_dir: Path, cols: dict, curves: pa.Table | None, resolved: dict):
    """(signature rows, replayed bit for bit, final_key_losses table): the second pass of nanda.py."""
    from jaxgrok.analysis import nanda
    from jaxgrok.sweep import sweep_from_dict
    from jaxgrok.tasks import SUM_OPS

    where = f"{results_dir}: --final-keys"
    if resolved["task"].get("op") not in SUM_OPS:
        raise AnalysisError(f"{where}: the restricted and excluded losses are defined for x+y and x-y, not {resolved['task'].get('op')}")
    if curves is None or not resolved["measures"].get("fourier"):
        raise AnalysisError(f"{where}: needs curves.parquet and the runs' key frequencies ([measures] fourier = true)")
    cfg = resolved["train"]
    n_evals = cfg["steps"] // cfg["eval_every"]
    ends = results.evaluations(cols["stopped_at"], cfg["steps"], cfg["eval_every"])
    steps = np.arange(1, n_evals + 1) * cfg["eval_every"]
    runs = np.asarray(cols["run_id"], np.int64)
    values, metrics = nanda.losses(sweep_from_dict(resolved, "<metadata>"), runs, [[] if f is None else [int(k) for k in f] for f in cols["key_freqs"]])
    named = {m: results.dense(curves.column(m).to_numpy(zero_copy_only=False), ends, n_evals)
             for m in ("train_loss", "val_loss", "weight_norm")}
    replayed = np.where(np.arange(n_evals) < ends[:, None], metrics[..., _metric("train_loss")], np.nan)
    exact = bool(np.array_equal(replayed.astype(np.float32), named["train_loss"].astype(np.float32), equal_nan=True))
    table = nanda.table(runs, steps, values, ends, resolved, exact)
    return tuple(nanda.signatures(cols, named, steps, values, ends)), exact, table


def _metric(name: str) -> int:
    """The index of a metric in a chunk's rows (train.METRICS), without importing jax."""
    from jaxgrok import measures

    return measures.METRICS.index(name)


def write(analysis: Analysis, results_dir: str | Path) -> dict[str, Path]:
    """Write each of the analysis's tables as DIR/name.parquet, then figures/ and report.html.
    Returns {name: path} of everything written."""
    from jaxgrok import report  # matplotlib: loaded only when something is drawn

    results_dir = Path(results_dir)
    written = {}
    for name, table in analysis.tables.items():
        written[name] = results_dir / f"{name}.parquet"
        results.write_atomic(table, written[name])
    return written | report.write(analysis, results_dir)
