"""Parquet output: runs.parquet (one row per run) and curves.parquet (one row per run and step).

Fixed pyarrow schemas; the resolved sweep and the package versions ride in the schema metadata.
Every file is written under a temporary name and renamed, so it appears whole or not at all.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jaxgrok import measures
from jaxgrok.grokking import PHASES
from jaxgrok.sweep import AXES
from jaxgrok.sweep.axes import COLUMNS as AXIS_COLUMNS

RUNS_SCHEMA = pa.schema([
    ("run_id", pa.int32()),
    ("run_hash", pa.string()),
    *((a.name, pa.int64() if a.is_int else pa.float64()) for a in AXIS_COLUMNS),  # one per axis (sweep/axes.py)
    ("n_train", pa.int32()),
    ("steps", pa.int64()),
    # Where a retired run's curves end ([train] stop_after_grokking: it stayed grokked long enough,
    # or diverged); null: it trained its whole budget.
    ("stopped_at", pa.int64()),
    ("precision", pa.string()),  # [train] precision: float32, tf32 or bfloat16
    ("t_train", pa.int64()),  # null: never memorised
    ("t_val", pa.int64()),  # null: censored
    ("delay", pa.int64()),
    ("censored", pa.bool_()),
    ("phase", pa.string()),
    ("diverged", pa.bool_()),
    ("final_train_loss", pa.float32()),
    ("final_train_acc", pa.float32()),
    ("final_val_loss", pa.float32()),
    ("final_val_acc", pa.float32()),
    ("final_weight_norm", pa.float32()),
    ("key_freqs", pa.list_(pa.int32())),  # null: Fourier measures off or not applicable
    # The lottery ticket: the share of the step-0 embedding's non-constant energy in the run's final key
    # frequencies, and that share's expectation for a random embedding (key frequencies / K).
    ("init_key_share", pa.float32()),
    ("init_key_share_random", pa.float32()),
])
LATER_RUNS_COLUMNS = ("init_key_share", "init_key_share_random", "stopped_at")  # null in tables written before them

# One row per run and evaluation; the columns after the step are declared in jaxgrok/measures (the
# progress measures null where off, not applicable, or not evaluated then).
CURVES_SCHEMA = pa.schema([("run_id", pa.int32()), ("step", pa.int64())] + [
    (col.name, pa.int32() if col.integer else pa.float32()) for col in measures.TRAINING + measures.MEASURE_COLUMNS])
MEASURE_COLUMNS = measures.COLUMNS

KIND_KEY = b"jaxgrok.kind"
PAIR_KEY = b"jaxgrok.pair"  # the same in the runs.parquet and curves.parquet of one merge


def versions() -> dict[str, str]:
    """The versions of jaxgrok, JAX, jaxlib and Python, as the files' metadata records them."""
    out = {"python": platform.python_version()}
    for pkg in ("jaxgrok", "jax", "jaxlib", "flax", "optax", "numpy", "pyarrow"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def metadata(kind: str, resolved: dict) -> dict[bytes, bytes]:
    """A Parquet file's jaxgrok metadata: its kind, the resolved sweep, the versions, and (runs) how
    t_val is defined."""
    out = {
        KIND_KEY: kind.encode(),
        b"jaxgrok.sweep": json.dumps(resolved, sort_keys=True).encode(),
        b"jaxgrok.versions": json.dumps(versions(), sort_keys=True).encode(),
    }
    if kind == "runs":
        window = resolved.get("train", {}).get("stop_after_grokking", 0)
        out[b"jaxgrok.t_val"] = (f"the first evaluated step from which val_acc stays >= "
                                 f"{resolved.get('grokking', {}).get('threshold', 0.99)} to the run's end"
                                 + (f" (stopped_at, for a run retired {window} steps after it)" if window else "")).encode()
    return out


def _nullable(x: np.ndarray, typ) -> pa.Array:
    """A float array as a column of `typ` with null where it is not finite (never reached, not
    measured): a missing value is never written as a number."""
    x = np.asarray(x, np.float64)
    values = np.nan_to_num(x, nan=0, posinf=0, neginf=0).astype(typ.to_pandas_dtype())
    return pa.array(values, typ, mask=~np.isfinite(x))


def upgrade_runs(table: pa.Table) -> pa.Table:
    """A runs table written before the later axes existed, with them at the values its runs had:
    their defaults (the [train] key of its metadata for an axis that is one), the minibatch order of
    the model seed, float32. Such runs keep their run hash."""
    from jaxgrok.sweep import LATER_AXES, LATER_TRAIN
    from jaxgrok.sweep.axes import BY_NAME

    n = table.num_rows
    meta = table.schema.metadata or {}
    train = json.loads(meta[b"jaxgrok.sweep"]).get("train", {}) if b"jaxgrok.sweep" in meta else {}
    if "precision" not in table.column_names:
        table = table.append_column("precision", pa.array([LATER_TRAIN["precision"]] * n, pa.string()))
    if "batch_seed" not in table.column_names:
        table = table.append_column("batch_seed", table.column("seed"))
    for axis, default in LATER_AXES.items():
        if axis not in table.column_names:
            value = train.get(axis, default) if BY_NAME[axis].train_key else default
            table = table.append_column(axis, pa.array(np.full(n, value), RUNS_SCHEMA.field(axis).type))
    for name in LATER_RUNS_COLUMNS:
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(n, RUNS_SCHEMA.field(name).type))
    return table.select(RUNS_SCHEMA.names)


