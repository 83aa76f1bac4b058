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
import os
import shutil
import signal
import sys
from pathlib import Path

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jaxgrok import grokking, results


class Interrupted(Exception):
    """Training stopped on a signal after writing a checkpoint."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


class WriteError(OSError):
    """A checkpoint that could not be written (a full disk, a read-only directory): one line."""


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
        if not shard_tag and jax.process_count() == 1:  # alone in DIR (it is locked): no one else is writing
            for tmp in [*self.parts.glob(".*.tmp"), *self.out.glob(".*.parquet.*.tmp")]:
                tmp.unlink()  # a file a crash left half-written: never committed
        self._manager = None
        self._verified: dict[Path, list[str]] = {}  # runs part -> its run hashes

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
                    self._set_aside(path, str(e))
        return {p: h for p, h in self._verified.items() if p.exists()}

    def _set_aside(self, runs_path: Path, problem: str) -> None:
        damaged = self.parts / "damaged"
        damaged.mkdir(exist_ok=True)
        moved = []
        for f in (runs_path, curves_part(runs_path)):
            try:
                os.replace(f, damaged / f.name)
                moved.append(f.name)
            except FileNotFoundError:  # missing, or another process set it aside first
                pass
        if moved:
            print(f"jaxgrok: {runs_path}: {problem}; moved {' and '.join(moved)} to {damaged}/, "
                  f"its runs will be trained again", file=sys.stderr)

    def done_hashes(self) -> set[str]:
        return {h for hashes in self.finished_parts().values() for h in hashes}

    def pending(self, index: np.ndarray) -> np.ndarray:
        done = self.done_hashes()
        return np.array([i for i in index if self.hashes[i] not in done], dtype=np.int64)

    def write_batch(self, runs_table: pa.Table, curves_table: pa.Table) -> None:
        """Commit a finished batch: its parts appear whole, then its checkpoints go."""
        key = hashlib.sha256("".join(runs_table.column("run_hash").to_pylist()).encode()).hexdigest()[:16]
        prefix = f"{self.tag}-" if self.tag else ""
        # curves first: a runs part is what marks the batch done.
        results.write_atomic(curves_table, self.parts / f"curves-{prefix}{key}.parquet")
        runs_path = self.parts / f"runs-{prefix}{key}.parquet"
        results.write_atomic(runs_table, runs_path)
        self._verified[runs_path] = runs_table.column("run_hash").to_pylist()
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

    def save(self, state, curves, run_hashes: list[str], steps_done: int) -> None:
        """Checkpoint the batch in progress: its train state and curves so far (run-sharded global
        arrays: with several processes each writes its own shards) and the cursor: its runs, the
        steps they have done (not chunks: chunking may change before the resume), the batch size
        and the sweep as it was (to say what changed if it no longer matches)."""
        import orbax.checkpoint as ocp

        step = (self.manager.latest_step() or 0) + 1
        state = state._replace(key=jax.random.key_data(state.key))  # typed keys: store their data
        try:
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave({"state": state, "curves": curves}),
                cursor=ocp.args.JsonSave({"run_hashes": run_hashes, "steps_done": steps_done,
                                          "runs_per_batch": int(curves.shape[0]), "sweep": self.sweep.resolved})))
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise their own kinds
            raise WriteError(f"{self.manager.directory}: could not write a checkpoint "
                             f"({str(e).splitlines()[0][:160] if str(e) else type(e).__name__})") from None

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
        """The newest readable checkpoint as (state, curves, steps_done), or None. `abstract` gives
        shapes and shardings."""
        import orbax.checkpoint as ocp

        got = self._newest_readable(ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                       cursor=ocp.args.JsonRestore()), report=True)
        if got is None:
            return None
        state = got.state["state"]
        return state._replace(key=jax.random.wrap_key_data(state.key)), got.state["curves"], got.cursor["steps_done"]

    def checkpointed_batch(self) -> dict | None:
        """The newest checkpoint's cursor (see save), or None if there is none that reads."""
        import orbax.checkpoint as ocp

        got = self._newest_readable(ocp.args.Composite(cursor=ocp.args.JsonRestore()), report=False)
        return None if got is None else dict(got.cursor)

    def clear_checkpoints(self) -> None:
        for step in self.manager.all_steps():
            self.manager.delete(step)

    # -- the final files ----------------------------------------------------------------------

    def merge(self) -> int:
        """Write DIR/runs.parquet and DIR/curves.parquet from the parts, for the runs of the current
        sweep, with run_id = position in it, and their outcomes recomputed from their curves under
        the current [grokking] settings (a changed threshold retrains nothing). Returns the number
        of runs merged."""
        position = {h: i for i, h in enumerate(self.hashes)}
        parts = sorted(self.finished_parts())
        runs = [results.upgrade_runs(pq.read_table(p)) for p in parts]
        curves = [pq.read_table(curves_part(p)) for p in parts]
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
        runs_t = self._with_outcomes(runs_t, curves_t)
        results.write_pair(runs_t, curves_t, self.out, self.sweep.resolved)
        return runs_t.num_rows

    def _with_outcomes(self, runs: pa.Table, curves: pa.Table) -> pa.Table:
        """`runs` with t_train, t_val, delay, censored, phase and diverged computed from `curves`."""
        cfg = self.sweep.static.train
        steps = np.arange(1, cfg.steps // cfg.eval_every + 1, dtype=np.int64) * cfg.eval_every
        if curves.num_rows != runs.num_rows * len(steps):  # the parts were verified: cannot happen
            raise results.ResultsError(f"{self.parts}: {curves.num_rows} curve rows for {runs.num_rows} runs "
                                       f"of {len(steps)} evaluations")
        named = {m: curves.column(m).to_numpy().reshape(runs.num_rows, len(steps))
                 for m in ("train_acc", "val_acc", "train_loss", "val_loss")}
        for name, column in results.outcome_columns(grokking.analyse(named, steps, self.sweep.static.grokking)).items():
            runs = runs.set_column(runs.schema.get_field_index(name), name, column)
        return runs


class DamagedPart(Exception):
    """A part file that cannot be trusted: unreadable, not jaxgrok's, or not matching its pair."""


def curves_part(runs_path: Path) -> Path:
    """The curves part written with a runs part (the same key)."""
    return runs_path.with_name("curves-" + runs_path.name.removeprefix("runs-"))


def _read_part(path: Path, kind: str) -> pa.Table:
    if not path.exists():
        raise DamagedPart(f"its {kind} part {path.name} is missing")
    try:  # parts carry page checksums: garbage inside a readable file is caught too
        table = pq.read_table(path, page_checksum_verification=True)
    except (OSError, pa.ArrowException) as e:
        raise DamagedPart(f"{path.name} is unreadable ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") from None
    if (table.schema.metadata or {}).get(results.KIND_KEY) != kind.encode():
        raise DamagedPart(f"{path.name} is not a jaxgrok {kind} part")
    return table


def verify_part(runs_path: Path, curves_path: Path) -> list[str]:
    """The run hashes of a finished batch's pair of parts, once both are read in full and agree: the
    curves part holds every evaluation of every run of the runs part, and nothing else."""
    runs = _read_part(runs_path, "runs")
    try:
        runs = results.upgrade_runs(runs)
        train = results.sweep_config(runs)["train"]
        n_evals = int(train["steps"]) // int(train["eval_every"])
    except (KeyError, ValueError, TypeError, ZeroDivisionError, pa.ArrowException) as e:
        raise DamagedPart(f"{runs_path.name} does not have jaxgrok's runs columns and metadata ({e})") from None
    hashes = runs.column("run_hash").to_pylist()
    if not hashes or None in hashes or len(set(hashes)) != len(hashes):
        raise DamagedPart(f"{runs_path.name} has missing or repeated run hashes")
    curves = _read_part(curves_path, "curves")
    missing = [c for c in (*results.CURVES_SCHEMA.names, "run_hash") if c not in curves.column_names]
    if missing:
        raise DamagedPart(f"{curves_path.name} lacks the columns {', '.join(missing)}")
    if not results.every_evaluation(curves.column("run_hash").to_pylist(), hashes, n_evals):
        raise DamagedPart(f"{curves_path.name} holds {curves.num_rows} rows, not the {n_evals} evaluations "
                          f"of each of the {len(hashes)} runs of {runs_path.name}")
    return hashes


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

