"""Figures (PNG and SVG) and a one-page report.html that embeds them, for one results directory."""

from __future__ import annotations

import base64
import html
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import BoundaryNorm, ListedColormap, LogNorm  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

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

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2 if y else 2.6), gridspec_kw={"wspace": 0.35})
    cmap = ListedColormap([PHASE_COLOURS[p] for p in PHASES])
    axes[0].imshow(phase, cmap=cmap, norm=BoundaryNorm(np.arange(-0.5, 4), 4), origin="lower", aspect="auto")
    axes[0].legend(handles=[plt.Rectangle((0, 0), 1, 1, color=PHASE_COLOURS[p]) for p in PHASES], labels=list(PHASES),
                   loc="upper center", bbox_to_anchor=(0.5, -0.16 if y else -0.5), ncol=2, fontsize=8)
    axes[0].set_title("majority phase (Liu et al. 2022)")
    finite = median[np.isfinite(median)]
    im = axes[1].imshow(median, cmap="viridis", origin="lower", aspect="auto",
                        norm=LogNorm(finite.min(), max(finite.max(), finite.min() * 1.01)) if finite.size else None)
    for (i, j), v in np.ndenumerate(median):
        if not np.isfinite(v):  # more than half of the cell's runs censored: median not reached
            axes[1].add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///", color="0.4"))
    fig.colorbar(im, ax=axes[1], label="median t_val (steps)")
    axes[1].set_title("median grokking time (hatched: not reached)")
    im = axes[2].imshow(frac, cmap="magma", vmin=0, vmax=1, origin="lower", aspect="auto")
    fig.colorbar(im, ax=axes[2], label="fraction grokked")
    axes[2].set_title("fraction of runs grokked")
    for ax in axes:
        ax.set_xticks(range(len(xs)), [f"{v:g}" for v in xs])
        ax.set_yticks(range(len(ys)), [f"{v:g}" for v in ys] if y else [""])
        ax.set_xlabel(x + (" (log)" if _spans_decades(xs) else ""))
        if y:
            ax.set_ylabel(y + (" (log)" if _spans_decades(ys) else ""))
    return _save(fig, folder, "phase_diagram")


def _label(row, keys) -> str:
    return ", ".join(f"{k}={row[k]:g}" for k in keys) or "all runs"


def survival_curves(rows, keys, budget: float, folder: Path) -> Path:
    """Fraction of runs not yet grokked against step, one Kaplan–Meier curve per cell."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    grid = np.linspace(0, budget, 400)
    shown = rows if len(rows) <= 12 else rows[:: int(np.ceil(len(rows) / 12))]
    for r in shown:
        ax.step(grid, r["_survival"].sf.evaluate(grid), where="post", label=f"{_label(r, keys)} (n={r['n_runs']})")
    ax.set(xlabel="step", ylabel="fraction not yet grokked", ylim=(-0.02, 1.02),
           title="survival of the not-yet-grokked (Kaplan–Meier; censored at the budget)")
    ax.legend(fontsize=7, loc="lower left")
    return _save(fig, folder, "survival")


def t_val_distribution(cols, keys, rows, folder: Path) -> Path:
    """Histogram of grokking times over all runs, censored runs counted apart, and the ECDF."""
    g = ~cols["censored"]
    t = cols["t_val"][g]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    if t.size:
        bins = np.geomspace(t.min(), t.max() * 1.001, 25) if t.max() > t.min() else 10
        a.hist(t, bins=bins, color="#377eb8")
        a.set_xscale("log" if t.max() > t.min() else "linear")
    a.set(xlabel="t_val (steps)", ylabel="runs",
          title=f"grokking time: {int(g.sum())} grokked, {int((~g).sum())} censored at {int(cols['steps'].max())}")
    for r in rows[:8]:
        e = r["_survival"].cdf
        b.step(np.r_[0, e.quantiles], np.r_[0, e.probabilities], where="post", label=_label(r, keys))
    b.set(xlabel="t_val (steps)", ylabel="fraction grokked by then", title="ECDF of grokking time (Kaplan–Meier)")
    b.legend(fontsize=7)
    return _save(fig, folder, "t_val_distribution")


def accuracy_curves(curves, cols, folder: Path, n: int = 6) -> Path:
    """Train (dashed) and validation (solid) accuracy of a sample of runs on a log step axis."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    run = curves.column("run_id").to_numpy()
    step = curves.column("step").to_numpy()
    ids = cols["run_id"][np.linspace(0, len(cols["run_id"]) - 1, min(n, len(cols["run_id"]))).astype(int)]
    for i, rid in enumerate(ids):
        m = run == rid
        colour = f"C{i}"
        ax.plot(step[m], curves.column("train_acc").to_numpy()[m], "--", color=colour)
        ax.plot(step[m], curves.column("val_acc").to_numpy()[m], "-", color=colour, label=f"run {rid}")
    ax.set(xscale="log", xlabel="step", ylabel="accuracy", ylim=(-0.02, 1.02),
           title="train (dashed) and validation (solid) accuracy: the delay is grokking")
    ax.legend(fontsize=7)
    return _save(fig, folder, "accuracy_curves")


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
        f"<td>{r['ci_lo']:.2f}–{r['ci_hi']:.2f}</td><td>{r['n_runs']}</td><td>{r['n_pairs']:,}</td></tr>"
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


