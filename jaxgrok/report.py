"""Figures (PNG and SVG) and a one-page report.html that embeds them, for one results directory."""

from __future__ import annotations

import base64
import html
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
matplotlib.rcParams["svg.fonttype"] = "none"  # SVG text stays text: searchable, editable
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import BoundaryNorm, ListedColormap, LogNorm  # noqa: E402
from matplotlib.ticker import MaxNLocator, NullFormatter, NullLocator  # noqa: E402

from jaxgrok.grokking import PHASES  # noqa: E402

PHASE_COLOURS = {"comprehension": "#4daf4a", "grokking": "#377eb8", "memorization": "#ff7f00", "confusion": "#999999"}


def _save(fig, folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    fig.savefig(folder / f"{name}.svg", bbox_inches="tight")
    fig.savefig(folder / f"{name}.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return folder / f"{name}.png"


def _spans_decades(values) -> bool:
    v = np.asarray(values, float)
    return bool((v > 0).all() and v.max() / v.min() >= 30)


def phase_diagram(rows: list[dict], x: str, y: str | None, folder: Path) -> Path:
    """Three panels over (x, y): majority phase, Kaplan–Meier median t_val on a log colour scale
    (hatched where the median is not reached), and the fraction of runs that grokked."""
    xs = sorted({r[x] for r in rows})
    ys = sorted({r[y] for r in rows}) if y else [0]
    grid = lambda f: np.array([[next((f(r) for r in rows if r[x] == xv and (not y or r[y] == yv)), np.nan)  # noqa: E731
                                for xv in xs] for yv in ys], float)
    phase = grid(lambda r: PHASES.index(r["phase"]))
    median = grid(lambda r: np.nan if r["t_val_median"] is None else r["t_val_median"])
    frac = grid(lambda r: r["frac_grokked"])

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.4), gridspec_kw={"wspace": 0.5})
    cmap = ListedColormap([PHASE_COLOURS[p] for p in PHASES])
    axes[0].imshow(phase, cmap=cmap, norm=BoundaryNorm(np.arange(-0.5, 4), 4), origin="lower", aspect="auto")
    axes[0].legend(handles=[plt.Rectangle((0, 0), 1, 1, color=PHASE_COLOURS[p]) for p in PHASES], labels=list(PHASES),
                   loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=8)
    axes[0].set_title("majority phase (Liu et al. 2022)")
    finite = median[np.isfinite(median)]
    im = axes[1].imshow(median, cmap="viridis", origin="lower", aspect="auto",
                        norm=LogNorm(finite.min(), max(finite.max(), finite.min() * 1.01)) if finite.size else None)
    for (i, j), v in np.ndenumerate(median):
        if not np.isfinite(v):  # more than half of the cell's runs censored: median not reached
            axes[1].add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", color="0.4"))
    if finite.size:
        fig.colorbar(im, ax=axes[1], label="median t_val (steps)")
    else:  # no colour scale to show: say why
        axes[1].text(0.5, 0.5, "no cell's median reached:\nmost runs censored in every cell", ha="center", va="center",
                     transform=axes[1].transAxes, bbox={"facecolor": "white", "alpha": 0.9})
    axes[1].set_title("median grokking time (hatched: not reached)")
    im = axes[2].imshow(frac, cmap="magma", vmin=0, vmax=1, origin="lower", aspect="auto")
    fig.colorbar(im, ax=axes[2], label="fraction grokked")
    axes[2].set_title("fraction of runs grokked")
    for ax in axes:
        _ticks(ax, xs, "x")
        _ticks(ax, ys, "y")
        ax.set_xlabel(x + (" (log)" if _spans_decades(xs) else ""))
        if y:
            ax.set_ylabel(y + (" (log)" if _spans_decades(ys) else ""))
    return _save(fig, folder, "phase_diagram")


def _label(row, keys) -> str:
    return ", ".join(f"{k}={row[k]:g}" for k in keys) or "all runs"


def _ticks(ax, values, axis: str = "x") -> None:
    """Tick labels for the cells' values that never run together: thinned and tilted when many."""
    labels = [f"{v:g}" for v in values]
    step = max(1, int(np.ceil(len(labels) / 12)))
    shown = [lab if i % step == 0 else "" for i, lab in enumerate(labels)]
    tilt = 45 if axis == "x" and max(map(len, labels), default=0) * min(len(labels), 12) > 60 else 0
    (ax.set_xticks if axis == "x" else ax.set_yticks)(range(len(values)), shown, rotation=tilt)


