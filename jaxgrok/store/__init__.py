"""A results directory that survives being killed: part files for finished batches, orbax checkpoints
for the batch in progress, and the final runs.parquet / curves.parquet merged from the parts.

    DIR/parts/runs-<key>.parquet, curves-<key>.parquet   one pair per finished batch (parts.py)
    DIR/parts/state-<key>.npz                            their final train states, for a larger budget (states.py, extend.py)
    DIR/checkpoints/<step>/                              orbax: train state, curves so far, cursor (checkpoints.py)
    DIR/runs.parquet, DIR/curves.parquet                 merged, one row per run of the current sweep (merge.py)
    DIR/.lock                                            one jaxgrok run at a time (lock.py)

A run is known by its `run_hash` (its resolved configuration), so re-running a finished sweep trains
nothing, and extending it trains only the runs it does not have yet.
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import jax
import numpy as np
import pyarrow as pa

from jaxgrok.store import extend as _extend
from jaxgrok.store import merge as _merge
from jaxgrok.store import parts as _parts
from jaxgrok.store import states as _states
from jaxgrok.store.checkpoints import Checkpoints, WriteError
from jaxgrok.store.parts import DamagedPart, curves_part, rmdir_if_empty, verify_part

__all__ = ["Store", "Interrupted", "WriteError", "DamagedPart", "curves_part", "verify_part", "rmdir_if_empty"]


class Interrupted(Exception):
    """Training stopped on a signal after writing a checkpoint."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


