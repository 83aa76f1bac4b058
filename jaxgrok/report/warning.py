"""The early-warning figures: the progress measures aligned on grokking, and an embedding forming a circle."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt  # set up (Agg, SVG text) by figures, which the package imports first
import numpy as np
from matplotlib.ticker import MaxNLocator

from jaxgrok import measures
from jaxgrok.report.figures import cell_label, save, spans_decades

if TYPE_CHECKING:
    from jaxgrok.analysis.warning import Snapshots

MEASURE_LABELS = measures.LABELS  # measure -> its name on a figure; the order in which figures show them
LOG_SCALED = frozenset(c.name for c in measures.MEASURE_COLUMNS if c.log_scaled)  # log axis where they span decades


def aligned_measures(present: dict, bands: dict[str, list], shown: list[int], n_cells: int, uniq, keys,
                     folder: Path) -> Path:
    """Each measure against step − t_val over the grokked runs: median and interquartile band per
    cell (warning.aligned: `bands`, one per cell of `shown`, None where no offset has enough runs;
    `n_cells` cells had a grokked run)."""
    names = [n for n in MEASURE_LABELS if n in present]
    n_col = 3
    n_row = -(-len(names) // n_col)
    fig, axes = plt.subplots(n_row, n_col, figsize=(15, 3.3 * n_row), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for j, (c, band) in enumerate(zip(shown, bands[name])):
            if band is None:
                continue
            label = cell_label({k: uniq[c][i] for i, k in enumerate(keys)}, keys) + f" ({band.n_runs} runs)"
            ax.plot(band.offsets, band.quartiles[1], color=f"C{j}", lw=1.3, label=label)
            ax.fill_between(band.offsets, band.quartiles[0], band.quartiles[2], color=f"C{j}", alpha=0.2, lw=0)
        ax.axvline(0, color="k", lw=0.8, ls=":")
        finite = present[name][np.isfinite(present[name])]
        if name in LOG_SCALED and spans_decades(finite[finite > 0]):
            ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(6))
        ax.xaxis.set_major_formatter(lambda v, _: f"{v / 1000:g}k" if abs(v) >= 1000 else f"{v:g}")
        ax.set(title=MEASURE_LABELS[name], xlabel="step − t_val (grokking at 0)")
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    if names:
        axes.flat[0].legend(fontsize=7)
    more = f"; cells shown: the first {len(shown)} of {n_cells}" if n_cells > len(shown) else ""
    fig.suptitle(f"measures aligned on each run's grokking time (median and interquartile band over grokked runs{more})")
    fig.tight_layout()
    return save(fig, folder, "measures_aligned")


def circle_forming(snap: Snapshots, folder: Path) -> Path:
    """One run's embedding at a few moments, projected on the plane of its final top frequency k:
    the residues arrange on a circle as the run groks, each t at the angle of k·t mod p (the
    colour), as a clock at frequency k places it."""
    run_id, snapshots, labels, k, plane = snap.run_id, snap.embeddings, snap.labels, snap.frequency, snap.plane
    steps = sorted(snapshots)
    p = snapshots[steps[-1]].shape[0]
    fig, axes = plt.subplots(1, len(steps), figsize=(3.2 * len(steps), 3.4))
    for ax, s in zip(np.atleast_1d(axes), steps):
        xy = (snapshots[s] - snapshots[s].mean(0)) @ plane
        ax.scatter(xy[:, 0], xy[:, 1], c=(k + 1) * np.arange(p) % p, cmap="twilight", s=18)
        order = np.argsort(np.arctan2(xy[:, 1], xy[:, 0]))
        ax.plot(*xy[np.r_[order, order[:1]]].T, color="0.8", lw=0.6, zorder=0)
        ax.set(title=f"step {s:,}: {labels.get(s, '')}", xticks=[], yticks=[], aspect="equal")
    fig.suptitle(f"run {run_id}: embedding on the plane of its top frequency k = {k + 1} "
                 f"(colour: k·t mod {p}, the place a clock at frequency k gives residue t)")
    fig.tight_layout()
    return save(fig, folder, "circle_forming")