def upgrade_curves(table: pa.Table) -> pa.Table:
    """A curves table written before a later measure existed, with its columns null (it was off)."""
    for name in measures.LATER_COLUMNS:
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, CURVES_SCHEMA.field(name).type))
    return table


def outcome_columns(outcomes: dict[str, np.ndarray]) -> dict[str, pa.Array]:
    """The runs table's columns that grokking.analyse() computes from the curves."""
    return {
        "t_train": _nullable(outcomes["t_train"], pa.int64()),
        "t_val": _nullable(outcomes["t_val"], pa.int64()),
        "delay": _nullable(outcomes["delay"], pa.int64()),
        "censored": pa.array(outcomes["censored"], pa.bool_()),
        "phase": pa.array(outcomes["phase"].astype(str), pa.string()),
        "diverged": pa.array(outcomes["diverged"], pa.bool_()),
    }


def runs_table(sweep, index, outcomes, finals, key_freqs=None, ticket=None, stopped_at=None) -> pa.Table:
    """One row per run. `index`: the runs' positions in the sweep; `outcomes`: grokking.analyse();
    `finals`: the last evaluation's metrics, name -> [runs]; `key_freqs`: a list per run, or None;
    `ticket`: (init_key_share, its random expectation) per run, or None; `stopped_at`: the step a
    retired run's curves end at, NaN where it trained its whole budget (None: none retired)."""
    share, random_share = ticket if ticket is not None else (np.full(len(index), np.nan),) * 2
    stopped_at = np.full(len(index), np.nan) if stopped_at is None else stopped_at
    cols = {
        "run_id": pa.array(index, pa.int32()),
        "run_hash": pa.array([sweep.run_hashes[i] for i in index], pa.string()),
        **{a: pa.array(sweep.runs[a][index], RUNS_SCHEMA.field(a).type) for a in AXES},
        "n_train": pa.array(sweep.n_train[index], pa.int32()),
        "steps": pa.array(np.full(len(index), sweep.static.train.steps), pa.int64()),
        "stopped_at": _nullable(stopped_at, pa.int64()),
        "precision": pa.array([sweep.static.train.precision] * len(index), pa.string()),
        **outcome_columns(outcomes),
        **{f"final_{m}": pa.array(finals[m], pa.float32()) for m in
           ("train_loss", "train_acc", "val_loss", "val_acc", "weight_norm")},
        "key_freqs": pa.array(key_freqs if key_freqs is not None else [None] * len(index), pa.list_(pa.int32())),
        "init_key_share": _nullable(share, pa.float32()),
        "init_key_share_random": _nullable(random_share, pa.float32()),
    }
    return pa.Table.from_pydict(cols, schema=RUNS_SCHEMA.with_metadata(metadata("runs", sweep.resolved)))


