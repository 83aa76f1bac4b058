"""A raised budget: runs that the directory holds at a smaller one are not trained again from step 0.

A run's hash includes its budget, so the same run at another `steps` has another hash. For each
budget its parts hold, the sweep is hashed again at that budget to find each pending run there:

- retired there (stopped_at): retiring looks only back, so more steps cannot change where it retired;
  its rows are carried over as they are, under its new hash and budget;
- trained to that budget with its final state stored (states.py): it continues from that state and
  ends bit for bit as a fresh run at the new budget would (on CPU), since nothing in a run's training
  depends on its budget (train.depends_on_budget says so, and where it ever does, extension refuses);
- otherwise it trains from step 0.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jaxgrok import results
from jaxgrok.store import states
from jaxgrok.store.parts import curves_part


@dataclasses.dataclass(frozen=True)
class Earlier:
    """A run of the sweep as the directory holds it at a smaller budget."""

    runs_part: Path
    old_hash: str
    steps: int  # the budget it had
    stopped: bool  # it retired within it


def _at_budget(sweep, steps: int):
    from jaxgrok.sweep import sweep_from_dict

    resolved = {**sweep.resolved, "train": {**sweep.resolved["train"], "steps": steps}}
    return sweep_from_dict(resolved, str(sweep.path))


def earlier(sweep, finished: dict[Path, list[str]], pending: set[int]) -> dict[int, Earlier]:
    """The pending runs (positions in `sweep`) that the finished parts hold at a smaller budget."""
    cfg = sweep.static.train
    found: dict[int, list[tuple[Path, str, bool]]] = {}
    for path in finished:
        names = pq.read_schema(path).names
        table = pq.read_table(path, columns=[c for c in ("run_hash", "steps", "stopped_at") if c in names])
        stopped = (table.column("stopped_at").is_valid().to_pylist() if "stopped_at" in names
                   else [False] * table.num_rows)
        for h, steps, s in zip(table.column("run_hash").to_pylist(), table.column("steps").to_pylist(), stopped):
            if steps < cfg.steps and steps % cfg.eval_every == 0:
                found.setdefault(int(steps), []).append((path, h, s))
    if found:
        from jaxgrok import train

        if train.depends_on_budget(sweep.static):
            from jaxgrok.sweep import SweepError

            raise SweepError(f"{sweep.path}: train.steps: raised to {cfg.steps:,}, but this sweep's training "
                             f"depends on its budget: its runs cannot be extended; train them anew in another --out")
    out = {}
    for steps, entries in sorted(found.items()):
        position = {h: i for i, h in enumerate(_at_budget(sweep, steps).run_hashes)}
        for path, h, stopped in entries:
            if (row := position.get(h)) is not None and row in pending:
                out[row] = Earlier(path, h, steps, stopped)
    return out


def carry_over(sweep, kept: dict[int, Earlier], write) -> int:
    """Write the retired runs `kept` as runs of this sweep (their rows as they are, under their new
    hash and budget) with `write(runs_table, curves_table)`; how many."""
    by_part: dict[Path, dict[str, int]] = {}
    for row, e in kept.items():
        by_part.setdefault(e.runs_part, {})[e.old_hash] = row
    for path, rows in by_part.items():
        runs = results.upgrade_runs(pq.read_table(path))
        runs = runs.filter(pa.array([h in rows for h in runs.column("run_hash").to_pylist()]))
        curves = pq.read_table(curves_part(path))
        curves = curves.filter(pa.array([h in rows for h in curves.column("run_hash").to_pylist()]))
        runs = _renamed(runs, sweep, rows)
        runs = runs.set_column(runs.schema.get_field_index("steps"), "steps",
                               pa.array(np.full(runs.num_rows, sweep.static.train.steps), pa.int64()))
        curves = _renamed(curves, sweep, rows)
        write(runs.replace_schema_metadata(results.metadata("runs", sweep.resolved)),
              curves.replace_schema_metadata(results.metadata("curves", sweep.resolved)))
    return len(kept)


def _renamed(table: pa.Table, sweep, rows: dict[str, int]) -> pa.Table:
    """`table` with each old run hash replaced by its run's hash in `sweep` (`rows`: old hash -> run)."""
    new = pa.array([sweep.run_hashes[rows[h]] for h in table.column("run_hash").to_pylist()], pa.string())
    return table.set_column(table.schema.get_field_index("run_hash"), "run_hash", new)


def continuation(sweep, continued: dict[int, Earlier], state_index: dict, names: list[str], metrics: list[str]
                 ) -> dict[int, tuple[dict[str, np.ndarray], np.ndarray, int]]:
    """For the runs `continued` whose final state is stored: row -> (the state's leaves `names`,
    its curves so far float32[evaluations, len(metrics)], the evaluations it has done). Each state
    file and curves part is read once. A state that does not read leaves its run out (it trains
    from step 0)."""
    every = sweep.static.train.eval_every
    by_file: dict[Path, list[int]] = {}
    for row, e in continued.items():
        path, _, steps = state_index[e.old_hash]
        if steps == e.steps:
            by_file.setdefault(path, []).append(row)
    out = {}
    for path, rows in by_file.items():
        leaves = states.read(path, [state_index[continued[r].old_hash][1] for r in rows], names)
        if leaves is None:
            continue
        curves = _curves_of({continued[r].runs_part for r in rows}, {continued[r].old_hash for r in rows}, metrics)
        for i, row in enumerate(rows):
            e = continued[row]
            values = curves.get(e.old_hash)
            if values is not None and len(values) == e.steps // every:
                out[row] = ({k: v[i] for k, v in leaves.items()}, values, e.steps // every)
    return out


def _curves_of(parts: set[Path], hashes: set[str], metrics: list[str]) -> dict[str, np.ndarray]:
    """old hash -> its curves float32[evaluations, len(metrics)] (null as NaN), read from `parts`."""
    out = {}
    for runs_part in parts:
        table = results.upgrade_curves(pq.read_table(curves_part(runs_part)))
        table = table.filter(pa.array([h in hashes for h in table.column("run_hash").to_pylist()]))
        table = table.sort_by([("run_hash", "ascending"), ("step", "ascending")])
        run_hash = np.array(table.column("run_hash").to_pylist(), object)
        values = np.stack([table.column(m).cast(pa.float32()).fill_null(np.nan).to_numpy() for m in metrics], 1)
        for h in np.unique(run_hash):
            out[h] = values[run_hash == h].astype(np.float32)
    return out
