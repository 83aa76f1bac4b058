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


def analyse(curves: dict[str, np.ndarray], steps: np.ndarray, grokking_cfg) -> dict[str, np.ndarray]:
    """Per-run outcomes from curves (train_acc, val_acc, train_loss, val_loss: [runs, evals]).

    Returns t_train, t_val, delay (NaN where not reached), censored, diverged and phase arrays.
    """
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


def progress_counts(train_acc: np.ndarray, val_acc: np.ndarray, threshold: float) -> tuple[int, int]:
    """Runs memorised so far (train reached the threshold once) and grokked so far (validation at
    or above it at the latest evaluation: a live count, final t_val asks that it stays)."""
    memorised = int((train_acc >= threshold).any(1).sum())
    grokked = int((val_acc[:, -1:] >= threshold).sum()) if val_acc.shape[1] else 0
    return memorised, grokked
