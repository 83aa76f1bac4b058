"""report.html: one page of an analysis's tables, notes and figures (embedded), nothing estimated here."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from jaxgrok.analysis import Analysis
    from jaxgrok.analysis.warning import EarlyWarning


def _fmt(v, digits=0):
    return "not reached" if v is None else f"{v:,.{digits}f}".replace("-", "−")


def _warning_html(warn: EarlyWarning | None, keys) -> str:
    if not warn:
        return ""
    lead = "".join(
        f"<tr><td>{html.escape(r['measure'])}</td><td style='text-align:left'>{html.escape(r['event'])}</td>"
        + "".join(f"<td>{r[k]:g}</td>" for k in keys)
        + f"<td>{r['n_runs']}</td><td>{r['n_grokked']}</td><td>{_fmt(r['lead_median'])} "
        f"({_fmt(r['lead_median_lo'])} to {_fmt(r['lead_median_hi'])})</td>"
        f"<td>{_fmt(r['lead_q25'])} to {_fmt(r['lead_q75'])}</td></tr>" for r in warn.lead_times)
    conc = "".join(
        ("<tr style='background:#eee'>" if r["baseline"] else "<tr>") + f"<td>{html.escape(r['measure'])}"
        f"{' (baseline)' if r['baseline'] else ''}</td><td>{html.escape(r['moment'])}</td><td>{r['c_index']:.2f}</td>"
        f"<td>{'higher' if r['c_index'] > 0.5 else 'lower' if r['c_index'] < 0.5 else 'neither'} → earlier</td>"
        f"<td>{_ci(r['ci_lo'], r['ci_hi'])}</td><td>{r['n_runs']}</td><td>{r['n_pairs']:,}</td></tr>"
        for r in sorted(warn.concordance, key=lambda r: (r["moment"], -abs(r["c_index"] - 0.5))))
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


def _ci(lo, hi, fmt="{:.2f}") -> str:
    ok = lambda v: v is not None and np.isfinite(v)  # noqa: E731
    return f"{fmt.format(lo)} to {fmt.format(hi)}".replace("-", "−") if ok(lo) and ok(hi) else "—"


VARIANCE_METHOD = """Each run's log grokking time is modelled as a cell mean plus one normal effect per level of every seed
that varies (independent, crossed) plus a normal residual (which holds the interactions), and a run that did not grok
is right-censored at the budget: a Tobit linear mixed model. The components are fitted by a stochastic-approximation EM
on the complete grid of cells × seed levels: censored log times are drawn from their normal truncated at the budget
given the current effects, and the components re-estimated by the ANOVA equations, not floored at 0 (so a small
component is not biased upward; an estimate below 0 means it cannot be told from 0 here); without censoring this is
exactly the ANOVA estimate. The cells' component is the variance of the cell means. A parametric bootstrap (199 sweeps
drawn from the fitted model, censored at the same budgets) corrects the estimates' bias and gives the intervals: for a
component, the basic interval on the log scale of its mean square; for a share, percentile. Assumptions: normal
effects on the log scale (a log-normal grokking time), independent seeds, a common residual variance in every cell.
Validated on simulated 4 × 4 to 16 × 16 seed grids with 0–40% of runs censored (README, tests/test_variance.py);
where the design is too small for that, the intervals are withheld and the reason is below the table."""


def _known(v, spec: str) -> str:
    """A number, or "—" where it is withheld (NaN)."""
    return "—" if v is None or not np.isfinite(v) else format(v, spec).replace("-", "−")


def _variance_html(sens_rows) -> str:
    comp = {r["factor"]: r for r in sens_rows if r["measure"] == "variance_component_log_t_val"}
    share = {r["factor"]: r for r in sens_rows if r["measure"] == "variance_share_log_t_val"}
    if not comp:
        return ""
    said = dict.fromkeys(r.get("note") for r in [*comp.values(), *share.values()] if r.get("note"))
    withheld = "".join(f"<p><i>Not shown: {html.escape(n)}</i></p>" for n in said)
    body = "".join(
        f"<tr><td>{html.escape(f)}</td><td>{_known(c['estimate'], '.3f')}</td><td>{_ci(c['ci_lo'], c['ci_hi'], '{:.3f}')}</td>"
        f"<td>{_known(np.sqrt(max(c['estimate'], 0.0)), '.2f')}</td><td>{_known(share[f]['estimate'], '.0%')}</td>"
        f"<td>{_ci(share[f]['ci_lo'], share[f]['ci_hi'], '{:.0%}')}</td></tr>" for f, c in comp.items())
    return (f"<h2>What explains the spread of log t_val</h2><p>{VARIANCE_METHOD}</p><table><tr><th>source</th>"
            "<th>variance (log steps²)</th><th>95% CI</th><th>sd (log steps)</th><th>share</th><th>95% CI</th></tr>"
            f"{body}</table>{withheld}")


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


def _speedup_text(r) -> str:
    """The speed-up as a number, a bound ("> 8.1×" where the baseline's median is not reached), or —."""
    if r["speedup"] is not None:
        return f"{r['speedup']:.2f}×"
    if r["speedup_at_least"] is not None:
        return f"&gt; {r['speedup_at_least']:.2f}×"
    if r["speedup_at_most"] is not None:
        return f"&lt; {r['speedup_at_most']:.2f}×"
    return "—"


def _speedup_ci(r) -> str:
    lo, hi = r["speedup_lo"], r["speedup_hi"]
    if lo is not None and hi is None:
        return f"&gt; {lo:.2f}" if lo > 0 else "—"
    return _ci(lo, hi)


def _grokfast_html(speedup) -> str:
    if not speedup:
        return ""
    body = "".join(
        "<tr>" + "".join(f"<td>{v:g}</td>" for k, v in r.items() if k not in _GROKFAST_COLS)
        + f"<td>{r['grokfast_lambda']:g}</td><td>{r['grokfast_alpha']:g}</td>"
        + f"<td>{r['n_grokked']}/{r['n_runs']}</td><td>{_fmt(r['median_t_val'])}</td>"
        + f"<td>{r['baseline_weight_decay']:g}</td>"
        + f"<td>{r['baseline_grokked']}/{r['baseline_runs']}</td><td>{_fmt(r['baseline_median_t_val'])}</td>"
        + f"<td>{_speedup_text(r)}</td><td>{_speedup_ci(r)}</td></tr>" for r in speedup)
    keys = [k for k in speedup[0] if k not in _GROKFAST_COLS]
    return ("<h2>Grokfast</h2><p>Speed-up: the Kaplan–Meier median t_val of unfiltered runs (λ = 0, same seeds and "
            "other values) over that of the filtered ones, against two baselines: at the filtered runs' own weight "
            "decay (the filter alone), and without weight decay where the sweep has it (the paper's comparison: "
            "neither filter nor weight decay). Where the baseline's median is not reached it is only known to lie "
            "past the longest run, so the speed-up is a bound (&gt;), and so is its interval's lower end. Interval "
            "from resampling seeds, both arms together. (grokfast.parquet)</p>"
            "<table><tr>" + "".join(f"<th>{html.escape(k)}</th>" for k in keys)
            + "<th>λ</th><th>α</th><th>grokked</th><th>median t_val</th><th>baseline weight decay</th>"
            "<th>baseline grokked</th><th>baseline median</th><th>speed-up</th><th>95% CI</th></tr>"
            f"{body}</table>")


_GROKFAST_COLS = ("grokfast_lambda", "grokfast_alpha", "baseline_weight_decay", "n_runs", "n_grokked", "baseline_runs",
                  "baseline_grokked", "median_t_val", "baseline_median_t_val", "speedup", "speedup_at_least",
                  "speedup_at_most", "speedup_lo", "speedup_hi")


def _nanda_html(rows, exact) -> str:
    if not rows:
        return ""
    body = "".join(f"<tr><td style='text-align:left'>{html.escape(r['signature'])}</td><td>{r['runs']} of {r['of']}</td>"
                   f"<td>{_or_dash(r['median'], ',.3g')}</td></tr>" for r in rows)
    warn = "" if exact else (" <b>The second pass did not reproduce the runs bit for bit</b> (another machine or "
                             "device): these are the losses of a rerun.")
    return ("<h2>Nanda et al.'s signatures, with each run's final key frequencies</h2><p>The restricted and "
            "excluded losses as the paper defines them: at every evaluation, with the key frequencies the run ends "
            "with (runs.parquet key_freqs), by retraining the runs (jaxgrok analyze --final-keys; "
            "final_key_losses.parquet). The curves' restricted_loss and excluded_loss use each evaluation's own "
            f"strongest frequencies instead. Counted over the runs that grokked.{warn}</p>"
            f"<table><tr><th>signature</th><th>runs</th><th>median</th></tr>{body}</table>")


def _or_dash(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def _curvature_html(rows: list[dict], said: tuple[str, ...], keys: list[str]) -> str:
    if not rows:
        return ""
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join(
        "<tr>" + "".join(f"<td>{r[k]:g}</td>" for k in keys) + f"<td>{html.escape(r['measure'])}</td>"
        + f"<td>{r['n_compared']} of {r['n_grokked']} grokked ({r['n_runs']} runs)</td><td>{r['n_higher_after']}</td>"
        + f"<td>{_or_dash(r['median_ratio'], '.3g')}</td><td>{_ci(r['ratio_lo'], r['ratio_hi'], '{:.3g}')}</td>"
        + f"<td>{_or_dash(r['sign_test_p'], '.2g')}</td></tr>" for r in rows)
    return ("<h2>Curvature: is the memorising solution flat or sharp?</h2><p>Each measure at memorisation (t_train) "
            "against 10 evaluations after grokking (t_val), paired within each run that grokked: the median ratio "
            "after/before, a 95% interval from resampling seeds, and a sign test. Raw sharpness shrinks as the logits "
            "grow, whatever the basin; P⁻¹H (Adam's preconditioned sharpness) and the LLC do not in that way. "
            "(curvature.parquet)</p>"
            f"<table><tr>{head}<th>measure</th><th>compared</th><th>higher after</th><th>median ratio</th>"
            f"<th>95% CI</th><th>sign test p</th></tr>{body}</table>"
            "<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in said) + "</ul>")


def _cells_html(rows: list[dict], keys: list[str]) -> str:
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys) + (
        "<th>runs</th><th>grokked (95% CI)</th><th>median t_val (95% CI)</th><th>median t_train</th>"
        "<th>median delay</th><th>phase</th>")
    body = "".join(
        "<tr>" + "".join(f"<td>{r[k]:g}</td>" for k in keys)
        + f"<td>{r['n_runs']}</td><td>{r['n_grokked']} ({r['frac_grokked_lo']:.0%}–{r['frac_grokked_hi']:.0%})</td>"
        + f"<td>{_fmt(r['t_val_median'])} ({_fmt(r['t_val_median_lo'])}–{_fmt(r['t_val_median_hi'])})</td>"
        + f"<td>{_fmt(r['t_train_median'])}</td><td>{_fmt(r['delay_median'])}</td><td>{r['phase']}</td></tr>"
        for r in rows)
    return f"<h2>Cells</h2><table><tr>{head}</tr>{body}</table>"


def _window(resolved: dict) -> str:
    """How far "stays" reaches where runs retired (stop_after_grokking)."""
    k = resolved["train"].get("stop_after_grokking", 0)
    return (f" to the run's end: for a run that retired, the {k:,} steps after it (stop_after_grokking), not the "
            f"whole budget") if k else ""


def page(a: Analysis, figs: dict[str, Path]) -> str:
    """The report of analysis `a` as one HTML page, with the PNGs of `figs` ({name: path}) embedded."""
    cols, resolved, rho = a.runs, a.sweep, a.rank_correlation
    images = "".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        f'<figcaption>{name} — <a href="figures/{name}.svg">figures/{name}.svg</a></figcaption></figure>'
        for name, p in figs.items())
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>jaxgrok: {html.escape(resolved['name'])}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}img{{max-width:100%}}</style></head><body>
<h1>{html.escape(resolved['name'])}</h1><p><b>Follows:</b> {html.escape(resolved['paper'])}</p>
<p>{html.escape(resolved.get('description', ''))}</p>
<p>{len(cols['run_id'])} runs, {int((~cols['censored']).sum())} grokked, budget {int(cols['steps'].max())} steps,
computed in {html.escape(str(resolved['train'].get('precision', 'float32')))}.
Grokking time t_val: first evaluation from which validation accuracy stays ≥ {resolved['grokking']['threshold']}{_window(resolved)}.
Runs that did not grok are right-censored at the budget (Kaplan–Meier); a median that is not reached is reported as such.</p>
{_cells_html(a.cells, a.keys)}
{_variance_html(a.sensitivity)}
<p>{f"A fast seed stays fast? Spearman ρ of t_val between cells sharing seeds: median {rho[0]:.2f} over {rho[1]} pairs of cells." if rho else ""}</p>
{_perturbation_html(a.sensitivity)}
{_grokfast_html(a.speedup)}
{_nanda_html(a.nanda, a.nanda_exact)}
{_warning_html(a.warning, a.keys)}
{_curvature_html(a.flat_or_sharp, a.curvature_said, a.keys)}
<h2>Notes</h2><ul>{"".join(f"<li>{html.escape(n)}</li>" for n in a.notes) or "<li>none</li>"}</ul>
<h2>Figures</h2>{images}</body></html>"""


def write(a: Analysis, figs: dict[str, Path], path: Path) -> Path:
    """Write page(a, figs) to `path` atomically (a reader never sees half a page); returns the path."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page(a, figs))
    tmp.replace(path)
    return path
