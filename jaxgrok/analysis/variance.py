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
exactly the ANOVA estimate. The components are not floored at 0: flooring biases a small component
upward without bound on small designs (+81% for a 5% component on 4 × 4), so an estimate can be
negative (the component cannot be told from 0 there). A parametric bootstrap (grids drawn from the
fitted model, censored at the same budgets, all fitted at once as one batch) removes the censored
fit's drift and the shares' ratio bias (`corrected`) and gives the intervals: a component's by the
basic bootstrap on the log scale of its mean square, combined with the residual's (`component_interval`);
a share's, percentile. (The pigeonhole bootstrap used before covered a small component's truth in
98-100% with intervals twice too wide, 99.5% on 16 × 16 at 40% censored, and the residual in 64-95%.)
Validated by simulation on 4 × 4 to 16 × 16 grids with 0-40% censored (README's table, 400 sweeps × 199
bootstrap fits a row; tests/test_variance.py); where a design or its censoring is beyond what that
backs, `supported` says so and the intervals are withheld.
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
    budget: np.ndarray | None = None  # log budget of every run; None: the censoring point, common to all runs

    def bound(self) -> np.ndarray:
        """Each run's log budget, where a simulated run of it would be censored."""
        if self.budget is not None:
            return self.budget
        return np.full(self.y.shape, self.y[self.censored].max() if self.censored.any() else np.inf)


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
    Y, C, budget = np.empty(shape), np.empty(shape, bool), np.empty(shape)
    Y[tuple(codes)], C[tuple(codes)], budget[tuple(codes)] = y, censored, np.log(cols["steps"].astype(np.float64))
    return Design(Y, C, names, budget)


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
    [σ_f²], σ_e²), each [B]. Not floored at 0: flooring makes a small component's estimate biased
    upward (all of its sampling distribution below 0 is moved to 0), unboundedly so on small designs."""
    B, C, levels = y.shape[0], y.shape[1], y.shape[2:]
    N = C * int(np.prod(levels))
    grand, cell, effects, fit = _main_effects(y)
    df_e = N - C - sum(i - 1 for i in levels)
    ms_e = ((y - fit) ** 2).sum(tuple(range(1, y.ndim))) / df_e
    comps = []
    for f, i in enumerate(levels):
        ms_f = (N / i) * (effects[f] ** 2).sum(1) / (i - 1)
        comps.append((ms_f - ms_e) / (N / i))
    between = ((cell - grand[:, None]) ** 2).mean(1)
    cells = between - (C - 1) / C * ms_e / (N / C) if C > 1 else np.zeros(B)
    return cells, comps, ms_e


def _truncated_above(mean, sd, lower, rng):
    """Draws from N(mean, sd²) truncated to (lower, ∞), by inversion of the upper tail."""
    tail = special.ndtr((mean - lower) / sd)  # P(y > lower)
    u = rng.uniform(size=np.shape(mean)) * tail
    return np.maximum(lower, mean - sd * special.ndtri(np.clip(u, 1e-300, 1.0)))


def fit(y: np.ndarray, censored: np.ndarray, rng: np.random.Generator, iterations: int = 80,
        burn_in: int = 30) -> dict[str, np.ndarray]:
    """Components of grids y[B, cells, I_1..I_F] (censored entries: their censoring point) by
    stochastic EM; returns {"cells", "factor0".., "residual"} -> [B] (not floored at 0), and
    "means" -> [B, cells], the cell means of the completed grids (what a parametric bootstrap draws around)."""
    y = np.array(y, dtype=np.float64)
    censored = np.broadcast_to(censored, y.shape)
    bound = y.copy()
    B, C, levels = y.shape[0], y.shape[1], y.shape[2:]
    if not censored.any():
        iterations, burn_in = 1, 0  # nothing to impute: the ANOVA estimate itself
    if len(levels) and C * int(np.prod(levels)) - C - sum(i - 1 for i in levels) == 0:
        raise ValueError("no residual degrees of freedom")
    cells, comps, resid = _anova(y)
    sums = {"cells": 0.0, "residual": 0.0} | {f"factor{f}": 0.0 for f in range(len(levels))} | {"means": 0.0}
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
            sums["means"] = sums["means"] + y.reshape(B, C, -1).mean(2)
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


def _simulated(est: dict) -> dict:
    """The components of the world a parametric bootstrap draws from: the estimates, those below 0 at 0."""
    return {k: np.maximum(v, 0.0) for k, v in est.items() if k != "means"}


def parametric(est: dict, bound: np.ndarray, n_resamples: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap grids [B * n_resamples, cells, I_1..I_F] drawn from fitted models (`fit`'s output, batch B):
    the cell means, one normal effect per level of each factor and a normal residual with the estimated
    components (floored at 0), every run censored at its own budget `bound` (broadcast to a grid)."""
    sim, means = _simulated(est), est["means"]
    (B, C), F = means.shape, sum(k.startswith("factor") for k in sim)
    levels = np.shape(bound)[-F:] if F else ()
    # The cell means shrunk about their grand mean so that their spread is the estimated cells'
    # component, not the estimate plus the noise of each mean.
    spread = means.var(1, keepdims=True)
    centre = means.mean(1, keepdims=True)
    mu = centre + (means - centre) * np.sqrt(sim["cells"][:, None] / np.where(spread > 0, spread, np.inf))
    shape = (B, n_resamples, C) + tuple(levels)
    y = np.broadcast_to(mu.reshape((B, 1, C) + (1,) * F), shape).copy()
    for f, i in enumerate(levels):
        sd = np.sqrt(sim[f"factor{f}"]).reshape((B, 1, 1) + (1,) * F)
        per_level = (B, n_resamples, 1) + tuple(i if g == f else 1 for g in range(F))
        y += sd * rng.standard_normal((B, n_resamples, i)).reshape(per_level)
    y += np.sqrt(sim["residual"]).reshape((B, 1) + (1,) * (F + 1)) * rng.standard_normal(shape)
    censored = y > bound
    return np.where(censored, bound, y).reshape((-1, C) + tuple(levels)), censored.reshape((-1, C) + tuple(levels))