def curves_table(index, steps, curves: dict[str, np.ndarray], resolved, run_hashes=None, ends=None) -> pa.Table:
    """Long format: one row per (run, evaluated step). `curves`: metric -> [runs, evals]; `ends`:
    the evaluations each run has (a retired run's end early; None: all). With `run_hashes` (the
    part files of a resumable sweep) a run_hash column is added."""
    n_runs, n_evals = len(index), len(steps)
    ends = np.full(n_runs, n_evals) if ends is None else np.asarray(ends)
    kept = (np.arange(n_evals) < ends[:, None]).reshape(-1)
    flat = lambda a: np.asarray(a).reshape(-1)[kept]  # noqa: E731
    cols = {
        "run_id": pa.array(flat(np.repeat(np.asarray(index, np.int32), n_evals)), pa.int32()),
        "step": pa.array(flat(np.tile(np.asarray(steps, np.int64), n_runs)), pa.int64()),
        **{m: pa.array(flat(curves[m]), pa.float32()) for m in CURVES_SCHEMA.names[2:7]},
        # A measure that was not taken is NaN in the program and null here.
        **{m: _nullable(flat(curves[m]), CURVES_SCHEMA.field(m).type) for m in MEASURE_COLUMNS},
    }
    schema = CURVES_SCHEMA
    if run_hashes is not None:
        cols["run_hash"] = pa.array(flat(np.repeat(np.asarray(run_hashes, object), n_evals)), pa.string())
        schema = schema.append(pa.field("run_hash", pa.string()))
    return pa.Table.from_pydict(cols, schema=schema.with_metadata(metadata("curves", resolved)))


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def named(error: OSError, path: Path) -> OSError:
    """`error` with the file it concerns: pyarrow's failed writes say "[errno 28] No space left on
    device" and name no file."""
    if error.filename:
        return error
    return OSError(error.errno, os.strerror(error.errno) if error.errno else str(error), str(path))


def write_atomic(table: pa.Table, path: str | Path) -> None:
    """Write under a temporary name in the same directory, then rename: whole or not at all. Pages
    carry checksums, so a file damaged later is caught when read (page_checksum_verification)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    try:
        pq.write_table(table, tmp, write_page_checksum=True)
        os.replace(tmp, path)
    except OSError as e:
        raise named(e, path) from None
    finally:
        tmp.unlink(missing_ok=True)


def pair_id(path: str | Path) -> bytes | None:
    """The merge that wrote runs.parquet or curves.parquet (None: unreadable, or written before
    pairs were marked)."""
    try:
        return (pq.read_schema(path).metadata or {}).get(PAIR_KEY)
    except (OSError, pa.ArrowException):
        return None


def write_pair(runs: pa.Table, curves: pa.Table, out: str | Path, resolved: dict) -> bool:
    """Publish DIR/runs.parquet and DIR/curves.parquet as a pair: both are written in full under
    temporary names before either is renamed, and both carry one pair id (readers check it), so a
    failure or a kill never leaves a runs table beside the curves of another merge. Files that
    already hold exactly this pair are left alone (a finished sweep re-run on a read-only
    directory writes nothing). Returns whether anything was written."""
    out = Path(out)
    blob = pa.BufferOutputStream()
    with pa.ipc.new_stream(blob, runs.schema) as writer:
        writer.write_table(runs)
    pair = hashlib.sha256(blob.getvalue().to_pybytes() + json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:16]
    paths = {"runs": out / "runs.parquet", "curves": out / "curves.parquet"}
    if all(pair_id(p) == pair.encode() for p in paths.values()):
        return False
    tables = {"runs": runs, "curves": curves}
    tmps = {k: _tmp(p) for k, p in paths.items()}
    try:
        for kind, table in tables.items():
            meta = {**metadata(kind, resolved), PAIR_KEY: pair.encode()}
            try:
                pq.write_table(table.replace_schema_metadata(meta), tmps[kind], write_page_checksum=True)
            except OSError as e:
                raise named(e, paths[kind]) from None
        for kind in tables:
            os.replace(tmps[kind], paths[kind])
    finally:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
    return True


class ResultsError(ValueError):
    """A results directory that is not jaxgrok's."""


