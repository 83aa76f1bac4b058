"""Orbax checkpoints of the batch in progress: its train state, its curves so far, and a cursor.

    DIR/checkpoints/<step>/          one sweep's (the processes of one sweep share it)
    DIR/checkpoints/sIofN/<step>/    shard I of N's

The cursor says which runs the arrays hold and how far they got (in steps, not chunks: chunking may
change before the resume), the batch size, and the sweep as it was (to say what changed).
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax


class WriteError(OSError):
    """A checkpoint that could not be written (a full disk, a read-only directory): one line."""


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
        try:
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave({"state": state, "curves": curves}), cursor=ocp.args.JsonSave(cursor)))
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

    def cursor(self) -> dict | None:
        """The newest checkpoint's cursor, or None if there is none that reads."""
        import orbax.checkpoint as ocp

        got = self._newest_readable(ocp.args.Composite(cursor=ocp.args.JsonRestore()), report=False)
        return None if got is None else dict(got.cursor)

    def clear(self) -> None:
        """Delete every checkpoint."""
        for step in self.manager.all_steps():
            self.manager.delete(step)
