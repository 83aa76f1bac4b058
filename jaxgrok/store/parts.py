"""Part files: one pair per finished batch, written whole, verified once when first read.

    DIR/parts/runs-<key>.parquet, curves-<key>.parquet   one pair per finished batch (atomic)
    DIR/parts/damaged/                                    pairs that could not be trusted, set aside

The runs part is written last: its presence is what marks a batch done.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from jaxgrok import measures, results
from jaxgrok.store import states


class DamagedPart(Exception):
    """A part file that cannot be trusted: unreadable, not jaxgrok's, or not matching its pair."""


def curves_part(runs_path: Path) -> Path:
    """The curves part written with a runs part (the same key)."""
    return runs_path.with_name("curves-" + runs_path.name.removeprefix("runs-"))


def write_pair(parts: Path, tag: str, runs_table: pa.Table, curves_table: pa.Table, state=None) -> Path:
    """Write a finished batch's pair of parts into `parts`, named by its runs (and `tag`, this
    process's or shard's name), each atomically; the path of its runs part. `state`: (run hashes,
    steps, leaves), the final train states of the runs that trained their whole budget (states.py)."""
    key = hashlib.sha256("".join(runs_table.column("run_hash").to_pylist()).encode()).hexdigest()[:16]
    prefix = f"{tag}-" if tag else ""
    runs_path = parts / f"runs-{prefix}{key}.parquet"
    if state is not None:  # before the runs part, which marks the batch done
        states.write(states.path_for(runs_path), *state)
    # curves first: a runs part is what marks the batch done.
    results.write_atomic(curves_table, parts / f"curves-{prefix}{key}.parquet")
    results.write_atomic(runs_table, runs_path)
    return runs_path


def set_aside(parts: Path, runs_path: Path, problem: str) -> None:
    """Move a damaged pair to parts/damaged/ (never deleted) and say so in one line."""
    damaged = parts / "damaged"
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
    curves part holds every evaluation of every run of the runs part (to its stopped_at where it
    retired), and nothing else."""
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
    missing = [c for c in (*results.CURVES_SCHEMA.names, "run_hash") if c not in curves.column_names
               and c not in measures.LATER_COLUMNS]  # a part written before a later measure lacks its columns
    if missing:
        raise DamagedPart(f"{curves_path.name} lacks the columns {', '.join(missing)}")
    counts = results.evaluations(runs.column("stopped_at"), int(train["steps"]), int(train["eval_every"]))
    if not results.every_evaluation(curves.column("run_hash").to_pylist(), hashes, counts):
        raise DamagedPart(f"{curves_path.name} holds {curves.num_rows} rows, not the {counts.sum()} evaluations "
                          f"of the {len(hashes)} runs of {runs_path.name} (each its budget's {n_evals} or to its stopped_at)")
    return hashes


def is_jaxgrok_table(path: Path, kind: str) -> bool:
    """Whether `path` is a Parquet file that jaxgrok wrote as a `kind` table."""
    try:
        return (pq.read_schema(path).metadata or {}).get(results.KIND_KEY) == kind.encode()
    except (OSError, pa.ArrowException):
        return False


def rmdir_if_empty(folder: Path) -> None:
    """Remove `folder` if it is a directory with nothing in it."""
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