def _band(ecdf):
    """The 95% pointwise band (log-log) of a Kaplan–Meier curve, None when no run grokked."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            return ecdf.sf.confidence_interval(0.95, method="log-log")
        except (ValueError, RuntimeError):
            return None


def _survival_panel(ax, r, grid, budget, colour, label=None) -> None:
    sf = r["_survival"].sf
    ax.step(grid, sf.evaluate(grid), where="post", color=colour, label=label)
    band = _band(r["_survival"])
    if band is not None:
        ax.fill_between(grid, band.low.evaluate(grid), band.high.evaluate(grid), step="post", color=colour, alpha=0.15, lw=0)
    if r["n_runs"] > r["n_grokked"]:  # the runs still not grokked at the budget: censored there
        ax.plot([budget], [sf.evaluate(budget)], "|", color=colour, ms=14, mew=2)


def _cell_title(r, keys) -> str:
    """A cell's name with its counts (in the legend or the panel title: never on the curves, where
    two cells ending at one level would write over each other)."""
    return f"{_label(r, keys)} (n={r['n_runs']}, {r['n_runs'] - r['n_grokked']} censored)"


def survival_curves(rows, keys, budget: float, folder: Path, max_overlaid: int = 6, max_panels: int = 36) -> Path:
    """Fraction of runs not yet grokked against step (Kaplan–Meier) with its 95% band and the
    censored runs marked at the budget: one axes for a few cells, small multiples for more, and a
    stated selection (every k-th cell) beyond `max_panels`."""
    grid = np.linspace(0, budget, 400)
    title = "not yet grokked (Kaplan–Meier, 95% band; | censored at the budget)"
    if len(rows) <= max_overlaid:
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        for i, r in enumerate(rows):
            _survival_panel(ax, r, grid, budget, f"C{i}", _cell_title(r, keys))
        ax.set(xlabel="step", ylabel="fraction not yet grokked", ylim=(-0.02, 1.05), title=title)
        ax.legend(fontsize=7, loc="lower left")
        return _save(fig, folder, "survival")
    every = int(np.ceil(len(rows) / max_panels))
    shown = rows[::every]
    cols = min(6, len(shown))
    n_rows = int(np.ceil(len(shown) / cols))
    fig, axes = plt.subplots(n_rows, cols, figsize=(2.6 * cols, 2.1 * n_rows + 0.6), sharex=True, sharey=True, squeeze=False)
    for ax, r in zip(axes.flat, shown):
        _survival_panel(ax, r, grid, budget, "C0")
        ax.set_title(_cell_title(r, keys), fontsize=7)
        ax.set_ylim(-0.02, 1.1)
    for ax in axes.flat[len(shown):]:
        ax.set_visible(False)
    said = f"all {len(rows)} cells" if every == 1 else f"{len(shown)} of {len(rows)} cells (one in {every}, in table order)"
    fig.suptitle(f"{title}: {said}", fontsize=9)
    for ax in axes[:, 0]:
        ax.set_ylabel("not yet grokked", fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("step", fontsize=7)
    fig.tight_layout()
    return _save(fig, folder, "survival")


def _round_ticks(lo: float, hi: float) -> list[float]:
    """At most four round values between lo and hi, spread on a log scale: 1, 2, 5 × 10^k, or where
    fewer than two of those fall inside (a range within one decade, 5,100 to 8,800 say), 1 to 9 × 10^k."""
    decades = range(int(np.floor(np.log10(max(lo, 1)))), int(np.ceil(np.log10(max(hi, 1)))) + 1)
    for mantissas in ((1, 2, 5), range(1, 10)):
        inside = [m * 10.0**k for k in decades for m in mantissas if lo <= m * 10.0**k <= hi]
        if len(inside) >= 2:
            break
    return inside[:: max(1, int(np.ceil(len(inside) / 4)))]


def t_val_distribution(cols, keys, rows, folder: Path, max_panels: int = 12) -> Path:
    """Per cell, the histogram of grokking times (log steps) with the censored runs as a grey
    '>budget' bar of their own: nothing pooled across cells. Beyond `max_panels` cells, cells are
    pooled over all axes but the first, and the title says so."""
    from jaxgrok.analyze import cell_ids

    shown_keys = keys if len(rows) <= max_panels else keys[:1]
    ids, uniq = cell_ids(cols, shown_keys)
    budget = float(cols["steps"].max())
    grokked = ~cols["censored"]
    t_all = cols["t_val"][grokked]
    lo, hi = (t_all.min(), t_all.max()) if t_all.size else (1.0, budget)
    bins = np.geomspace(max(lo, 1) / 1.05, hi * 1.05, 20) if hi > lo else np.array([lo * 0.9, hi * 1.1])
    n = len(uniq)
    cols_n = min(4, n)
    n_rows = int(np.ceil(n / cols_n))
    fig, axes = plt.subplots(n_rows, cols_n, figsize=(3.4 * cols_n, 2.4 * n_rows + 0.6), sharex=True, squeeze=False)
    over = bins[-1] * 1.25  # where the '>budget' bar stands, right of every grokked time
    for c, ax in enumerate(axes.flat):
        if c >= n:
            ax.set_visible(False)
            continue
        m = ids == c
        t = cols["t_val"][m & grokked]
        ax.hist(t, bins=bins, color="#377eb8")
        k = int((m & ~grokked).sum())
        ax.bar(over, k, width=over * 0.25, color="0.6", hatch="//", edgecolor="0.3")
        ax.set_xscale("log")
        row = {key: uniq[c][i].item() for i, key in enumerate(shown_keys)}
        # two lines: a cell named by several axes never runs into the next panel's title
        ax.set_title(f"{_label(row, shown_keys)}\n{int(m.sum()) - k} grokked, {k} censored", fontsize=7)
        ax.xaxis.set_minor_formatter(NullFormatter())  # log axes label minor ticks: they run together
        ax.xaxis.set_minor_locator(NullLocator())
        ticks = _round_ticks(bins[0], bins[-1])
        ax.set_xticks(ticks + [over], [f"{v:g}" for v in ticks] + [f">{budget:g}"], fontsize=7)
        ax.set_xlim(bins[0] * 0.9, over * 1.3)
    pooled = [k for k in keys if k not in shown_keys]
    fig.suptitle("grokking time t_val per cell (steps, log); grey: censored, not grokked by the budget"
                 + (f" — pooled over {', '.join(pooled)} ({len(rows)} cells)" if pooled else ""), fontsize=9)
    for ax in axes[:, 0]:
        ax.set_ylabel("runs", fontsize=8)
    fig.tight_layout()
    return _save(fig, folder, "t_val_distribution")


def accuracy_curves(curves, cols, keys, folder: Path, threshold: float, n: int = 6) -> Path:
    """Train (dashed) and validation (solid) accuracy of a sample of runs, each labelled by its
    swept values, with t_train (○) and t_val (★) marked where reached."""
    from jaxgrok.analyze import swept_axes

    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    run = curves.column("run_id").to_numpy()
    step = curves.column("step").to_numpy()
    picks = np.linspace(0, len(cols["run_id"]) - 1, min(n, len(cols["run_id"]))).astype(int)
    label_keys = [k for k in swept_axes(cols) if k not in keys] + keys
    for i, row in enumerate(picks):
        rid, colour = cols["run_id"][row], f"C{i}"
        m = run == rid
        ax.plot(step[m], curves.column("train_acc").to_numpy()[m], "--", color=colour)
        values = {k: cols[k][row] for k in label_keys}
        ax.plot(step[m], curves.column("val_acc").to_numpy()[m], "-", color=colour, label=_label(values, label_keys))
        if np.isfinite(cols["t_train"][row]):
            ax.plot(cols["t_train"][row], threshold, "o", color=colour, mfc="white")
        if np.isfinite(cols["t_val"][row]):
            ax.plot(cols["t_val"][row], threshold, "*", color=colour, ms=11)
    ax.set(xscale="log", xlabel="step", ylabel="accuracy", ylim=(-0.02, 1.05),
           title="train (dashed) and validation (solid) accuracy; ○ t_train, ★ t_val")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, folder, "accuracy_curves")


def along_one_axis(rows: list[dict], x: str, budget: float, folder: Path) -> Path:
    """A sweep with one hyperparameter axis: median grokking time with its 95% interval (a ▲ at the
    budget where the median is not reached) and the fraction grokked with its exact interval."""
    xs = np.array([r[x] for r in rows], float)
    order = np.argsort(xs)
    rows, xs = [rows[i] for i in order], xs[order]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"wspace": 0.3})
    log = _spans_decades(xs)
    for r, xv in zip(rows, xs):
        colour = PHASE_COLOURS[r["phase"]]
        if r["t_val_median"] is None:
            a.plot(xv, budget, "^", color=colour, ms=9)
            continue
        lo = r["t_val_median_lo"] if r["t_val_median_lo"] is not None else r["t_val_median"]
        hi = r["t_val_median_hi"] if r["t_val_median_hi"] is not None else budget
        a.errorbar(xv, r["t_val_median"], yerr=[[r["t_val_median"] - lo], [hi - r["t_val_median"]]], fmt="o",
                   color=colour, capsize=3)
    a.axhline(budget, color="0.6", ls=":", lw=1)
    reached = [r["t_val_median_lo"] or r["t_val_median"] for r in rows if r["t_val_median"] is not None]
    a.set_ylim(min(reached + [budget]) / 1.5, budget * 1.3)  # room for the ▲, and never a zero-height axis
    a.set(xlabel=x, ylabel="median t_val (steps)", yscale="log",
          title="median grokking time (95% CI; ▲ not reached by the budget)")
    frac = np.array([r["frac_grokked"] for r in rows])
    err = np.array([[f - r["frac_grokked_lo"], r["frac_grokked_hi"] - f] for f, r in zip(frac, rows)]).T
    b.errorbar(xs, frac, yerr=err, fmt="o-", color="0.2", capsize=3)
    b.set(xlabel=x, ylabel="fraction grokked", ylim=(-0.03, 1.03), title="fraction of runs grokked (exact 95% CI)")
    for ax in (a, b):
        if log:
            ax.set_xscale("log")
    a.legend(handles=[plt.Line2D([], [], marker="o", ls="", color=PHASE_COLOURS[p]) for p in PHASES], labels=list(PHASES),
             fontsize=7, title="majority phase", title_fontsize=7)
    return _save(fig, folder, "phase_diagram")


MEASURE_LABELS = {
    "weight_norm": "weight norm ‖θ‖", "dist_from_init": "‖θ − θ₀‖", "fourier_gini": "Fourier Gini",
    "n_key_freqs": "key frequencies", "top_freq_share": "top frequency's share", "circularity": "circularity",
    "restricted_loss": "restricted loss", "excluded_loss": "excluded loss", "llc": "LLC (SGLD)",
}


def _fill_gaps(values: np.ndarray) -> np.ndarray:
    """Linear interpolation across the evaluations a measure skips (the LLC's cadence), inside each
    run's first and last value only: for drawing, never for statistics."""
    out = values.copy()
    x = np.arange(values.shape[1])
    for row in out:
        ok = np.isfinite(row)
        if 1 < ok.sum() < len(row):
            inside = (x >= x[ok][0]) & (x <= x[ok][-1])
            row[inside] = np.interp(x[inside], x[ok], row[ok])
    return out


def aligned_measures(present: dict, steps: np.ndarray, cols, ids, uniq, keys, folder: Path, max_cells: int = 6) -> Path:
    """Each measure against step − t_val over the grokked runs: median and interquartile band per
    cell (an offset is drawn where at least 3 runs have a value there)."""
    names = [n for n in MEASURE_LABELS if n in present]
    grokked = ~cols["censored"]
    cells = [c for c in range(len(uniq)) if (grokked & (ids == c)).any()]
    shown = cells[:max_cells]
    n_col = 3
    n_row = -(-len(names) // n_col)
    fig, axes = plt.subplots(n_row, n_col, figsize=(15, 3.3 * n_row), squeeze=False)
    every = steps[1] - steps[0] if len(steps) > 1 else 1
    n = len(steps)
    offsets = (np.arange(2 * n - 1) - (n - 1)) * every
    for ax, name in zip(axes.flat, names):
        for j, c in enumerate(shown):
            runs = np.nonzero(grokked & (ids == c))[0]
            grid = np.full((len(runs), 2 * n - 1), np.nan)
            shift = ((steps[None, :] - cols["t_val"][runs, None]) // every + (n - 1)).astype(int)
            grid[np.arange(len(runs))[:, None], shift] = _fill_gaps(present[name][runs])
            # Offsets reached by few runs (the longest waits) would draw noise as structure.
            enough = np.isfinite(grid).sum(0) >= min(len(runs), max(3, len(runs) // 4))
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # all-NaN columns outside `enough` are not drawn
                q = np.nanpercentile(grid[:, enough], [25, 50, 75], axis=0)
            if not enough.any():
                continue
            label = _label({k: uniq[c][i] for i, k in enumerate(keys)}, keys) + f" ({len(runs)} runs)"
            ax.plot(offsets[enough], q[1], color=f"C{j}", lw=1.3, label=label)
            ax.fill_between(offsets[enough], q[0], q[2], color=f"C{j}", alpha=0.2, lw=0)
        ax.axvline(0, color="k", lw=0.8, ls=":")
        finite = present[name][np.isfinite(present[name])]
        if name in ("restricted_loss", "excluded_loss") and _spans_decades(finite[finite > 0]):
            ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(6))
        ax.xaxis.set_major_formatter(lambda v, _: f"{v / 1000:g}k" if abs(v) >= 1000 else f"{v:g}")
        ax.set(title=MEASURE_LABELS[name], xlabel="step − t_val (grokking at 0)")
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    if names:
        axes.flat[0].legend(fontsize=7)
    more = f"; cells shown: the first {len(shown)} of {len(cells)}" if len(cells) > len(shown) else ""
    fig.suptitle(f"measures aligned on each run's grokking time (median and interquartile band over grokked runs{more})")
    fig.tight_layout()
    return _save(fig, folder, "measures_aligned")


def circle_forming(run_id: int, snapshots: dict, labels: dict, folder: Path) -> Path:
    """One run's embedding at a few moments (`labels`: step -> what the moment is), projected on
    the plane of its final top frequency k: the residues arrange on a circle as the run groks, each
    t at the angle of k·t mod p (the colour), as a clock at frequency k places it."""
    from jaxgrok.measures import fourier

    steps = sorted(snapshots)
    last = snapshots[steps[-1]]
    p = last.shape[0]
    coef = np.asarray(fourier.coefficients(last - last.mean(0), fourier.basis(p)))
    k = int(((coef**2).sum((1, 2))).argmax())
    plane = np.linalg.qr(coef[k].T)[0]  # [D, 2]: orthonormal, spanned by the cos and sin components
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
    return _save(fig, folder, "circle_forming")


def _fmt(v, digits=0):
    return "not reached" if v is None else f"{v:,.{digits}f}".replace("-", "−")


def _warning_html(warn: dict | None, keys) -> str:
    if not warn:
        return ""
    lead = "".join(
        f"<tr><td>{html.escape(r['measure'])}</td><td style='text-align:left'>{html.escape(r['event'])}</td>"
        + "".join(f"<td>{r[k]:g}</td>" for k in keys)
        + f"<td>{r['n_runs']}</td><td>{r['n_grokked']}</td><td>{_fmt(r['lead_median'])} "
        f"({_fmt(r['lead_median_lo'])} to {_fmt(r['lead_median_hi'])})</td>"
        f"<td>{_fmt(r['lead_q25'])} to {_fmt(r['lead_q75'])}</td></tr>" for r in warn["lead_times"])
    conc = "".join(
        ("<tr style='background:#eee'>" if r["baseline"] else "<tr>") + f"<td>{html.escape(r['measure'])}"
        f"{' (baseline)' if r['baseline'] else ''}</td><td>{html.escape(r['moment'])}</td><td>{r['c_index']:.2f}</td>"
        f"<td>{'higher' if r['c_index'] > 0.5 else 'lower' if r['c_index'] < 0.5 else 'neither'} → earlier</td>"
        f"<td>{_ci(r['ci_lo'], r['ci_hi'])}</td><td>{r['n_runs']}</td><td>{r['n_pairs']:,}</td></tr>"
        for r in sorted(warn["concordance"], key=lambda r: (r["moment"], -abs(r["c_index"] - 0.5))))
    return f"""<h2>Early warning: the progress measures</h2>
<p>Each run's <i>event</i> is when a measure moves: the peak of the weight norm and of the LLC; the first
step at which the Fourier Gini or the circularity has gone half-way from its first to its last value; the
first step after t_train at which the excluded loss has risen half-way from its value at t_train to its later
peak. Its <i>lead time</i> is t_val − event, positive when the measure moves before grokking. Runs that did not grok are censored at budget − event
(Kaplan–Meier, as for t_val). Per run: events.parquet; per cell: lead_times.parquet.</p>
<table><tr><th>measure</th><th>event</th>{"".join(f"<th>{html.escape(k)}</th>" for k in keys)}<th>runs with an event</th>
<th>grokked</th><th>median lead time (95% CI)</th><th>interquartile range</th></tr>{lead}</table>
<p><b>Which measure ranks runs by grokking time?</b> At a landmark (t_train, and later), among the runs that have
memorised and not yet grokked, Harrell's C is the share of comparable pairs (same cell; the earlier t_val observed)
in which the run with the <i>higher</i> value grokked first: 0.5 is no information, 1 perfect, below 0.5 the
measure ranks the other way (a lower value means earlier grokking). Intervals: percentile bootstrap over runs.
Weight norm alone is the baseline. (concordance.parquet)</p>
<table><tr><th>measure</th><th>read at</th><th>C</th><th>ranks as</th><th>95% CI</th><th>runs</th><th>pairs</th></tr>{conc}</table>"""


def perturbation_map(sens_rows: list[dict], folder: Path) -> Path:
    """Against the perturbation size ε (log axis): the share of the variance of log t_val that lies
    among perturbations of one base initialization, and Spearman ρ with the unperturbed run."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"wspace": 0.3})
    for ax, measure, label in ((axes[0], "perturbation_share_log_t_val", "share of var(log t_val) among perturbations\nof one base initialization"),
                               (axes[1], "rank_correlation_unperturbed", "Spearman ρ of t_val with the\nunperturbed run (ε = 0)")):
        pts = sorted((r["init_noise"], r["estimate"], r["ci_lo"], r["ci_hi"]) for r in sens_rows
                     if r["measure"] == measure and r["estimate"] is not None)
        if not pts:
            ax.text(0.5, 0.5, "not estimated", ha="center", va="center", transform=ax.transAxes)
            continue
        e, est, lo, hi = (np.array(v, float) for v in zip(*pts))
        ax.errorbar(e, est, yerr=[np.nan_to_num(est - lo), np.nan_to_num(hi - est)], fmt="o-", capsize=3)
        ax.set_xscale("log")
        ax.set_xlabel("perturbation size ε (relative to the initializer's scale)")
        ax.set_ylabel(label)
        ax.axhline(0 if "share" in measure else 1, color="0.6", lw=0.8, ls=":")
        ax.set_ylim(-0.05 if "share" in measure else min(-0.1, np.nanmin(lo) - 0.05), 1.05)
        ax.grid(alpha=0.3)
    axes[0].set_title("where the initialization stops deciding grokking time")
    axes[1].set_title("does a perturbed run keep its base's rank?")
    return _save(fig, folder, "perturbation_map")


def _ci(lo, hi, fmt="{:.2f}") -> str:
    ok = lambda v: v is not None and np.isfinite(v)  # noqa: E731
    return f"{fmt.format(lo)} to {fmt.format(hi)}".replace("-", "−") if ok(lo) and ok(hi) else "—"


VARIANCE_METHOD = """Each run's log grokking time is modelled as a cell mean plus one normal effect per level of every seed
that varies (independent, crossed) plus a normal residual (which holds the interactions), and a run that did not grok
is right-censored at the budget: a Tobit linear mixed model. The components are fitted by a stochastic-approximation EM
on the complete grid of cells × seed levels: censored log times are drawn from their normal truncated at the budget
given the current effects, and the components re-estimated by the ANOVA equations (unbiased, REML for a balanced grid);
without censoring this is exactly the ANOVA estimate. The cells' component is the variance of the cell means.
Intervals: percentile, from a pigeonhole bootstrap that resamples each seed's levels (not runs), 199 times.
Assumptions: normal effects on the log scale (a log-normal grokking time), independent seeds, a common residual
variance in every cell. Validated on simulated sweeps with 0–40% of runs censored (tests/test_variance.py)."""


def _variance_html(sens_rows) -> str:
    comp = {r["factor"]: r for r in sens_rows if r["measure"] == "variance_component_log_t_val"}
    share = {r["factor"]: r for r in sens_rows if r["measure"] == "variance_share_log_t_val"}
    if not comp:
        return ""
    body = "".join(
        f"<tr><td>{html.escape(f)}</td><td>{c['estimate']:.3f}</td><td>{_ci(c['ci_lo'], c['ci_hi'], '{:.3f}')}</td>"
        f"<td>{np.sqrt(c['estimate']):.2f}</td><td>{share[f]['estimate']:.0%}</td>"
        f"<td>{_ci(share[f]['ci_lo'], share[f]['ci_hi'], '{:.0%}')}</td></tr>" for f, c in comp.items())
    return (f"<h2>What explains the spread of log t_val</h2><p>{VARIANCE_METHOD}</p><table><tr><th>source</th>"
            "<th>variance (log steps²)</th><th>95% CI</th><th>sd (log steps)</th><th>share</th><th>95% CI</th></tr>"
            f"{body}</table>")


def _perturbation_html(sens_rows) -> str:
    rows = sorted((r for r in sens_rows if r["init_noise"] is not None), key=lambda r: (r["init_noise"], r["measure"]))
    if not rows:
        return ""
    by_eps: dict[float, dict] = {}
    for r in rows:
        by_eps.setdefault(r["init_noise"], {})[r["measure"]] = r
    body = ""
    for e, d in by_eps.items():
        sh, rho = d.get("perturbation_share_log_t_val"), d.get("rank_correlation_unperturbed")
        cell = lambda r, f: (f"<td>{f.format(r['estimate'])}</td><td>{_ci(r['ci_lo'], r['ci_hi'], f)}</td>"  # noqa: E731
                             if r and r["estimate"] is not None else "<td>—</td><td>—</td>")
        body += f"<tr><td>{e:g}</td>{cell(sh, '{:.2f}')}{cell(rho, '{:.2f}')}<td>{(sh or rho)['n']}</td></tr>"
    return ("<h2>How close must two initializations be?</h2><p>Each run starts from its base initialization (its seed) "
            "plus ε times an independent draw of the same initializer (its noise_seed). Per ε: the share of the variance "
            "of log t_val that lies <i>among perturbations of one base</i> (noise seeds and residual) rather than "
            "<i>across bases</i> (censoring-aware, as above): 0 means the base initialization decides grokking time, "
            "1 that it no longer matters. And Spearman ρ between each perturbed run's t_val and its unperturbed "
            "base's (a censored run ranks last; interval from resampling base seeds). The ε where the share rises "
            "and ρ falls is the scale below which grokking time is a smooth function of the initial weights.</p>"
            "<table><tr><th>ε</th><th>share among perturbations</th><th>95% CI</th><th>ρ with unperturbed</th>"
            f"<th>95% CI</th><th>runs</th></tr>{body}</table>")


def _grokfast_html(speedup) -> str:
    if not speedup:
        return ""
    body = "".join(
        "<tr>" + "".join(f"<td>{v:g}</td>" for k, v in r.items() if k not in _GROKFAST_COLS)
        + f"<td>{r['grokfast_lambda']:g}</td><td>{r['grokfast_alpha']:g}</td>"
        + f"<td>{r['n_grokked']}/{r['n_runs']}</td><td>{_fmt(r['median_t_val'])}</td>"
        + f"<td>{r['baseline_grokked']}/{r['baseline_runs']}</td><td>{_fmt(r['baseline_median_t_val'])}</td>"
        + f"<td>{_fmt(r['speedup'], 2)}×</td><td>{_ci(r['speedup_lo'], r['speedup_hi'])}</td></tr>" for r in speedup)
    keys = [k for k in speedup[0] if k not in _GROKFAST_COLS]
    return ("<h2>Grokfast</h2><p>Speed-up: the Kaplan–Meier median t_val of the unfiltered runs (λ = 0, same other "
            "values and seeds) over that of the filtered ones; interval from resampling seeds (both arms together). "
            "Grokfast's λ also enlarges the step, so compare against baselines at matched learning rates. (grokfast.parquet)</p>"
            "<table><tr>" + "".join(f"<th>{html.escape(k)}</th>" for k in keys)
            + "<th>λ</th><th>α</th><th>grokked</th><th>median t_val</th><th>baseline grokked</th>"
            f"<th>baseline median</th><th>speed-up</th><th>95% CI</th></tr>{body}</table>")


_GROKFAST_COLS = ("grokfast_lambda", "grokfast_alpha", "n_runs", "n_grokked", "baseline_runs", "baseline_grokked",
                  "median_t_val", "baseline_median_t_val", "speedup", "speedup_lo", "speedup_hi")


def write(results_dir: Path, cols, resolved, rows, keys, sens_rows, notes, curves, x, y, warn=None,
          speedup=None) -> dict[str, Path]:
    """Draw every figure and write report.html; returns {name: path}. `warn`: the early-warning
    analysis (analyze.py), or None."""
    folder = results_dir / "figures"
    figs = {}
    axes = [a for a in (x, y) if a] or keys[:2]
    if axes:
        from jaxgrok.analyze import cell_stats

        by_axes = rows if axes == keys else cell_stats(cols, axes)  # other axes pooled
        if len(axes) == 1:
            figs["phase_diagram"] = along_one_axis(by_axes, axes[0], float(cols["steps"].max()), folder)
        else:
            figs["phase_diagram"] = phase_diagram(by_axes, axes[0], axes[1], folder)
    figs["survival"] = survival_curves(rows, keys, float(cols["steps"].max()), folder)
    figs["t_val_distribution"] = t_val_distribution(cols, keys, rows, folder)
    if curves is not None:
        figs["accuracy_curves"] = accuracy_curves(curves, cols, keys, folder, resolved["grokking"]["threshold"])
    if warn and warn["present"] and (~cols["censored"]).any():
        figs["measures_aligned"] = aligned_measures(warn["present"], warn["steps"], cols, warn["ids"], warn["uniq"],
                                                    keys, folder)
    if any(r["init_noise"] is not None for r in sens_rows):
        figs["perturbation_map"] = perturbation_map(sens_rows, folder)
    if warn and warn.get("snapshots"):
        figs["circle_forming"] = circle_forming(*warn["snapshots"], folder)

    for r in rows:
        if r["t_val_median"] is None:
            notes.append(f"{_label(r, keys)}: median grokking time not reached "
                         f"({r['n_runs'] - r['n_grokked']} of {r['n_runs']} runs censored at {int(cols['steps'].max())}).")
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys) + (
        "<th>runs</th><th>grokked (95% CI)</th><th>median t_val (95% CI)</th><th>median t_train</th>"
        "<th>median delay</th><th>phase</th>")
    body = "".join(
        "<tr>" + "".join(f"<td>{r[k]:g}</td>" for k in keys)
        + f"<td>{r['n_runs']}</td><td>{r['n_grokked']} ({r['frac_grokked_lo']:.0%}–{r['frac_grokked_hi']:.0%})</td>"
        + f"<td>{_fmt(r['t_val_median'])} ({_fmt(r['t_val_median_lo'])}–{_fmt(r['t_val_median_hi'])})</td>"
        + f"<td>{_fmt(r['t_train_median'])}</td><td>{_fmt(r['delay_median'])}</td><td>{r['phase']}</td></tr>"
        for r in rows)
    rhos = [s["estimate"] for s in sens_rows if s["measure"] == "rank_correlation_t_val"]
    images = "".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        f'<figcaption>{name} — <a href="figures/{name}.svg">figures/{name}.svg</a></figcaption></figure>'
        for name, p in figs.items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>jaxgrok: {html.escape(resolved['name'])}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}img{{max-width:100%}}</style></head><body>
<h1>{html.escape(resolved['name'])}</h1><p><b>Follows:</b> {html.escape(resolved['paper'])}</p>
<p>{html.escape(resolved.get('description', ''))}</p>
<p>{len(cols['run_id'])} runs, {int((~cols['censored']).sum())} grokked, budget {int(cols['steps'].max())} steps,
computed in {html.escape(str(resolved['train'].get('precision', 'float32')))}.
Grokking time t_val: first evaluation from which validation accuracy stays ≥ {resolved['grokking']['threshold']}.
Runs that did not grok are right-censored at the budget (Kaplan–Meier); a median that is not reached is reported as such.</p>
<h2>Cells</h2><table><tr>{head}</tr>{body}</table>
{_variance_html(sens_rows)}
<p>{f"A fast seed stays fast? Spearman ρ of t_val between cells sharing seeds: median {np.median(rhos):.2f} over {len(rhos)} pairs of cells." if rhos else ""}</p>
{_perturbation_html(sens_rows)}
{_grokfast_html(speedup)}
{_warning_html(warn, keys)}
<h2>Notes</h2><ul>{"".join(f"<li>{html.escape(n)}</li>" for n in notes) or "<li>none</li>"}</ul>
<h2>Figures</h2>{images}</body></html>"""
    path = results_dir / "report.html"
    tmp = path.with_name(".report.html.tmp")
    tmp.write_text(page)
    tmp.replace(path)
    return {"report": path, **{f"figure_{k}": v for k, v in figs.items()}}
