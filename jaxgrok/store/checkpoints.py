"""Orbax checkpoints of the batch in progress: its train state, its curves so far, and a cursor.

    DIR/checkpoints/<step>/          one sweep's (the processes of one sweep share it)
    DIR/checkpoints/sIofN/<step>/    shard I of N's

The cursor says which runs the arrays hold and how far they got (in steps, not chunks: chunking may
change before the resume), the batch size, and the sweep as it was (to say what changed).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import sys
from pathlib import Path

import jax


class WriteError(OSError):
    """A checkpoint that could not be written (a full disk, a read-only directory): one line."""


def _reason(error: Exception) -> str:
    """What went wrong in a failed orbax save, in a few words: the operating system's message where
    tensorstore gives its code (a full disk: "No space left on device"), else the error's first line."""
    if isinstance(error, OSError) and error.errno:
        return os.strerror(error.errno)
    text = str(error)
    if code := re.search(r"os_error_code='(\d+)'", text):
        return os.strerror(int(code.group(1)))
    if "No space left on device" in text:
        return os.strerror(errno.ENOSPC)
    return text.splitlines()[0][:160] if text else type(error).__name__


def _ignore_closed_loops(previous):
    """An unraisablehook that drops what tensorstore's write callbacks raise once orbax has closed the
    event loop of a failed save ("Event loop is closed", one traceback per pending write: the save's
    own error says what happened), and hands everything else on."""
    def hook(unraisable):
        if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
            previous(unraisable)
    hook.jaxgrok = True
    return hook


@contextlib.contextmanager
def _quiet_orbax():
    """Orbax's threads log a failed write (absl, at ERROR with its traceback), and the writes still
    pending fail after the save has raised (asyncio: "Future exception was never retrieved"). The
    save's error is said once, by the caller, in one line; after a failure the process is ending, so
    the two loggers stay quiet for its rest rather than print into the user's terminal behind it."""
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    yield
    for logger, level in zip(loggers, levels):  # only once the save succeeded
        logger.setLevel(level)


class Checkpoints:
    """The checkpoints in `directory`; orbax is imported and its manager made when first needed."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._manager = None

    @property
    def manager(self):
        """The orbax CheckpointManager (the two newest steps kept, saved synchronously)."""
        if self._manager is None:
            import orbax.checkpoint as ocp

            self._manager = ocp.CheckpointManager(self.directory.absolute(), options=ocp.CheckpointManagerOptions(
                max_to_keep=2, enable_async_checkpointing=False))
        return self._manager

    def save(self, state, curves, cursor: dict) -> None:
        """Checkpoint run-sharded global arrays (with several processes each writes its own shards):
        the train state and the curves so far, and the JSON `cursor`; WriteError if it fails."""
        import orbax.checkpoint as ocp

        step = (self.manager.latest_step() or 0) + 1
        state = state._replace(key=jax.random.key_data(state.key))  # typed keys: store their data
        if not getattr(sys.unraisablehook, "jaxgrok", False):
            sys.unraisablehook = _ignore_closed_loops(sys.unraisablehook)
        try:
            with _quiet_orbax():
                self.manager.save(step, args=ocp.args.Composite(
                    state=ocp.args.StandardSave({"state": state, "curves": curves}), cursor=ocp.args.JsonSave(cursor)))
                self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise their own kinds
            self._discard_unfinished(step)
            raise WriteError(f"{self.manager.directory}: could not write checkpoint {step}: {_reason(e)} (the runs "
                             f"finished so far are kept in parts/)") from None

    def _discard_unfinished(self, step: int) -> None:
        """Remove what a failed save of `step` left under orbax's temporary name: the next run never
        reads it (orbax lists finished steps only), and on a full disk it holds the space."""
        for tmp in Path(self.manager.directory).glob(f"{step}.orbax-checkpoint-tmp*"):
            shutil.rmtree(tmp, ignore_errors=True)

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
        """The newest readable checkpoint as (state, curves, cursor), or None. `abstract` gives
        shapes and shardings."""
        import orbax.checkpoint as ocp

        got = self._newest_readable(ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                       cursor=ocp.args.JsonRestore()), report=True)
        if got is None:
            return None
        state = got.state["state"]
        return state._replace(key=jax.random.wrap_key_data(state.key)), got.state["curves"], dict(got.cursor)

    def cursor(self) -> dict | None:
        """The newest checkpoint's cursor, or None if there is none that reads."""
        import orbax.checkpoint as ocp

        got = self._newest_readable(ocp.args.Composite(cursor=ocp.args.JsonRestore()), report=False)
        return None if got is None else dict(got.cursor)

    def clear(self) -> None:
        """Delete every checkpoint."""
        for step in self.manager.all_steps():
            self.manager.delete(step)