class Store:
    """One sweep's view of its results directory `out`: which runs are done, the batch in progress,
    the merge, and the signals that stop training at the next chunk."""

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
        if not shard_tag and jax.process_count() == 1:  # alone in DIR (it is locked): no one else is writing
            for tmp in [*self.parts.glob(".*.tmp"), *self.out.glob(".*.parquet.*.tmp")]:
                tmp.unlink()  # a file a crash left half-written: never committed
        # One checkpoint directory per shard; the processes of one sweep share it.
        self.checkpoints = Checkpoints(self.out / "checkpoints" / shard_tag if shard_tag else self.out / "checkpoints")
        self._verified: dict[Path, list[str]] = {}  # runs part -> its run hashes

    def _remove_own_files(self) -> None:
        """--restart: delete what jaxgrok wrote here and nothing else: its part files, its orbax
        step directories (named by their step number), and runs/curves.parquet where they carry
        jaxgrok's metadata. Anything else in the directory stays."""
        for pattern in ("runs-*.parquet", "curves-*.parquet", "state-*.npz", ".*.tmp"):
            for f in self.parts.glob(pattern):
                f.unlink()
        checkpoints = self.out / "checkpoints"
        # orbax's step directories, in checkpoints/ or a shard's checkpoints/sIofN/
        for step in [*checkpoints.glob("[0-9]*"), *checkpoints.glob("s*of*/[0-9]*")]:
            if step.is_dir() and step.name.split(".")[0].isdigit():  # a step, or one a kill left half-saved
                shutil.rmtree(step)
        for name in ("runs", "curves"):
            path = self.out / f"{name}.parquet"
            if path.is_file() and _parts.is_jaxgrok_table(path, name):
                path.unlink()
        for folder in [*checkpoints.glob("s*of*"), checkpoints]:
            rmdir_if_empty(folder)

    # -- signals ------------------------------------------------------------------------------

    def catch_signals(self) -> None:
        """SIGTERM/SIGINT: finish the chunk in flight, checkpoint, then stop (see Interrupted)."""
        def handler(signum, frame):
            self.stop_signal = signum
        self._handlers = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}

    def release_signals(self) -> None:
        """Give SIGTERM/SIGINT back to whoever had them (a notebook's kernel, say)."""
        for s, previous in getattr(self, "_handlers", {}).items():
            signal.signal(s, previous)
        self._handlers = {}

    # -- finished runs ------------------------------------------------------------------------

    def finished_parts(self) -> dict[Path, list[str]]:
        """{runs part: its run hashes} of every finished batch (every process's and shard's), each
        verified once when first seen: readable, jaxgrok's schema, the curves part beside it holding
        exactly the rows its runs should have. A damaged or incomplete pair is reported in one line
        and moved to parts/damaged/ (never deleted); its runs are then pending again."""
        for path in sorted(self.parts.glob("runs-*.parquet")):
            if path not in self._verified:
                try:
                    self._verified[path] = verify_part(path, curves_part(path))
                except DamagedPart as e:
                    _parts.set_aside(self.parts, path, str(e))
        return {p: h for p, h in self._verified.items() if p.exists()}

    def done_hashes(self) -> set[str]:
        """The run hashes of every finished run in the directory."""
        return {h for hashes in self.finished_parts().values() for h in hashes}

    def pending(self, index: np.ndarray) -> np.ndarray:
        """The runs of `index` (positions in the sweep) that the directory does not hold yet."""
        done = self.done_hashes()
        return np.array([i for i in index if self.hashes[i] not in done], dtype=np.int64)

    def write_batch(self, runs_table: pa.Table, curves_table: pa.Table, clear: bool = True, state=None) -> None:
        """Commit finished runs: their parts appear whole, then (`clear`: the batch is done) its
        checkpoints go. `state`: (run hashes, steps, leaves) of those that trained their whole budget."""
        runs_path = _parts.write_pair(self.parts, self.tag, runs_table, curves_table, state)
        self._verified[runs_path] = runs_table.column("run_hash").to_pylist()
        if clear:
            self.clear_checkpoints()

    # -- a raised budget (extend.py) --------------------------------------------------------------

    def carry_over(self, index: np.ndarray) -> tuple[int, dict[int, int]]:
        """Before planning: the runs of `index` that the directory holds at a smaller budget. Those
        that retired there are written as this sweep's runs (done); returns how many, and {run:
        evaluations done} of those that continue from their stored final state (see continuation).
        Done once per Store: a second call (the engine's plan, after the run's first lines) returns
        what the first found."""
        every = self.sweep.static.train.eval_every
        if hasattr(self, "_continued"):
            return 0, {r: e.steps // every for r, e in self._continued.items()}
        pending = set(self.pending(index).tolist())
        found = _extend.earlier(self.sweep, self.finished_parts(), pending)
        kept = {r: e for r, e in found.items() if e.stopped}
        if kept:
            _extend.carry_over(self.sweep, kept, lambda runs, curves: self.write_batch(runs, curves, clear=False))
        self._state_index = _states.index(self.parts) if found else {}
        self._continued = {r: e for r, e in found.items() if not e.stopped and e.old_hash in self._state_index}
        return len(kept), {r: e.steps // every for r, e in self._continued.items()}

    def continuation(self, rows, names: list[str], metrics: list[str]) -> dict:
        """{run: (its stored final state's leaves, its curves so far, evaluations done)} of those of
        `rows` that continue (carry_over); a state that does not read is left out."""
        wanted = set(np.asarray(rows).tolist())
        continued = {r: e for r, e in getattr(self, "_continued", {}).items() if r in wanted}
        if not continued:
            return {}
        return _extend.continuation(self.sweep, continued, self._state_index, names, metrics)

    # -- the batch in progress ----------------------------------------------------------------

    @property
    def manager(self):
        """The orbax CheckpointManager of this sweep's (or shard's) checkpoints."""
        return self.checkpoints.manager

    def save(self, state, curves, slots: list[tuple[str | None, int]]) -> None:
        """Checkpoint the batch in progress: its train state and curves so far (run-sharded global
        arrays: with several processes each writes its own shards) and the cursor: each slot's run
        (None: idle) and the steps it has done (not chunks: chunking may change before the resume),
        the batch size and the sweep as it was (to say what changed if it no longer matches)."""
        live = [(h, n) for h, n in slots if h is not None]
        self.checkpoints.save(state, curves, {"slots": [list(s) for s in slots], "run_hashes": [h for h, _ in live],
                                              "steps_done": live[0][1] if live else 0,
                                              "runs_per_batch": int(curves.shape[0]), "sweep": self.sweep.resolved})

    def restore(self, abstract):
        """The newest readable checkpoint as (state, curves, cursor), or None. `abstract` gives
        shapes and shardings."""
        return self.checkpoints.restore(abstract)

    def checkpointed_batch(self) -> dict | None:
        """The newest checkpoint's cursor (see save), or None if there is none that reads."""
        return self.checkpoints.cursor()

    def clear_checkpoints(self) -> None:
        """Delete the checkpoints of the batch in progress."""
        self.checkpoints.clear()

    # -- the final files ----------------------------------------------------------------------

    def merge(self) -> int:
        """Write DIR/runs.parquet and DIR/curves.parquet from the parts (see merge.merge); the
        number of runs merged."""
        return _merge.merge(self.out, sorted(self.finished_parts()), self.sweep)