def estimate(design: Design, n_resamples: int = 199, seed: int = 0) -> tuple[dict, dict | None, list[str]]:
    """(estimates, bootstrap replicates, names): component name -> [1] and [n_resamples] arrays,
    keyed "hyperparameters" (the cells' variance, with several cells), each factor's name, and
    "residual". The estimates are the SAEM fit's, not floored and not bias-corrected (`corrected`);
    the replicates are fits of grids drawn from the fitted model (`parametric`), so the bootstrap
    world's truth is `_simulated(estimates)`. With one cell and one factor (one run per level) the
    level's effect and the residual are one thing, reported under the factor's name."""
    rng = np.random.default_rng(seed)
    C, F = design.y.shape[0], len(design.factors)
    y, c = design.y, design.censored
    if F == 1 and C == 1:
        est = fit(y.reshape(1, 1, -1), c.reshape(1, 1, -1), rng)
        pick = rng.integers(0, y.size, (n_resamples, y.size))  # the levels (= runs), resampled
        boot = fit(y.reshape(-1)[pick][:, None], c.reshape(-1)[pick][:, None], rng)
        return {design.factors[0]: est["residual"]}, {design.factors[0]: boot["residual"]}, design.factors
    est = fit(y[None], c[None], rng)
    boot = fit(*parametric(est, design.bound(), n_resamples, rng), rng) if F else None
    rename = {"cells": "hyperparameters", "residual": "residual"} | {f"factor{f}": n for f, n in enumerate(design.factors)}
    keep = lambda d: {rename[k]: v for k, v in d.items() if k in rename and (k != "cells" or C > 1)}  # noqa: E731
    est = keep(est)
    order = [n for n in ["hyperparameters", *design.factors, "residual"] if n in est]
    return est, (keep(boot) if boot is not None else None), order


