"""Draws an analysis (jaxgrok.analysis.Analysis): figures/ (PNG and SVG) and report.html.

Everything drawn or printed comes from the Analysis object; the report estimates nothing and imports
nothing from the analysis but, for type checking, the class.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from jaxgrok import measures
from jaxgrok.report import figures, html, warning

if TYPE_CHECKING:
    from jaxgrok.analysis import Analysis


def draw(a: Analysis, folder: Path) -> dict[str, Path]:
    """Every figure the analysis has data for, into `folder`: {name: PNG path}, in report order."""
    cols, keys, warn = a.runs, a.keys, a.warning
    budget = float(cols["steps"].max())
    figs = {}
    if len(a.plot_axes) == 1:
        figs["phase_diagram"] = figures.along_one_axis(a.plot_cells, a.plot_axes[0], budget, folder)
    elif a.plot_axes:
        figs["phase_diagram"] = figures.phase_diagram(a.plot_cells, a.plot_axes[0], a.plot_axes[1], folder)
    figs["survival"] = figures.survival_curves(a.cells, keys, budget, folder)
    figs["t_val_distribution"] = figures.t_val_distribution(cols, keys, a.cells, folder)
    if a.curves is not None:
        label_keys = [k for k in a.swept if k not in keys] + keys
        figs["accuracy_curves"] = figures.accuracy_curves(a.curves, cols, label_keys, folder, a.sweep["grokking"]["threshold"])
    if warn and warn.present and (~cols["censored"]).any():
        shown, n_cells, bands = warn.aligned
        figs["measures_aligned"] = warning.aligned_measures(warn.present, bands, shown, n_cells, warn.uniq, keys, folder)
    if a.numerics:
        figs["softmax_numerics"] = figures.median_curves(a.numerics, keys, {n: c.label for n, c in measures.BY_NAME.items()}, folder)
    if any(r["init_noise"] is not None for r in a.sensitivity):
        figs["perturbation_map"] = figures.perturbation_map(a.sensitivity, folder)
    if warn and warn.snapshots:
        figs["circle_forming"] = warning.circle_forming(warn.snapshots, folder)
    return figs


def write(analysis: Analysis, results_dir: str | Path) -> dict[str, Path]:
    """Draw every figure into DIR/figures and write DIR/report.html; returns {"report": path,
    "figure_NAME": PNG path}."""
    results_dir = Path(results_dir)
    figs = draw(analysis, results_dir / "figures")
    path = html.write(analysis, figs, results_dir / "report.html")
    return {"report": path, **{f"figure_{k}": v for k, v in figs.items()}}
