"""The final train state of each run that trained its whole budget: what a larger budget continues.

    DIR/parts/state-<key>.npz   beside the runs and curves parts of the same runs (the same key)

One array per leaf of the run state (a typed PRNG key as its data), one row per run, and the runs'
hashes and budget. A zip member carries a CRC-32 that is checked when it is read, and the file is
written under a temporary name and renamed, so it is whole or absent; the runs part, written after it,
is what marks the runs done. A state that does not read, or whose leaves do not match the program's,
is said in one line and its runs train from step 0.
"""

from __future__ import annotations

import os
import sys
import zipfile
from pathlib import Path

import numpy as np

from jaxgrok import results


def path_for(runs_path: Path) -> Path:
    """The state file of a runs part."""
    return runs_path.with_name("state-" + runs_path.name.removeprefix("runs-").removesuffix(".parquet") + ".npz")


def write(path: Path, run_hashes: list[str], steps: int, leaves: dict[str, np.ndarray]) -> None:
    """Write the states of `run_hashes` (each leaf [runs, ...]) after `steps` steps, atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, __run_hash__=np.array(run_hashes), __steps__=np.array(steps), **leaves)
        os.replace(tmp, path)
    except OSError as e:
        raise results.named(e, path) from None
    finally:
        tmp.unlink(missing_ok=True)


def index(parts: Path) -> dict[str, tuple[Path, int, int]]:
    """run hash -> (its state file, its row there, the steps it had done), over every state file in
    `parts` (only the hashes are read here)."""
    found = {}
    for path in sorted(parts.glob("state-*.npz")):
        try:
            with np.load(path) as z:
                hashes, steps = z["__run_hash__"].tolist(), int(z["__steps__"])
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
            print(f"jaxgrok: {path}: unreadable ({type(e).__name__}); its runs continue from step 0 if extended",
                  file=sys.stderr)
            continue
        found |= {h: (path, row, steps) for row, h in enumerate(hashes)}
    return found


def read(path: Path, rows: list[int], names: list[str]) -> dict[str, np.ndarray] | None:
    """The leaves `names` of rows `rows` of a state file, every member's CRC checked; None (said in
    one line) where it does not read or lacks a leaf."""
    try:
        with np.load(path) as z:
            return {name: z[name][rows] for name in names}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        print(f"jaxgrok: {path}: unreadable or not of this program ({type(e).__name__}: {str(e)[:120]}); "
              f"its runs train from step 0", file=sys.stderr)
        return None
