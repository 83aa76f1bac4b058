"""Sweep files: a TOML file in, a validated static config and the table of runs out.

A sweep file has six tables. `[task]`, `[model]`, `[train]`, `[grokking]` and `[measures]` fix
everything that decides the compiled program (shapes, depth, step budget); `[sweep]` lists the values of the axes
that vary *inside* that one program: four seeds (initialization, data split, minibatch order, and the
direction of an initialization perturbation), weight decay, learning rate, initialization scale and
perturbation size, train fraction, Grokfast's filter, ⊥Grad, Omnigrok's held norm and the minibatch size. The runs are the product of the axes; axes
named together in `zip` vary together instead.

axes.py: the one table of axes; config.py: the configuration tables, Static and Sweep; toml.py:
reading a file and its overrides; load.py: a file's tables resolved into a Sweep; hashing.py: the run
hash and every rule that keeps an older run's hash.
"""

from jaxgrok.sweep import axes
from jaxgrok.sweep.axes import (
    AXES,
    AXIS_DEFAULTS,
    INT_AXES,
    LATER_AXES,
    REQUIRED_AXES,
    SEED_AXES,
    TABLE,
    Axis,
    SweepError,
    max_runs,
    n_train,
    varying,
)
from jaxgrok.sweep.config import (
    OPTIMIZERS,
    PRECISIONS,
    GrokkingConfig,
    MeasuresConfig,
    Static,
    Sweep,
    TrainConfig,
    differences,
    said_differences,
)
from jaxgrok.sweep.hashing import LATER_TRAIN
from jaxgrok.sweep.load import MAX_EVALUATIONS, MAX_STEPS, SAFE_NAME, load_sweep, sweep_from_dict
from jaxgrok.sweep.toml import apply_overrides, overrides_id, read_toml

__all__ = [
    "AXES", "AXIS_DEFAULTS", "LATER_AXES", "LATER_TRAIN", "MAX_EVALUATIONS", "MAX_STEPS", "OPTIMIZERS", "PRECISIONS",
    "INT_AXES", "REQUIRED_AXES", "SAFE_NAME", "SEED_AXES", "TABLE", "Axis", "axes", "GrokkingConfig", "MeasuresConfig", "Static", "Sweep",
    "SweepError", "TrainConfig", "apply_overrides", "differences", "load_sweep", "max_runs", "n_train", "overrides_id",
    "read_toml", "said_differences", "sweep_from_dict", "varying",
]
