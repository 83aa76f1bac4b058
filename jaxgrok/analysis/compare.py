"""`jaxgrok compare A B`: do two sweeps' runs grok at the same times?

For two results directories (say the same sweep in float32 and in bfloat16): what differs between
their sweep files, and for t_val and t_train the Kaplan–Meier median with its 95% interval in each,
and the log-rank test of equal distributions (scipy.stats.logrank). Censored runs enter both as
censored at their budget.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from scipy import stats

from jaxgrok.analysis.cells import load_runs, survival
from jaxgrok.sweep import AXES, differences


def _times(cols: dict, event: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    t = cols[event]
    observed = ~np.isnan(t)
    return np.nan_to_num(t), observed, cols["steps"].astype(float)


def _censored(t, observed, budget) -> stats.CensoredData:
    return stats.CensoredData(uncensored=t[observed], right=budget[~observed])


def _by_axes(cols: dict) -> dict[tuple, int]:
    """{every axis value of a run: its row}."""
    return {tuple(cols[ax][i].item() for ax in AXES): i for i in range(len(cols["run_id"]))}


def paired(a: dict, b: dict) -> dict | None:
    """Where both sweeps hold the same runs (every axis value, seeds included, with one budget): does
    each run grok at the same time in B as in A? The sign test over the runs whose order is known
    (a censored run grokked after any grokked one; two censored runs tell nothing), Spearman ρ
    (censored runs rank last), and the median ratio t_val B / A over runs grokked in both."""
    ka, kb = _by_axes(a), _by_axes(b)
    if ka.keys() != kb.keys() or len(np.unique(np.concatenate([a["steps"], b["steps"]]))) != 1:
        return None
    ia, ib = np.array(list(ka.values())), np.array([kb[k] for k in ka])
    ta = np.where(a["censored"][ia], np.inf, a["t_val"][ia])
    tb = np.where(b["censored"][ib], np.inf, b["t_val"][ib])
    later, earlier = int((tb > ta).sum()), int((tb < ta).sum())
    both = np.isfinite(ta) & np.isfinite(tb)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant input: ρ is NaN
        rho = stats.spearmanr(ta, tb).statistic if len(ta) > 2 else np.nan
    return {"n": len(ta), "later": later, "earlier": earlier, "same": int(((ta == tb) & np.isfinite(ta)).sum()),
            "both_censored": int((np.isinf(ta) & np.isinf(tb)).sum()),
            "sign_p": float(stats.binomtest(later, later + earlier).pvalue) if later + earlier else None,
            "spearman": None if np.isnan(rho) else float(rho),
            "median_ratio": float(np.median(tb[both] / ta[both])) if both.any() else None}


def compare(dir_a: str | Path, dir_b: str | Path) -> dict:
    """Both sweeps' event-time summaries side by side, and the log-rank test for each event."""
    (a, ra), (b, rb) = load_runs(dir_a), load_runs(dir_b)
    out = {"a": str(dir_a), "b": str(dir_b), "differences": differences(ra, rb), "events": {}}
    for event in ("t_val", "t_train"):
        row = {}
        for side, cols in (("a", a), ("b", b)):
            t, observed, budget = _times(cols, event)
            s = survival(t, observed, budget)
            row[side] = {"n": len(t), "events": int(observed.sum()),
                         **{k: s[k] for k in ("median", "median_lo", "median_hi")}}
        xa, xb = _censored(*_times(a, event)), _censored(*_times(b, event))
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            p = float(stats.logrank(xa, xb).pvalue) if row["a"]["events"] + row["b"]["events"] else np.nan
        # NaN: no event at all, or every run of both at one step (the statistic is 0/0): no spread to test.
        row["logrank_p"] = None if np.isnan(p) else p
        out["events"][event] = row
    out["paired"] = paired(a, b)
    return out


def _fmt(x) -> str:
    return "not reached" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:,.0f}"


def format_comparison(c: dict) -> str:
    """compare()'s result as the lines `jaxgrok compare` prints."""
    lines = [f"A = {c['a']}", f"B = {c['b']}"]
    if c["differences"]:
        lines.append("differ in: " + "; ".join(f"{k} = {va!r} (A) vs {vb!r} (B)" for k, (va, vb) in c["differences"].items()))
    else:
        lines.append("the two sweeps are the same configuration")
    for event, row in c["events"].items():
        lines.append(f"{event}:")
        for side in ("a", "b"):
            r = row[side]
            lines.append(f"  {side.upper()}: {r['events']} of {r['n']} runs reached it; Kaplan–Meier median "
                         f"{_fmt(r['median'])} (95% CI {_fmt(r['median_lo'])} to {_fmt(r['median_hi'])})")
        p = row["logrank_p"]
        lines.append("  log-rank test: " + ("nothing to test (no event, or every run at the same step)" if p is None else
                                            f"p = {p:.3g} ({'differ' if p < 0.05 else 'no evidence of a difference'} at the 5% level)"))
    if (p := c["paired"]) is not None:
        lines.append(f"the same {p['n']} runs in both: B grokked later in {p['later']}, earlier in {p['earlier']}, "
                     f"at the same step in {p['same']}, in neither in {p['both_censored']}"
                     + (f" (sign test p = {p['sign_p']:.3g})" if p["sign_p"] is not None else "")
                     + (f"; Spearman ρ = {p['spearman']:.2f}" if p["spearman"] is not None else "")
                     + (f"; median t_val ratio B/A {p['median_ratio']:.3f}" if p["median_ratio"] is not None else ""))
    return "\n".join(lines)