def corrected(est: np.ndarray, sim: np.ndarray, replicates: np.ndarray) -> np.ndarray:
    """The bootstrap bias correction: the estimate less the bias the replicates show in the bootstrap
    world (their mean less that world's truth `sim`). It removes the censored fit's drift on small
    designs and a share's ratio bias, to first order; replicates [..., R]."""
    return est - (np.nanmean(replicates, -1) - sim)


def interval(replicates, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of bootstrap replicates (NaN where there are none)."""
    if replicates is None or not np.isfinite(replicates).any():
        return np.nan, np.nan
    lo, hi = np.nanquantile(replicates, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def log_basic(est, sim, replicates, level: float = 0.95):
    """Interval for a positive θ: the basic bootstrap on the log scale, log(est/θ) distributed as
    log(replicates/sim). Exact for a mean square without censoring (a scaled chi-square: its log is
    pivotal), where the percentile interval is shifted by the skewness and under-covers with few
    levels. est, sim [...]; replicates [..., R]."""
    est, sim = np.asarray(est, float), np.asarray(sim, float)
    q = np.nanquantile(np.log(replicates / sim[..., None]), [(1 - level) / 2, (1 + level) / 2], axis=-1)
    return est * np.exp(-q[1]), est * np.exp(-q[0])


def residual_per_run(design: Design) -> dict[str, float]:
    """Per component, the multiple of σ_e² in its mean square per run, so that component + that × σ_e²
    is positive and (without censoring) a scaled chi-square: 1/(runs per level) for a factor, (C−1)/N
    for the cells' variance, 0 for the residual."""
    N, C = design.y.size, design.y.shape[0]
    per_level = {n: i / N for n, i in zip(design.factors, design.y.shape[1:])}
    return per_level | {"hyperparameters": (C - 1) / N, "residual": 0.0}


def component_interval(est, sim, replicates, resid: tuple, multiple: float, level: float = 0.95):
    """Interval of a component θ = λ − multiple × σ_e², with λ = θ + multiple × σ_e² (its mean square per run):
    the modified large-sample combination (Graybill & Wang 1980) of `log_basic` intervals for λ and σ_e²,
    so the residual's own uncertainty widens the interval of a small component, floored at 0 (a variance
    is not negative). resid: σ_e²'s (estimate, bootstrap truth, replicates)."""
    lam = [x + multiple * r for x, r in zip((est, sim, replicates), resid)]
    lam_lo, lam_hi = log_basic(*lam, level)
    e_lo, e_hi = log_basic(*resid, level) if multiple else (resid[0], resid[0])
    centre = lam[0] - multiple * resid[0]
    lo = centre - np.hypot(lam[0] - lam_lo, multiple * (e_hi - resid[0]))
    hi = centre + np.hypot(lam_hi - lam[0], multiple * (resid[0] - e_lo))
    return np.maximum(lo, 0.0), np.maximum(hi, 0.0)


def components(design: Design, n_resamples: int = 199, seed: int = 0) -> list[dict]:
    """Each component and its share of the total, bias-corrected (`corrected`), with intervals from the
    parametric bootstrap (`component_interval`; a share's, percentile): rows (measure, factor, estimate,
    ci_lo, ci_hi, n). Whether a design this small is backed by the simulation: `supported`."""
    est, boot, names = estimate(design, n_resamples, seed)
    est = {k: v[0] for k, v in est.items()}
    sim = _simulated(est)
    total, sim_total = sum(est.values()), sum(sim.values())
    multiple = residual_per_run(design)
    rows = []
    for name in names:
        comp = share = (np.nan, np.nan)
        e, s = est[name], est[name] / total
        if boot is not None:
            boot_total = sum(boot.values())
            resid = (est["residual"], sim["residual"], boot["residual"])
            comp = component_interval(e, sim[name], boot[name], resid, multiple[name])
            # A share's replicates, percentile: the log-basic interval of a component does not carry over
            # to a ratio of them (measured before: 80-92% on 8 × 8 to 16 × 16, where this covers 88-100%,
            # README's table).
            share = interval(boot[name] / boot_total)
            e = corrected(e, sim[name], boot[name])
            s = corrected(s, sim[name] / sim_total, boot[name] / boot_total)
        for measure, value, (lo, hi) in (("variance_component_log_t_val", e, comp), ("variance_share_log_t_val", s, share)):
            rows.append({"measure": measure, "factor": name, "estimate": float(value), "ci_lo": float(lo),
                         "ci_hi": float(hi), "n": int(design.y.size)})
    return rows


def supported(design: Design, measure: str = "component") -> str | None:
    """None where the simulation behind README's table backs the intervals (and the component's bias)
    on a design like this one; otherwise the sentence to print instead. measure: "component" or "share".
    The rule, from that table (truths of 5%, 35% and 60% of the total, 0-40% censored, 400 sweeps × 199
    bootstrap fits a row, 800 on 16 × 16 censored): with fewer than 8 levels of a factor and any run
    censored the bias-corrected fit is far off (4 × 4: data_seed −71% and −148%, residual −13% and −35%
    at 20% and 40%); above 25% censored a small component's interval under-covers on 16 × 16 (40%: 88.2%
    of 800 sweeps, the truth above it in 8.5%; 20%: 91.4%; 8 × 8 and 8 × 16 at 40%: 92% and 91%), so
    the components' intervals are withheld there, the shares' kept (16 × 16 at 40%: 91-92%); a share's
    interval covers 88-90% (large share) or 98-100% (small share) below 16 levels of every factor; and
    nothing is given above 40% censored, which was not simulated."""
    if unbacked := _unbacked(design):
        return unbacked
    levels = dict(zip(design.factors, design.y.shape[1:]))
    if not levels:
        return None
    fewest = min(levels, key=levels.get)
    censored = float(design.censored.mean())
    if measure == "component" and censored > 0.25:
        return (f"with {censored:.0%} of runs censored the 95% interval of a small component covers the truth "
                "in only 88% of simulated 16 × 16 sweeps (at 40% censored), so the components' intervals are "
                "not given (the shares' are, with ≥ 16 levels of every seed); a longer budget (≤ 25% censored) "
                "gives them.")
    if measure == "share" and levels[fewest] < 16:
        return (f"with {levels[fewest]} levels of {fewest} the shares' 95% intervals cover the truth too "
                "rarely or too often (simulated: 88-100%), so they are not given; the components' are; "
                "run ≥ 16 levels of every seed for them.")
    return None


def _unbacked(design: Design) -> str | None:
    """The designs on which the simulation backs not even the estimates (so neither they nor their
    intervals are given): fewer than 8 levels of a factor with censoring (bias-corrected 13-148% off),
    or more than 40% censored (not simulated; with every run censored nothing is identified)."""
    levels = dict(zip(design.factors, design.y.shape[1:]))
    if not levels:
        return None
    fewest = min(levels, key=levels.get)
    censored = float(design.censored.mean())
    if levels[fewest] < 8 and censored > 0:
        return (f"with {levels[fewest]} levels of {fewest} and {censored:.0%} of runs censored the variance "
                "components are too uncertain and biased to stand behind (simulated: bias-corrected estimates "
                "off by 13-148%); neither estimates nor intervals are given; run ≥ 8 levels of every seed.")
    if censored > 0.4:
        return (f"with {censored:.0%} of runs censored (simulated: up to 40%) neither the estimates nor their "
                "intervals are backed, so none are given; a longer budget gives them.")
    return None


def estimates_supported(design: Design) -> bool:
    """Whether the estimates themselves (not only their intervals) are backed by the simulation."""
    return _unbacked(design) is None


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