def read(path: str | Path, kind: str) -> pa.Table:
    """Read runs.parquet or curves.parquet, checking that jaxgrok wrote it: its kind, its sweep
    metadata (a valid sweep) and its columns. Every problem is one ResultsError line."""
    from jaxgrok.sweep import LATER_AXES, SweepError, sweep_from_dict

    path = Path(path)
    if not path.exists():
        raise ResultsError(f"{path}: no such file")
    try:
        table = pq.read_table(path, page_checksum_verification=True)
    except (pa.ArrowException, OSError) as e:
        raise ResultsError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0][:160] if str(e) else type(e).__name__})") from None
    meta = table.schema.metadata or {}
    if meta.get(KIND_KEY) != kind.encode():
        raise ResultsError(f"{path}: not a jaxgrok {kind} table (no {KIND_KEY.decode()}={kind} in its metadata)")
    try:
        resolved = json.loads(meta[b"jaxgrok.sweep"])
        sweep_from_dict(resolved, f"{path}: metadata jaxgrok.sweep")
    except KeyError:
        raise ResultsError(f"{path}: no jaxgrok.sweep in its metadata") from None
    except (ValueError, TypeError, AttributeError) as e:  # invalid JSON, or not a sweep
        message = str(e) if isinstance(e, SweepError) else f"{path}: metadata jaxgrok.sweep is not a sweep ({e})"
        raise ResultsError(message) from None
    later = {"precision", "batch_seed", *LATER_AXES, *LATER_RUNS_COLUMNS}  # upgrade_runs adds them to older tables
    needed = {"runs": [n for n in RUNS_SCHEMA.names if n not in later], "curves": CURVES_SCHEMA.names[:7]}.get(kind, [])
    if missing := [n for n in needed if n not in table.column_names]:
        raise ResultsError(f"{path}: missing the columns {', '.join(missing)}")
    schema = RUNS_SCHEMA if kind == "runs" else CURVES_SCHEMA
    present_later = [n for n in later if n in table.column_names and n in schema.names]  # checked where they are
    for name in needed + present_later:
        if (got := table.schema.field(name).type) != (want := schema.field(name).type):
            raise ResultsError(f"{path}: column {name} is {got}, expected {want}")
    if kind == "runs" and (unknown := set(table.column("phase").to_pylist()) - set(PHASES)):
        raise ResultsError(f"{path}: column phase holds {sorted(map(str, unknown))[0]!r}, not one of {', '.join(PHASES)}")
    return table


def evaluations(stopped_at, steps: int, eval_every: int) -> np.ndarray:
    """The evaluations each run has: to its stopped_at (an array or column, null or NaN where it
    trained its whole budget), or all `steps // eval_every` of them."""
    if not isinstance(stopped_at, np.ndarray):  # a pyarrow column
        stopped_at = stopped_at.cast(pa.float64()).fill_null(np.nan).to_numpy()
    stopped = np.asarray(stopped_at, np.float64)
    return np.where(np.isfinite(stopped), np.nan_to_num(stopped) // eval_every, steps // eval_every).astype(np.int64)


def every_evaluation(curve_keys: list, run_keys: list, n_evals) -> bool:
    """Whether a curves table's run keys (hashes or ids, one per row) hold exactly `n_evals` rows (one
    count, or one per run) for each run of `run_keys`, and nothing else."""
    counts = np.broadcast_to(np.asarray(n_evals), (len(run_keys),))
    return Counter(curve_keys) == {k: int(c) for k, c in zip(run_keys, counts, strict=True)}


def check_pair(runs_path: str | Path, curves_path: str | Path) -> None:
    """runs.parquet and curves.parquet must come from one merge (where both say which)."""
    a, b = pair_id(runs_path), pair_id(curves_path)
    if a is not None and b is not None and a != b:
        raise ResultsError(f"{curves_path}: from another merge than {Path(runs_path).name} (a write was interrupted); "
                           f"run the sweep again to rewrite both")


def sweep_config(table: pa.Table) -> dict:
    """The resolved sweep a runs table was written under, from its metadata."""
    return json.loads(table.schema.metadata[b"jaxgrok.sweep"])


def dense(values: np.ndarray, ends: np.ndarray, n_evals: int) -> np.ndarray:
    """[runs, n_evals] from one curve's rows sorted by run and step, run i holding `ends[i]` of them
    (NaN past a retired run's end)."""
    out = np.full((len(ends), n_evals), np.nan)
    out[np.arange(n_evals) < np.asarray(ends)[:, None]] = np.asarray(values, np.float64)
    return out
