"""A results directory that survives being killed: part files for finished batches, orbax checkpoints
for the batch in progress, and the final runs.parquet / curves.parquet merged from the parts.

    DIR/parts/runs-<key>.parquet, curves-<key>.parquet   one pair per finished batch (atomic)
    DIR/checkpoints/<step>/                              orbax: train state, curves so far, cursor
    DIR/runs.parquet, DIR/curves.parquet                 merged, one row per run of the current sweep

A run is known by its `run_hash` (its resolved configuration), so re-running a finished sweep trains
nothing, and extending it trains only the runs it does not have yet.
"""

from __future__ import annotations

import hashlib
import shutil
import signal
import sys
from pathlib import Path

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jaxgrok import results


class Interrupted(Exception):
    """Training stopped on a signal after writing a checkpoint."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


class Store:
    def __init__(self, out: str | Path, sweep, restart: bool = False, checkpoint_every: int = 10,
                 tag: str = "", shard_tag: str = ""):
        """`tag` names this process's part files apart from other processes' and shards';
        `shard_tag` names the checkpoints of a shard (the processes of one sweep share theirs)."""
        self.out, self.sweep, self.checkpoint_every = Path(out), sweep, checkpoint_every
        self.tag, self.shard_tag = tag, shard_tag
        self.parts = self.out / "parts"
        self.hashes = sweep.run_hashes
        self.stop_signal: int | None = None
        if restart:
            self._remove_own_files()
        self.parts.mkdir(parents=True, exist_ok=True)
        for tmp in self.parts.glob(".*.tmp"):  # a part a crash left half-written: never committed
            tmp.unlink()
        self._manager = None

    def _remove_own_files(self) -> None:
        """--restart: delete what jaxgrok wrote here and nothing else: its part files, its orbax
        step directories (named by their step number), and runs/curves.parquet where they carry
        jaxgrok's metadata. Anything else in the directory stays."""
        for pattern in ("runs-*.parquet", "curves-*.parquet", ".*.tmp"):
            for f in self.parts.glob(pattern):
                f.unlink()
        checkpoints = self.out / "checkpoints"
        # orbax's step directories, in checkpoints/ or a shard's checkpoints/sIofN/
        for step in [*checkpoints.glob("[0-9]*"), *checkpoints.glob("s*of*/[0-9]*")]:
            if step.is_dir() and step.name.split(".")[0].isdigit():  # a step, or one a kill left half-saved
                shutil.rmtree(step)
        for name in ("runs", "curves"):
            path = self.out / f"{name}.parquet"
            if path.is_file() and _is_jaxgrok_table(path, name):
                path.unlink()
        for folder in [*checkpoints.glob("s*of*"), checkpoints]:
            _rmdir_if_empty(folder)

    # -- signals ------------------------------------------------------------------------------

    def catch_signals(self) -> None:
        """SIGTERM/SIGINT: finish the chunk in flight, checkpoint, then stop (see Interrupted)."""
        def handler(signum, frame):
            self.stop_signal = signum
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, handler)

    # -- finished runs ------------------------------------------------------------------------

    def done_hashes(self) -> set[str]:
        done = set()
        for path in self.parts.glob("runs-*.parquet"):  # every process's and shard's
            done |= set(pq.read_table(path, columns=["run_hash"]).column("run_hash").to_pylist())
        return done

    def pending(self, index: np.ndarray) -> np.ndarray:
        done = self.done_hashes()
        return np.array([i for i in index if self.hashes[i] not in done], dtype=np.int64)

    def write_batch(self, runs_table: pa.Table, curves_table: pa.Table) -> None:
        """Commit a finished batch: its parts appear whole, then its checkpoints go."""
        key = hashlib.sha256("".join(runs_table.column("run_hash").to_pylist()).encode()).hexdigest()[:16]
        prefix = f"{self.tag}-" if self.tag else ""
        # curves first: a runs part is what marks the batch done.
        results.write_atomic(curves_table, self.parts / f"curves-{prefix}{key}.parquet")
        results.write_atomic(runs_table, self.parts / f"runs-{prefix}{key}.parquet")
        self.clear_checkpoints()

    # -- the batch in progress ----------------------------------------------------------------

    @property
    def manager(self):
        if self._manager is None:
            import orbax.checkpoint as ocp

            # One checkpoint directory per shard; the processes of one sweep share it.
            path = (self.out / "checkpoints" / self.shard_tag if self.shard_tag else self.out / "checkpoints").absolute()
            self._manager = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(
                max_to_keep=2, enable_async_checkpointing=False))
        return self._manager

    def save(self, state, curves, run_hashes: list[str], chunks_done: int) -> None:
        """Checkpoint the batch in progress: its train state and curves so far (run-sharded global
        arrays: with several processes each writes its own shards) and the cursor."""
        import orbax.checkpoint as ocp

        step = (self.manager.latest_step() or 0) + 1
        state = state._replace(key=jax.random.key_data(state.key))  # typed keys: store their data
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"state": state, "curves": curves}),
            cursor=ocp.args.JsonSave({"run_hashes": run_hashes, "chunks_done": chunks_done,
                                      "runs_per_batch": int(curves.shape[0])})))
        self.manager.wait_until_finished()

    def _newest_readable(self, args, report: bool):
        """Restore `args` from the newest checkpoint that reads; an unreadable one is reported (if
        `report`) and the one before it tried. None if none reads."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                return self.manager.restore(step, args=args)
            except Exception as e:  # noqa: BLE001 - any failure to read means: use the one before
                if report:
                    print(f"jaxgrok: checkpoint {step} in {self.manager.directory} is unreadable "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:120]}); using the one before",
                          file=sys.stderr)
        return None

    def restore(self, abstract):
        """The newest readable checkpoint as (state, curves, chunks_done), or None. `abstract` gives
        shapes and shardings."""
        import orbax.checkpoint as ocp

        got = self._newest_readable(ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                       cursor=ocp.args.JsonRestore()), report=True)
        if got is None:
            return None
        state = got.state["state"]
        return state._replace(key=jax.random.wrap_key_data(state.key)), got.state["curves"], got.cursor["chunks_done"]

    def checkpointed_batch(self) -> tuple[list[str], int | None] | None:
        """(the runs of the batch in progress, the padded batch size it was saved with: None in
        checkpoints from before it was recorded), read from the newest checkpoint's cursor."""
        import orbax.checkpoint as ocp

        got = self._newest_readable(ocp.args.Composite(cursor=ocp.args.JsonRestore()), report=False)
        return None if got is None else (got.cursor["run_hashes"], got.cursor.get("runs_per_batch"))

    def clear_checkpoints(self) -> None:
        for step in self.manager.all_steps():
            self.manager.delete(step)

    # -- the final files ----------------------------------------------------------------------

    def merge(self) -> int:
        """Write DIR/runs.parquet and DIR/curves.parquet from the parts, for the runs of the current
        sweep, with run_id = position in it. Returns the number of runs merged."""
        position = {h: i for i, h in enumerate(self.hashes)}
        runs = [results.upgrade_runs(pq.read_table(p)) for p in sorted(self.parts.glob("runs-*.parquet"))]
        curves = [pq.read_table(p) for p in sorted(self.parts.glob("curves-*.parquet"))]
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
        runs_t = runs_t.sort_by("run_id").cast(results.RUNS_SCHEMA).replace_schema_metadata(
            results.metadata("runs", self.sweep.resolved))
        curves_t = curves_t.sort_by([("run_id", "ascending"), ("step", "ascending")]).select(
            results.CURVES_SCHEMA.names).cast(results.CURVES_SCHEMA).replace_schema_metadata(
            results.metadata("curves", self.sweep.resolved))
        results.write_atomic(runs_t, self.out / "runs.parquet")
        results.write_atomic(curves_t, self.out / "curves.parquet")
        return runs_t.num_rows


def _is_jaxgrok_table(path: Path, kind: str) -> bool:
    try:
        return (pq.read_schema(path).metadata or {}).get(results.KIND_KEY) == kind.encode()
    except (OSError, pa.ArrowException):
        return False


def _rmdir_if_empty(folder: Path) -> None:
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def _reindex(table: pa.Table, position: dict[str, int]) -> pa.Table:
    """Keep the rows of runs in the current sweep and number them by their place in it."""
    hashes = table.column("run_hash").to_pylist()
    keep = np.array([h in position for h in hashes])
    table = table.filter(pa.array(keep))
    ids = pa.array([position[h] for h, k in zip(hashes, keep) if k], pa.int32())
    return table.set_column(table.schema.get_field_index("run_id"), "run_id", ids)

