"""The figures (PNG and SVG) of an analysis: drawn from its rows and columns, nothing estimated here."""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
matplotlib.rcParams["svg.fonttype"] = "none"  # SVG text stays text: searchable, editable
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import BoundaryNorm, ListedColormap, LogNorm  # noqa: E402
from matplotlib.ticker import NullFormatter, NullLocator  # noqa: E402

from jaxgrok.grokking import PHASES  # noqa: E402

PHASE_COLOURS = {"comprehension": "#4daf4a", "grokking": "#377eb8", "memorization": "#ff7f00", "confusion": "#999999"}


def save(fig, folder: Path, name: str) -> Path:
    """Write `fig` as folder/name.svg and folder/name.png, close it, and return the PNG's path."""
    folder.mkdir(parents=True, exist_ok=True)
    fig.savefig(folder / f"{name}.svg", bbox_inches="tight")
    fig.savefig(folder / f"{name}.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return folder / f"{name}.png"


def spans_decades(values) -> bool:
    """Whether positive values span enough (a factor of 30) to be drawn on a log axis."""
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
        ax.set_xlabel(x + (" (log)" if spans_decades(xs) else ""))
        if y:
            ax.set_ylabel(y + (" (log)" if spans_decades(ys) else ""))
    return save(fig, folder, "phase_diagram")


def cell_label(row, keys) -> str:
    """A cell's name from its values of `keys` ("all runs" without keys)."""
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
    return f"{cell_label(r, keys)} (n={r['n_runs']}, {r['n_runs'] - r['n_grokked']} censored)"


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
        return save(fig, folder, "survival")
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
    return save(fig, folder, "survival")


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
    pooled over all axes but the first, and the title says so. `rows`: cells.cell_stats over `keys`."""
    shown_keys = keys if len(rows) <= max_panels else keys[:1]
    panels: dict[tuple, list[np.ndarray]] = {}  # the rows are in sorted order: so are the pooled panels
    for r in rows:
        panels.setdefault(tuple(r[k] for k in shown_keys), []).append(r["_runs"])
    budget = float(cols["steps"].max())
    grokked = ~cols["censored"]
    t_all = cols["t_val"][grokked]
    lo, hi = (t_all.min(), t_all.max()) if t_all.size else (1.0, budget)
    bins = np.geomspace(max(lo, 1) / 1.05, hi * 1.05, 20) if hi > lo else np.array([lo * 0.9, hi * 1.1])
    n = len(panels)
    cols_n = min(4, n)
    n_rows = int(np.ceil(n / cols_n))
    fig, axes = plt.subplots(n_rows, cols_n, figsize=(3.4 * cols_n, 2.4 * n_rows + 0.6), sharex=True, squeeze=False)
    over = bins[-1] * 1.25  # where the '>budget' bar stands, right of every grokked time
    for ax, (values, runs) in itertools.zip_longest(axes.flat, panels.items(), fillvalue=(None, None)):
        if values is None:
            ax.set_visible(False)
            continue
        m = np.zeros(len(grokked), bool)
        m[np.concatenate(runs)] = True
        t = cols["t_val"][m & grokked]
        ax.hist(t, bins=bins, color="#377eb8")
        k = int((m & ~grokked).sum())
        ax.bar(over, k, width=over * 0.25, color="0.6", hatch="//", edgecolor="0.3")
        ax.set_xscale("log")
        row = dict(zip(shown_keys, values))
        # two lines: a cell named by several axes never runs into the next panel's title
        ax.set_title(f"{cell_label(row, shown_keys)}\n{int(m.sum()) - k} grokked, {k} censored", fontsize=7)
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
    return save(fig, folder, "t_val_distribution")


def accuracy_curves(curves, cols, label_keys, folder: Path, threshold: float, n: int = 6) -> Path:
    """Train (dashed) and validation (solid) accuracy of a sample of runs, each labelled by its
    values of `label_keys` (the swept axes), with t_train (○) and t_val (★) marked where reached."""
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    run = curves.column("run_id").to_numpy()
    step = curves.column("step").to_numpy()
    picks = np.linspace(0, len(cols["run_id"]) - 1, min(n, len(cols["run_id"]))).astype(int)
    for i, row in enumerate(picks):
        rid, colour = cols["run_id"][row], f"C{i}"
        m = run == rid
        ax.plot(step[m], curves.column("train_acc").to_numpy()[m], "--", color=colour)
        values = {k: cols[k][row] for k in label_keys}
        ax.plot(step[m], curves.column("val_acc").to_numpy()[m], "-", color=colour, label=cell_label(values, label_keys))
        if np.isfinite(cols["t_train"][row]):
            ax.plot(cols["t_train"][row], threshold, "o", color=colour, mfc="white")
        if np.isfinite(cols["t_val"][row]):
            ax.plot(cols["t_val"][row], threshold, "*", color=colour, ms=11)
    ax.set(xscale="log", xlabel="step", ylabel="accuracy", ylim=(-0.02, 1.05),
           title="train (dashed) and validation (solid) accuracy; ○ t_train, ★ t_val")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return save(fig, folder, "accuracy_curves")


def along_one_axis(rows: list[dict], x: str, budget: float, folder: Path) -> Path:
    """A sweep with one hyperparameter axis: median grokking time with its 95% interval (a ▲ at the
    budget where the median is not reached) and the fraction grokked with its exact interval."""
    xs = np.array([r[x] for r in rows], float)
    order = np.argsort(xs)
    rows, xs = [rows[i] for i in order], xs[order]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"wspace": 0.3})
    log = spans_decades(xs)
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
        if log:  # ticks at the swept values: a log axis's own minor labels run together
            ax.set_xscale("log")
            ax.set_xticks(xs, [f"{v:g}" for v in xs])
            ax.xaxis.set_minor_formatter(NullFormatter())
    a.legend(handles=[plt.Line2D([], [], marker="o", ls="", color=PHASE_COLOURS[p]) for p in PHASES], labels=list(PHASES),
             fontsize=7, title="majority phase", title_fontsize=7)
    return save(fig, folder, "phase_diagram")


SHARE_MEASURES = frozenset({"variance_share_log_t_val", "perturbation_share_log_t_val"})  # shares, in [0, 1]

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
        share = measure in SHARE_MEASURES
        ax.axhline(0 if share else 1, color="0.6", lw=0.8, ls=":")
        ax.set_ylim(-0.05 if share else min(-0.1, np.nanmin(lo) - 0.05), 1.05)
        ax.grid(alpha=0.3)
    axes[0].set_title("where the initialization stops deciding grokking time")
    axes[1].set_title("does a perturbed run keep its base's rank?")
    return save(fig, folder, "perturbation_map")


def median_curves(numerics: dict, keys, labels: dict, folder: Path) -> Path:
    """One panel per quantity (validation accuracy and the softmax numerics): each cell's median over
    its runs at every evaluation, grokked or not."""
    names = numerics["names"]
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        for i, (values, medians) in enumerate(numerics["cells"]):
            ax.plot(numerics["steps"], medians[name], color=f"C{i}", label=cell_label(values, keys) if keys else "all runs")
        ax.set(xlabel="step", title=labels.get(name, name))
        ax.title.set_fontsize(9)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle("the softmax numerics over training (median per cell, every run)", fontsize=10)
    fig.tight_layout()
    return save(fig, folder, "softmax_numerics")
