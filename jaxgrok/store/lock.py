"""One `jaxgrok run` per results directory: an OS file lock (flock) that dies with its process, so
a killed run never leaves a stale lock behind.

    DIR/.lock           exclusive for a sweep; shared by the `--shard` jobs of one directory
    DIR/.lock-sIofN     exclusive for shard I of N

The processes of one `--distributed` sweep share the directory: process 0 holds the lock for all.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import sys
import time
from pathlib import Path


class InUse(Exception):
    """The results directory is held by another jaxgrok process; the message is one line."""


def _holder() -> str:
    command = " ".join(["jaxgrok", *sys.argv[1:]])[:200]
    return f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}: {command}"


def _held_by(path: Path) -> str:
    try:
        return path.read_text().strip() or "another jaxgrok process"
    except OSError:
        return "another jaxgrok process"


def _take(path: Path, exclusive: bool) -> int | None:
    """An fd holding `path` locked, None where the directory cannot be written (nothing to guard:
    a run that needs to write there fails on its first write, with its own line), or InUse."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return None
        raise
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise InUse(_describe(path)) from None
    if exclusive:  # who holds it, for the one who is turned away
        os.ftruncate(fd, 0)
        os.write(fd, _holder().encode())
    return fd


def _describe(path: Path) -> str:
    out = path.parent
    if path.name == ".lock":
        fd = os.open(path, os.O_RDONLY)
        try:  # held shared: by --shard jobs, who each wrote into their own lock file
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            held = [f"shard {p.name.removeprefix('.lock-')}: {_held_by(p)}" for p in sorted(out.glob(".lock-*")) if _is_held(p)]
            who = "; ".join(held) or "--shard jobs"
        except BlockingIOError:
            who = _held_by(path)
        finally:
            os.close(fd)
    else:
        who = _held_by(path)
    return f"{out} is in use by another jaxgrok run ({who}); wait for it to end, or give this one another --out"


def _is_held(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


@contextlib.contextmanager
def holding(out: str | Path, shard_tag: str = ""):
    """Hold the results directory `out` (created if need be) for the duration, or raise InUse."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fds = []
    try:
        fds.append(_take(out / ".lock", exclusive=not shard_tag))
        if shard_tag:
            fds.append(_take(out / f".lock-{shard_tag}", exclusive=True))
        yield
    finally:
        for fd in fds:
            if fd is not None:
                os.close(fd)  # closing the last fd on it releases a flock
