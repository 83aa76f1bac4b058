"""The run hash: a stable id per run, naming its stored results.

A run's hash is the hash of everything that determines its training and its recorded columns, and of
nothing else. A changed hash silently retrains (or orphans) every stored run (tests/test_golden.py pins
them), so the rules that keep an older run's hash as the package grew are all here, one sentence each:

- How the steps are cut into chunks and the runs into batches is left out: it changes no result.
- [grokking] is left out (it only reads the curves), except its threshold where runs retire on it.
- A [task], [model] or [train] key added later (LATER_TASK, LATER_MODEL, LATER_TRAIN) is left out at
  its default; so is a [measures] key of a measure
  added later (`later` in jaxgrok/measures).
- An axis added later (`later` in axes.py) is left out at its default.
- An axis that follows another (batch_seed, the model seed's minibatch order) is left out where equal to it.
- A registered class's module and name are in (registry.origins); jaxgrok's own classes add nothing.
- A swept batch size is in as the run's own [train] batch_size (a run of a batch-size sweep hashes as
  the same run with that fixed key).
- A full batch padded past its run's own pairs, a minibatch drawn past its run's own size, and a
  program with a Grokfast filter, ⊥Grad or the constrained norm in it, are in (they round
  differently), and nothing is added where none is the case.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from jaxgrok import measures, registry
from jaxgrok.sweep.axes import AXES, BY_NAME, TABLE

# [train] keys that decide how the work is cut, not what is computed.
NOT_HASHED_TRAIN = ("chunk_steps", "max_runs_per_batch")
# [train] keys added after the first results were written: left out of the hash at their default.
LATER_TRAIN = {"precision": "float32", "stop_after_grokking": 0, "grokfast_filter": "ema", "grokfast_window": 100}
LATER_TASK = {"y_nonzero": False}
LATER_MODEL = {"layer_norm_at": "post", "init": "nanda", "attention_bias": False, "operator_token": False}


def _without_later(table: dict, later: dict) -> dict:
    return {k: v for k, v in table.items() if later.get(k, object()) != v}


def static_part(resolved: dict, task, model) -> str:
    """The part of every run's hash that the sweep's static config gives, as canonical JSON."""
    train = _without_later({k: v for k, v in resolved["train"].items() if k not in NOT_HASHED_TRAIN}, LATER_TRAIN)
    # The measures are in: a run's recorded columns depend on them (its training does not).
    measured = {k: v for k, v in resolved["measures"].items() if measures.LATER_KEYS.get(k, object()) != v}
    static = {"task": _without_later(resolved["task"], LATER_TASK), "model": _without_later(resolved["model"], LATER_MODEL),
              "train": train, "measures": measured}
    # A retired run's curves end where its accuracy stayed at the threshold long enough: the threshold
    # decides what is recorded (otherwise [grokking] only reads the curves).
    if train.get("stop_after_grokking"):
        static["retire_threshold"] = resolved["grokking"]["threshold"]
    # A registered class's module and name are in: two classes under one name never share results.
    if code := registry.origins(task, model):
        static["code"] = code
    return json.dumps(static, sort_keys=True)


def run_part(values: dict, padded_to: int | None, grokfast_program: bool, orthograd_program: bool = False,
             constrain_program: bool = False, batch_padded_to: int | None = None) -> str:
    """The part of one run's hash that its axis values give (name -> Python scalar), as canonical JSON."""
    hp = {k: v for k, v in values.items() if not BY_NAME[k].train_key}  # those are in the static part
    for axis in TABLE:
        if axis.later and hp.get(axis.name) == axis.default:  # an axis added later, at its default
            del hp[axis.name]
    for axis in TABLE:
        if axis.follows and hp[axis.name] == hp[axis.follows]:  # batch_seed equal to seed
            del hp[axis.name]
    # A full batch is padded to the sweep's largest training set, and the padded length changes how
    # its sums round: a run padded past its own pairs is a different computation.
    if padded_to is not None:
        hp["padded_to"] = padded_to
    # So is a minibatch drawn at the sweep's largest size and weighed at the run's own.
    if batch_padded_to is not None:
        hp["batch_padded_to"] = batch_padded_to
    # Likewise a program with a Grokfast filter in it: with λ = 0 the optimizer gets the same
    # gradients, but XLA fuses its arithmetic differently and the last bits differ.
    if grokfast_program:
        hp["grokfast_program"] = True
    if orthograd_program:
        hp["orthograd_program"] = True
    if constrain_program:
        hp["constrain_norm_program"] = True
    return json.dumps(hp, sort_keys=True)


def run_hashes(sweep) -> list[str]:
    """Every run's hash, 16 hex digits, in run order."""
    resolved, st = sweep.resolved, sweep.static
    # A swept batch size hashes as the run's own [train] batch_size (one static part per size).
    statics = {int(b): static_part(resolved | {"train": resolved["train"] | {"batch_size": int(b)}}, st.task, st.model)
               for b in np.unique(sweep.runs["batch_size"])}
    full_batch, n_max, b_max = not st.train.batch_size, st.n_train_max, st.train.batch_size
    out = []
    for i in range(sweep.n_runs):
        values = {a: sweep.runs[a][i].item() for a in AXES}
        padded = n_max if full_batch and sweep.n_train[i] < n_max else None
        b = values["batch_size"]
        blob = statics[b] + run_part(values, padded, st.grokfast, st.orthograd, st.constrain_norm,
                                     b_max if b < b_max else None)
        out.append(hashlib.sha256(blob.encode()).hexdigest()[:16])
    return out
