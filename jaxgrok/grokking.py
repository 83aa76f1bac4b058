"""From evaluation curves to memorisation and grokking times, and a phase per run.

Curves are arrays [runs, evals] with the step of each evaluation in `steps`. A time that is not
reached is NaN here and null in Parquet: a censored run is never given a made-up number.
"""

from __future__ import annotations

import numpy as np

PHASES = ("comprehension", "grokking", "memorization", "confusion")


def first_reach(acc: np.ndarray, steps: np.ndarray, threshold: float) -> np.ndarray:
    """Per run, the first step with accuracy ≥ threshold; NaN if never."""
    ok = acc >= threshold  # NaN compares False
    return np.where(ok.any(1), steps[ok.argmax(1)], np.nan)


def first_stays(acc: np.ndarray, steps: np.ndarray, threshold: float) -> np.ndarray:
    """Per run, the first step from which accuracy stays ≥ threshold to the end; NaN if never.
    A lone spike above the threshold that falls back is not counted."""
    ok = acc >= threshold
    stays = np.logical_and.accumulate(ok[:, ::-1], axis=1)[:, ::-1]
    return np.where(stays[:, -1] if stays.shape[1] else False, steps[stays.argmax(1)], np.nan)


def phases(t_train: np.ndarray, t_val: np.ndarray, gap: float) -> np.ndarray:
    """Liu et al. 2022: confusion (train never fits), memorization (train fits, validation never
    does), grokking (validation fits more than `gap` steps after train), comprehension (together)."""
    return np.select(
        [np.isnan(t_train), np.isnan(t_val), t_val - t_train > gap],
        ["confusion", "memorization", "grokking"],
        "comprehension",
    )


def _cut(curves: dict[str, np.ndarray], ends: np.ndarray) -> dict[str, np.ndarray]:
    """Curves of runs that end early (retired: `ends` evaluations each) read as if each run's last
    value held to the budget: a run that retired grokked stays grokked, one that retired diverged
    stays diverged (NaN), and nothing is first reached past its end."""
    ends = np.maximum(np.asarray(ends), 1)
    past = np.arange(curves["val_acc"].shape[1]) >= ends[:, None]

    def held(x):
        return np.where(past, np.take_along_axis(x, (ends - 1)[:, None], 1), x)

    return {name: held(curves[name]) for name in ("train_acc", "val_acc", "train_loss", "val_loss")}


def analyse(curves: dict[str, np.ndarray], steps: np.ndarray, grokking_cfg, ends: np.ndarray | None = None
            ) -> dict[str, np.ndarray]:
    """Per-run outcomes from curves (train_acc, val_acc, train_loss, val_loss: [runs, evals]).
    `ends`: the evaluations each run has (a retired run's curves end early; None: all of them): its
    t_val is then the first step from which validation stays at the threshold to its end.

    Returns t_train, t_val, delay (NaN where not reached), censored, diverged and phase arrays.
    """
    if ends is not None:
        curves = _cut(curves, ends)
    thr = grokking_cfg.threshold
    t_train = first_reach(curves["train_acc"], steps, thr)
    t_val = first_stays(curves["val_acc"], steps, thr)
    diverged = ~(np.isfinite(curves["train_loss"]).all(1) & np.isfinite(curves["val_loss"]).all(1))
    pa = grokking_cfg.phase_accuracy
    phase = phases(first_reach(curves["train_acc"], steps, pa), first_stays(curves["val_acc"], steps, pa),
                   grokking_cfg.phase_gap)
    return {
        "t_train": t_train,
        "t_val": t_val,
        "delay": t_val - t_train,
        "censored": np.isnan(t_val),
        "diverged": diverged,
        "phase": phase,
    }


def progress_counts(train_acc: np.ndarray, val_acc: np.ndarray, threshold: float, done: np.ndarray) -> tuple[int, int]:
    """Runs memorised so far (train reached the threshold once) and grokked so far (validation at
    or above it at each run's latest evaluation, `done` evaluations in: a live count, final t_val
    asks that it stays)."""
    if not len(val_acc):
        return 0, 0
    memorised = int((train_acc >= threshold).any(1).sum())
    latest = val_acc[np.arange(len(val_acc)), np.maximum(done, 1) - 1]
    return memorised, int(((latest >= threshold) & (np.asarray(done) > 0)).sum())


def retire(val_acc: np.ndarray, losses: np.ndarray, done: np.ndarray, eval_every: int, threshold: float,
           window: int) -> np.ndarray:
    """Per run, the evaluations it keeps once it has retired, or 0 if it trains on. `val_acc` and
    `losses` (NaN where a loss was not finite) are [runs, evals], valid up to `done` evaluations.
    A run retires at the first evaluation where validation accuracy has stayed ≥ `threshold` for
    `window` steps since its streak began (its t_val), keeping its curves to that evaluation; a
    diverged run at its first non-finite evaluation. A run that has not grokked never retires. The
    program freezes a run by the same rule (train._count_streak)."""
    n = val_acc.shape[1]
    valid = np.arange(n) < np.asarray(done)[:, None]
    bad = valid & ~np.isfinite(losses)
    diverged_at = np.where(bad.any(1), bad.argmax(1), n)
    need = -(-window // eval_every)  # evaluations after t_val
    ok = np.concatenate([np.zeros((len(val_acc), 1), int), np.cumsum(valid & (val_acc >= threshold), 1)], 1)
    stayed = np.zeros_like(valid)
    if need < n:
        stayed[:, need:] = (ok[:, need + 1:] - ok[:, :n - need]) == need + 1  # evaluations e − need … e all ≥ it
    retired_at = np.where(stayed.any(1), stayed.argmax(1), n)
    first = np.minimum(diverged_at, retired_at)
    return np.where(first < n, first + 1, 0)