def write(results_dir: Path, cols, resolved, rows, keys, sens_rows, notes, curves, x, y, warn=None) -> dict[str, Path]:
    """Draw every figure and write report.html; returns {name: path}. `warn`: the early-warning
    analysis (analyze.py), or None."""
    folder = results_dir / "figures"
    figs = {}
    axes = [a for a in (x, y) if a] or keys[:2]
    if axes:
        from jaxgrok.analyze import cell_stats

        by_axes = rows if axes == keys else cell_stats(cols, axes)  # other axes pooled
        figs["phase_diagram"] = phase_diagram(by_axes, axes[0], axes[1] if len(axes) > 1 else None, folder)
    figs["survival"] = survival_curves(rows, keys, float(cols["steps"].max()), folder)
    figs["t_val_distribution"] = t_val_distribution(cols, keys, rows, folder)
    if curves is not None:
        figs["accuracy_curves"] = accuracy_curves(curves, cols, folder)
    if warn and warn["present"] and (~cols["censored"]).any():
        figs["measures_aligned"] = aligned_measures(warn["present"], warn["steps"], cols, warn["ids"], warn["uniq"],
                                                    keys, folder)
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
    sens = "".join(f"<tr><td>{html.escape(s['factor'])}</td><td>{s['estimate']:.2f}</td><td>"
                   + (f"{s['ci_lo']:.2f}–{s['ci_hi']:.2f}" if s["ci_lo"] is not None else "") + f"</td><td>{s['n']}</td></tr>"
                   for s in sens_rows if s["measure"].startswith("variance"))
    rhos = [s["estimate"] for s in sens_rows if s["measure"].startswith("rank")]
    images = "".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        f'<figcaption>{name} — <a href="figures/{name}.svg">figures/{name}.svg</a></figcaption></figure>'
        for name, p in figs.items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>jaxgrok: {html.escape(resolved['name'])}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}img{{max-width:100%}}</style></head><body>
<h1>{html.escape(resolved['name'])}</h1><p><b>Follows:</b> {html.escape(resolved['paper'])}</p>
<p>{html.escape(resolved.get('description', ''))}</p>
<p>{len(cols['run_id'])} runs, {int((~cols['censored']).sum())} grokked, budget {int(cols['steps'].max())} steps.
Grokking time t_val: first evaluation from which validation accuracy stays ≥ {resolved['grokking']['threshold']}.
Runs that did not grok are right-censored at the budget (Kaplan–Meier); a median that is not reached is reported as such.</p>
<h2>Cells</h2><table><tr>{head}</tr>{body}</table>
<h2>What explains the spread of log t_val</h2><table><tr><th>factor</th><th>share</th><th>95% bootstrap CI</th><th>runs</th></tr>{sens}</table>
<p>{f"A fast seed stays fast? Spearman ρ of t_val between cells sharing seeds: median {np.median(rhos):.2f} over {len(rhos)} pairs of cells." if rhos else ""}</p>
{_warning_html(warn, keys)}
<h2>Notes</h2><ul>{"".join(f"<li>{html.escape(n)}</li>" for n in notes) or "<li>none</li>"}</ul>
<h2>Figures</h2>{images}</body></html>"""
    path = results_dir / "report.html"
    tmp = path.with_name(".report.html.tmp")
    tmp.write_text(page)
    tmp.replace(path)
    return {"report": path, **{f"figure_{k}": v for k, v in figs.items()}}
