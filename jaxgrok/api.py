"""jaxgrok from Python (a notebook): the same engine, store and resume as `jaxgrok run`.

    import jaxgrok
    res = jaxgrok.run("sweeps/quickstart.toml", set={"steps": 1000})   # or a dict, as the TOML reads
    res.runs          # pandas DataFrame: one row per run (t_train, t_val, censored, phase, ...)
    res.curves        # one row per run and evaluation
    res.stats         # per cell: Kaplan-Meier medians with intervals, fraction grokked, ...
    res.sweep         # the resolved sweep (a dict)
    jaxgrok.load("results/quickstart").table("runs")   # any results directory; pyarrow, or .polars("runs")
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from jaxgrok import results
from jaxgrok.sweep import Sweep, SweepError, apply_overrides, load_sweep, sweep_from_dict

TABLES = ("runs", "curves", "stats", "sensitivity", "events", "lead_times", "concordance", "grokfast", "curvature")


class Results:
    """A results directory: its tables as pyarrow, pandas or polars, and the sweep that made them."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._runs = results.read(self.path / "runs.parquet", "runs")  # checked: one line if not jaxgrok's

    def __repr__(self) -> str:
        have = [t for t in TABLES if (self.path / f"{t}.parquet").exists()]
        return f"Results({str(self.path)!r}: {self._runs.num_rows} runs; tables {', '.join(have)})"

    @property
    def sweep(self) -> dict:
        """The resolved sweep (every key, defaults and overrides applied) the runs were trained under."""
        return results.sweep_config(self._runs)

    def table(self, name: str) -> pa.Table:
        """One of TABLES as a pyarrow Table, as the Parquet file holds it."""
        if name not in TABLES:
            raise ValueError(f"{name!r}: one of {', '.join(TABLES)}")
        if name == "runs":
            return results.upgrade_runs(self._runs)
        path = self.path / f"{name}.parquet"
        if name == "curves":
            results.check_pair(self.path / "runs.parquet", path)
            return results.read(path, "curves")
        if not path.exists():
            raise FileNotFoundError(f"{path}: not written (jaxgrok analyze {self.path} writes the statistics)")
        return pq.read_table(path)

    def pandas(self, name: str):
        """One of TABLES as a pandas DataFrame (needs pandas)."""
        _need("pandas")
        return self.table(name).to_pandas()

    def polars(self, name: str):
        """One of TABLES as a polars DataFrame (needs polars)."""
        _need("polars")
        import polars as pl

        return pl.from_arrow(self.table(name))

    runs = property(lambda self: self.pandas("runs"))
    curves = property(lambda self: self.pandas("curves"))
    stats = property(lambda self: self.pandas("stats"))


def _need(module: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ModuleNotFoundError(f"{module} is not installed (pip install {module}); Results.table(name) gives pyarrow")


def load(path: str | Path) -> Results:
    """Any results directory (one `jaxgrok run` or `jaxgrok.run` wrote)."""
    return Results(path)


def _sweep(sweep: str | Path | dict, overrides: list) -> Sweep:
    if isinstance(sweep, dict):
        return sweep_from_dict(apply_overrides(sweep, overrides, "<dict>"), "<dict>")
    return load_sweep(sweep, overrides)


def run(sweep: str | Path | dict, *, set: dict | list | None = None, out: str | Path | None = None,
        restart: bool = False, analyze: bool = True, progress: bool = False, checkpoint_every: int = 10) -> Results:
    """Train a sweep (a sweep file's path, or a dict laid out as the TOML) and return its Results.

    `set`: overrides, {"steps": 500, "train.learning_rate": 3e-3} or ["steps=500"] as on the
    command line; a sweep with overrides goes to results/NAME-set-HASH unless `out` says where.
    Runs already in `out` are not trained again (resume and extension as with `jaxgrok run`).
    Bad input raises SweepError with the command's one-line message."""
    overrides = list(set.items()) if isinstance(set, dict) else list(set or [])
    loaded = _sweep(sweep, overrides)
    from jaxgrok import pipeline

    out = str(out) if out else None
    target = pipeline.out_dir(loaded, out, overrides)
    code = pipeline.run(loaded, out=out, overrides=overrides, quiet=not progress, analyze=analyze, restart=restart,
                        checkpoint_every=checkpoint_every)
    if code:
        raise SweepError(f"{loaded.path}: the run stopped (exit {code}); run it again to resume")
    return Results(target)
