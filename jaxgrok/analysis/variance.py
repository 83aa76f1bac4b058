"""Variance components of log grokking time that keep the runs that did not grok.

The model (a Tobit linear mixed model): for the run of cell c with level i_f of each random factor f
(seed, data_seed, batch_seed, noise_seed, or seeds zipped together),

    y = log t_val = μ_c + Σ_f a_f[i_f] + e,   a_f ~ N(0, σ_f²),  e ~ N(0, σ_e²),  all independent,

and y is observed only below the log of the budget: a run that did not grok is right-censored there.
The cells are fixed effects; their share is the variance of the cell means. Interactions (a seed
that is fast at one weight decay and slow at another) are in the residual e.

A sweep's runs are a product of its axes, so they form a complete grid over cells × levels, and on a
complete grid the ANOVA (expected mean squares) equations estimate the components without bias (they
are REML's for balanced data). Censoring breaks that, so the fit is a stochastic EM (data
augmentation): each iteration draws the factor levels' effects and the cell means from their normal
conditionals given the completed data, draws each censored y from its normal truncated below at the
budget given those, and re-estimates the components from the completed grid by the ANOVA equations;
after a burn-in the components are a running average that the next draws use (stochastic
approximation EM, Delyon et al. 1999), and the estimate is that average. Without censoring it is
exactly the ANOVA estimate. Intervals come from a cluster bootstrap that resamples each random factor's levels
independently (Owen's pigeonhole bootstrap for crossed designs), never single runs, all replicates
fitted at once as one batch of grids. Validated by simulation in tests/test_variance.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import special, stats


@dataclass
class Design:
    """Log grokking times on a complete grid [cells, levels of factor 1, ..., levels of factor F]."""

    y: np.ndarray  # float64 grid; censored entries hold their censoring point
    censored: np.ndarray  # bool grid
    factors: list[str]  # one name per random factor axis (zipped seeds joined by " and ")


def grid(cols: dict, cell: np.ndarray, factors: dict[str, np.ndarray]) -> Design | str:
    """The runs as a complete grid over cells × factor levels, or a sentence saying why they are not
    one. `cell`: a cell id per run; `factors`: name -> level per run."""
    names = list(factors)
    codes = [np.unique(cell, return_inverse=True)[1].ravel()]
    codes += [np.unique(factors[n], return_inverse=True)[1].ravel() for n in names]
    shape = tuple(int(c.max()) + 1 for c in codes)
    if int(np.prod(shape)) != len(cell) or len({tuple(k) for k in np.stack(codes, 1)}) != len(cell):
        return "the runs do not cross every level of every seed with every cell, so the components are not estimated"
    censored = cols["censored"].astype(bool)
    # A run that did not grok is censored at its budget; a diverged run never grokked either.
    y = np.log(np.where(censored, cols["steps"], np.nan_to_num(cols["t_val"], nan=1.0)).astype(np.float64))
    Y, C = np.empty(shape), np.empty(shape, bool)
    Y[tuple(codes)], C[tuple(codes)] = y, censored
    return Design(Y, C, names)


def _along(a: np.ndarray, f: int, ndim: int) -> np.ndarray:
    """Per-level values a[B, I_f] of factor f, shaped to broadcast over grids [B, cells, I_1..I_F]."""
    shape = [a.shape[0]] + [1] * (ndim - 1)
    shape[f + 2] = a.shape[1]
    return a.reshape(shape)


def _main_effects(y: np.ndarray):
    """(grand mean [B], cell means [B, C], each factor's level effects [B, I_f], the main-effects fit)
    of complete grids y[B, cells, I_1..I_F]: on a complete grid the marginal means are the least-squares fit."""
    axes = tuple(range(1, y.ndim))
    grand = y.mean(axes)
    cell = y.mean(tuple(range(2, y.ndim)))
    effects = [y.mean(tuple(a for a in axes if a != f + 2)) - grand[:, None] for f in range(y.ndim - 2)]
    fit = cell.reshape(cell.shape + (1,) * (y.ndim - 2)) + sum(
        (_along(m, f, y.ndim) for f, m in enumerate(effects)), np.zeros((1,) * y.ndim))
    return grand, cell, effects, fit


def _anova(y: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """Expected-mean-square estimates on complete grids y[B, cells, I_1..I_F]: (cells' variance,
    [σ_f²], σ_e²), each [B], components floored at 0."""
    B, C, levels = y.shape[0], y.shape[1], y.shape[2:]
    N = C * int(np.prod(levels))
    grand, cell, effects, fit = _main_effects(y)
    df_e = N - C - sum(i - 1 for i in levels)
    ms_e = ((y - fit) ** 2).sum(tuple(range(1, y.ndim))) / df_e
    comps = []
    for f, i in enumerate(levels):
        ms_f = (N / i) * (effects[f] ** 2).sum(1) / (i - 1)
        comps.append(np.maximum(0.0, (ms_f - ms_e) / (N / i)))
    between = ((cell - grand[:, None]) ** 2).mean(1)
    cells = np.maximum(0.0, between - (C - 1) / C * ms_e / (N / C)) if C > 1 else np.zeros(B)
    return cells, comps, ms_e


def _truncated_above(mean, sd, lower, rng):
    """Draws from N(mean, sd²) truncated to (lower, ∞), by inversion of the upper tail."""
    tail = special.ndtr((mean - lower) / sd)  # P(y > lower)
    u = rng.uniform(size=np.shape(mean)) * tail
    return np.maximum(lower, mean - sd * special.ndtri(np.clip(u, 1e-300, 1.0)))


def fit(y: np.ndarray, censored: np.ndarray, rng: np.random.Generator, iterations: int = 80,
        burn_in: int = 30) -> dict[str, np.ndarray]:
    """Components of grids y[B, cells, I_1..I_F] (censored entries: their censoring point) by
    stochastic EM; returns {"cells", "factor0".., "residual"} -> [B]."""
    y = np.array(y, dtype=np.float64)
    censored = np.broadcast_to(censored, y.shape)
    bound = y.copy()
    B, C, levels = y.shape[0], y.shape[1], y.shape[2:]
    if not censored.any():
        iterations, burn_in = 1, 0  # nothing to impute: the ANOVA estimate itself
    if len(levels) and C * int(np.prod(levels)) - C - sum(i - 1 for i in levels) == 0:
        raise ValueError("no residual degrees of freedom")
    cells, comps, resid = _anova(y)
    sums = {"cells": 0.0, "residual": 0.0} | {f"factor{f}": 0.0 for f in range(len(levels))}
    effects = [np.zeros((B, i)) for i in levels]

    where = np.nonzero(censored)
    if len(where[0]):
        # A warm start: a few steps that put each censored y at its conditional mean above the
        # budget under the current fit, so the stochastic iterations start near their fixed point.
        for _ in range(10):
            linear = _main_effects(y)[3][where]
            sd = np.sqrt(np.maximum(resid, 1e-12))[where[0]]
            alpha = (bound[where] - linear) / sd
            y[where] = linear + sd * np.exp(stats.norm.logpdf(alpha) - stats.norm.logsf(alpha))
            cells, comps, resid = _anova(y)
    for it in range(iterations):
        if len(where[0]):
            s2 = np.maximum(resid, 1e-12)[:, None]
            # Cell means (flat prior), then each factor's effects, from their normal conditionals.
            summed = sum((_along(a, f, y.ndim) for f, a in enumerate(effects)), np.zeros((B, 1) + (1,) * len(levels)))
            n_cell = y[0, 0].size
            mu = (y - summed).reshape(B, C, -1).mean(2) + rng.standard_normal((B, C)) * np.sqrt(s2 / n_cell)
            resid_all = y - mu.reshape((B, C) + (1,) * len(levels)) - summed
            for f in range(len(levels)):
                z = resid_all + _along(effects[f], f, y.ndim)  # y minus everything but this factor
                n = y[0].size / levels[f]
                total = z.sum(tuple(a for a in range(1, y.ndim) if a != f + 2))
                precision = n / s2 + 1 / np.maximum(comps[f], 1e-12)[:, None]
                new = total / s2 / precision + rng.standard_normal((B, levels[f])) / np.sqrt(precision)
                resid_all = z - _along(new, f, y.ndim)
                effects[f] = new
            # Each censored y from its normal truncated below at the budget, given all the above.
            linear = (y - resid_all)[where]
            y[where] = _truncated_above(linear, np.sqrt(s2[where[0], 0]), bound[where], rng)
            cells, comps, resid = _anova(y)
        if it >= burn_in:
            sums["cells"] = sums["cells"] + cells
            sums["residual"] = sums["residual"] + resid
            for f in range(len(levels)):
                sums[f"factor{f}"] = sums[f"factor{f}"] + comps[f]
            # Stochastic approximation (SAEM): after the burn-in the next draws use the running
            # average, not the last single draw's estimate, so the average converges to the EM
            # fixed point instead of wandering around it with a bias from the noise.
            k = it - burn_in + 1
            cells, resid = sums["cells"] / k, sums["residual"] / k
            comps = [sums[f"factor{f}"] / k for f in range(len(levels))]
    return {k: v / (iterations - burn_in) for k, v in sums.items()}


def pigeonhole(design: Design, n_resamples: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap grids: each factor's levels resampled with replacement, independently; cells kept."""
    y, c = design.y, design.censored
    C, levels = y.shape[0], y.shape[1:]
    index = [np.arange(C).reshape((1, C) + (1,) * len(levels))]
    for f, i in enumerate(levels):
        shape = [n_resamples, 1] + [1] * len(levels)
        shape[f + 2] = i
        index.append(rng.integers(0, i, size=(n_resamples, i)).reshape(shape))
    return y[tuple(index)], c[tuple(index)]


def estimate(design: Design, n_resamples: int = 199, seed: int = 0) -> tuple[dict, dict | None, list[str]]:
    """(estimates, bootstrap replicates, names): component name -> [1] and [n_resamples] arrays,
    keyed "hyperparameters" (the cells' variance, with several cells), each factor's name, and
    "residual". With one cell and one factor (one run per level) the level's effect and the residual
    are one thing, reported under the factor's name."""
    rng = np.random.default_rng(seed)
    C, F = design.y.shape[0], len(design.factors)
    y, c = design.y, design.censored
    if F == 1 and C == 1:
        est = fit(y.reshape(1, 1, -1), c.reshape(1, 1, -1), rng)
        pick = rng.integers(0, y.size, (n_resamples, y.size))  # the levels (= runs), resampled
        boot = fit(y.reshape(-1)[pick][:, None], c.reshape(-1)[pick][:, None], rng)
        return {design.factors[0]: est["residual"]}, {design.factors[0]: boot["residual"]}, design.factors
    est = fit(y[None], c[None], rng)
    boot = fit(*pigeonhole(design, n_resamples, rng), rng) if F else None
    rename = {"cells": "hyperparameters", "residual": "residual"} | {f"factor{f}": n for f, n in enumerate(design.factors)}
    keep = lambda d: {rename[k]: v for k, v in d.items() if k != "cells" or C > 1}  # noqa: E731
    est = keep(est)
    order = [n for n in ["hyperparameters", *design.factors, "residual"] if n in est]
    return est, (keep(boot) if boot is not None else None), order


def interval(replicates, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of bootstrap replicates (NaN where there are none)."""
    if replicates is None or not np.isfinite(replicates).any():
        return np.nan, np.nan
    lo, hi = np.nanquantile(replicates, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def components(design: Design, n_resamples: int = 199, seed: int = 0) -> list[dict]:
    """Each component and its share of the total, with percentile intervals from the pigeonhole
    bootstrap: rows (measure, factor, estimate, ci_lo, ci_hi, n)."""
    est, boot, names = estimate(design, n_resamples, seed)
    total = sum(est.values())
    boot_total = sum(boot.values()) if boot is not None else None
    rows = []
    for name in names:
        share_boot = None if boot is None else boot[name] / np.where(boot_total > 0, boot_total, np.nan)
        for measure, e, b in (("variance_component_log_t_val", est[name][0], None if boot is None else boot[name]),
                              ("variance_share_log_t_val", est[name][0] / total[0] if total[0] > 0 else np.nan, share_boot)):
            lo, hi = interval(b)
            rows.append({"measure": measure, "factor": name, "estimate": float(e), "ci_lo": lo, "ci_hi": hi,
                         "n": int(design.y.size)})
    return rows


def log_sd(times: np.ndarray, observed: np.ndarray, censor_at: np.ndarray) -> float | None:
    """The standard deviation of log t by maximum likelihood for a normal right-censored at the
    budget (scipy.stats.norm.fit on CensoredData); None with fewer than 2 observed times."""
    if observed.sum() < 2:
        return None
    logs = np.log(times[observed].astype(float))
    if np.ptp(logs) == 0 and observed.all():
        return 0.0
    data = stats.CensoredData(uncensored=logs, right=np.log(censor_at[~observed].astype(float)))
    return float(stats.norm.fit(data)[1])
