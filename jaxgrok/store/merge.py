"""The final DIR/runs.parquet and DIR/curves.parquet, merged from the verified part files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jaxgrok import grokking, results
from jaxgrok.store.parts import curves_part


def merge(out: Path, parts: list[Path], sweep) -> int:
    """Write DIR/runs.parquet and DIR/curves.parquet from the runs `parts` (verified, with their
    curves parts beside them), for the runs of the current sweep, with run_id = position in it, and
    their outcomes recomputed from their curves under the current [grokking] settings (a changed
    threshold retrains nothing). Returns the number of runs merged."""
    position = {h: i for i, h in enumerate(sweep.run_hashes)}
    runs = [results.upgrade_runs(pq.read_table(p)) for p in parts]
    curves = [results.upgrade_curves(pq.read_table(curves_part(p))) for p in parts]
    runs_t = pa.concat_tables([t.replace_schema_metadata(None) for t in runs])
    curves_t = pa.concat_tables([t.replace_schema_metadata(None) for t in curves])
    runs_t = _reindex(runs_t, position)
    curves_t = _reindex(curves_t, position)
    # A run trained twice (two shards racing, say) appears once: keep the first copy.
    _, first = np.unique(runs_t.column("run_id").to_numpy(), return_index=True)
    runs_t = runs_t.take(pa.array(first))
    keys = np.stack([curves_t.column("run_id").to_numpy(), curves_t.column("step").to_numpy()], 1)
    _, first = np.unique(keys, axis=0, return_index=True)
    curves_t = curves_t.take(pa.array(first))
    runs_t = runs_t.sort_by("run_id").cast(results.RUNS_SCHEMA)
    curves_t = curves_t.sort_by([("run_id", "ascending"), ("step", "ascending")]).select(
        results.CURVES_SCHEMA.names).cast(results.CURVES_SCHEMA)
    runs_t = _with_outcomes(runs_t, curves_t, sweep, out / "parts")
    results.write_pair(runs_t, curves_t, out, sweep.resolved)
    return runs_t.num_rows


def _with_outcomes(runs: pa.Table, curves: pa.Table, sweep, where: Path) -> pa.Table:
    """`runs` with t_train, t_val, delay, censored, phase and diverged computed from `curves`."""
    cfg = sweep.static.train
    steps = np.arange(1, cfg.steps // cfg.eval_every + 1, dtype=np.int64) * cfg.eval_every
    ends = results.evaluations(runs.column("stopped_at"), cfg.steps, cfg.eval_every)
    if curves.num_rows != ends.sum():  # the parts were verified: cannot happen
        raise results.ResultsError(f"{where}: {curves.num_rows} curve rows for {runs.num_rows} runs "
                                   f"of {len(steps)} evaluations (or to their stopped_at)")
    named = {m: results.dense(curves.column(m).to_numpy(zero_copy_only=False), ends, len(steps))
             for m in ("train_acc", "val_acc", "train_loss", "val_loss")}
    outcomes = grokking.analyse(named, steps, sweep.static.grokking, ends)
    for name, column in results.outcome_columns(outcomes).items():
        runs = runs.set_column(runs.schema.get_field_index(name), name, column)
    return runs


def _reindex(table: pa.Table, position: dict[str, int]) -> pa.Table:
    """Keep the rows of runs in the current sweep and number them by their place in it."""
    hashes = table.column("run_hash").to_pylist()
    keep = np.array([h in position for h in hashes])
    table = table.filter(pa.array(keep))
    ids = pa.array([position[h] for h, k in zip(hashes, keep) if k], pa.int32())
    return table.set_column(table.schema.get_field_index("run_id"), "run_id", ids)
