"""Grokking-time and phase logic on hand-made curves."""

import numpy as np

from jaxgrok import grokking
from jaxgrok.sweep import GrokkingConfig

STEPS = np.arange(1, 11) * 100  # evaluations at 100 .. 1000


def curves(train_acc, val_acc, loss=None):
    train_acc, val_acc = np.atleast_2d(train_acc).astype(float), np.atleast_2d(val_acc).astype(float)
    loss = np.ones_like(train_acc) if loss is None else np.atleast_2d(loss).astype(float)
    return {"train_acc": train_acc, "val_acc": val_acc, "train_loss": loss, "val_loss": loss}


def test_grokking_run_gets_t_train_t_val_delay():
    c = curves([0.5, 1, 1, 1, 1, 1, 1, 1, 1, 1], [0.1, 0.1, 0.1, 0.2, 0.5, 0.995, 1, 1, 1, 1])
    o = grokking.analyse(c, STEPS, GrokkingConfig(phase_gap=200))
    assert o["t_train"][0] == 200 and o["t_val"][0] == 600 and o["delay"][0] == 400
    assert not o["censored"][0] and not o["diverged"][0]
    assert o["phase"][0] == "grokking"


def test_a_lone_spike_is_not_grokking():
    val = [0.1, 0.1, 0.995, 0.2, 0.1, 0.1, 0.99, 0.995, 0.999, 1.0]
    o = grokking.analyse(curves(np.ones(10), val), STEPS, GrokkingConfig())
    assert o["t_val"][0] == 700  # not 300: the spike at 300 fell back


def test_a_run_that_falls_back_at_the_end_is_censored():
    val = [0.1, 1, 1, 1, 1, 1, 1, 1, 1, 0.5]
    o = grokking.analyse(curves(np.ones(10), val), STEPS, GrokkingConfig())
    assert o["censored"][0] and np.isnan(o["t_val"][0]) and np.isnan(o["delay"][0])
    assert o["phase"][0] == "memorization"


def test_never_fitting_is_confusion_and_censored():
    o = grokking.analyse(curves(np.full(10, 0.3), np.full(10, 0.1)), STEPS, GrokkingConfig())
    assert np.isnan(o["t_train"][0]) and o["censored"][0] and o["phase"][0] == "confusion"


def test_train_and_val_together_is_comprehension():
    acc = [0.2, 0.5, 0.95, 1, 1, 1, 1, 1, 1, 1]
    o = grokking.analyse(curves(acc, acc), STEPS, GrokkingConfig(phase_gap=100))
    assert o["phase"][0] == "comprehension" and o["delay"][0] == 0


def test_nan_marks_diverged_and_censors():
    loss = [1, 1, 1, np.nan, np.nan, np.nan, np.nan, np.nan, np.nan, np.nan]
    acc = [0.5, 1, 1, np.nan, np.nan, np.nan, np.nan, np.nan, np.nan, np.nan]
    o = grokking.analyse(curves(acc, acc, loss), STEPS, GrokkingConfig())
    assert o["diverged"][0] and o["censored"][0] and o["t_train"][0] == 200


def test_runs_are_independent_rows():
    c = curves([np.ones(10), np.zeros(10)], [np.ones(10), np.zeros(10)])
    o = grokking.analyse(c, STEPS, GrokkingConfig())
    assert list(o["censored"]) == [False, True]
    assert list(o["phase"]) == ["comprehension", "confusion"]
