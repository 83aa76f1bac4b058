"""A results directory that can be trusted: a resume after the sweep file changed, outcomes after
[grokking] changed, damaged part files, two processes on one directory, read-only and full disks.
Sweeps run in-process through the CLI (8 simulated devices: one batch of the 6 tiny runs)."""

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import make_raw, write_raw

from jaxgrok import cli, engine, results
from jaxgrok.store import Interrupted, Store, lock
from jaxgrok.sweep import load_sweep


def sweep_file(tmp_path, name="sweep.toml", **train):
    # A fixed batch size: one compile, not the few that fitting a batch to memory takes.
    train = {"steps": 600, "eval_every": 50, "chunk_steps": 100, "max_runs_per_batch": 8, **train}
    return write_raw(tmp_path / name, make_raw(train=train))


def run(sweep, out, *extra):
    return cli.main(["run", str(sweep), "--out", str(out), "--no-analyze", "--quiet", *extra])


def tables(out):
    return pq.read_table(out / "runs.parquet"), pq.read_table(out / "curves.parquet")


def same(a, b):
    """Equal columns and rows (the metadata says which file they came from)."""
    return a[0].equals(b[0]) and a[1].equals(b[1])


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """The tiny sweep trained without interruption, with chunks of 100 and of 300 steps."""
    tmp = tmp_path_factory.mktemp("fresh")
    out = {}
    for chunk in (100, 300):
        assert run(sweep_file(tmp, f"c{chunk}.toml", chunk_steps=chunk), tmp / f"c{chunk}") == 0
        out[chunk] = tables(tmp / f"c{chunk}")
    return out


def interrupt(sweep_path, out, after: int = 1, overrides=()):
    """Train until `after` chunks are in, then stop as SIGTERM would: a checkpoint, then Interrupted."""
    sweep = load_sweep(sweep_path, overrides)
    store = Store(out, sweep, checkpoint_every=100)
    seen = []

    def on_chunk(progress):
        if progress.compiled_s is not None:  # compiling is done: not a chunk
            return
        seen.append(progress)
        if len(seen) == after:
            store.stop_signal = signal.SIGTERM

    with pytest.raises(Interrupted):
        engine.train_sweep(sweep, store=store, on_chunk=on_chunk)
    return store.checkpointed_batch()


# -- 1. resuming after the sweep file changed ---------------------------------------------------

def test_chunking_that_changed_between_kill_and_resume_gives_the_fresh_result(tmp_path, fresh):
    assert same(fresh[100], fresh[300])  # chunking decides nothing a run computes
    out = tmp_path / "out"
    cursor = interrupt(sweep_file(tmp_path), out)
    assert cursor["steps_done"] == 200  # counted in steps: 4 evaluations, 2 chunks of 100 steps
    # Chunks of 300 steps: the resume needs one 100-step chunk to reach the next boundary.
    assert run(sweep_file(tmp_path, chunk_steps=300), out) == 0
    got = tables(out)
    assert not any(got[1].column(m).is_nan().to_numpy().any() for m in ("train_loss", "val_acc"))
    assert same(got, fresh[300])


def test_a_checkpoint_of_runs_the_file_no_longer_has_is_refused_in_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    interrupt(sweep_file(tmp_path), out)
    listing = lambda: sorted(p.relative_to(out) for p in out.rglob("*") if p.name != ".lock")  # noqa: E731
    before = listing()
    assert run(sweep_file(tmp_path, steps=400), out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.steps: 600 → 400" in err and "--restart" in err
    assert listing() == before  # nothing touched
    assert run(sweep_file(tmp_path, steps=400), out, "--restart") == 0


def test_a_checkpoint_of_another_batch_size_is_said_and_its_runs_start_again(tmp_path, capsys):
    out, sixteen = tmp_path / "out", "sweep.seed={count=8}"  # 16 runs: two batches of 8, or one of 16
    interrupt(sweep_file(tmp_path), out, overrides=[sixteen])
    assert run(sweep_file(tmp_path, max_runs_per_batch=16), out, "--set", sixteen) == 0
    assert "a batch of 8 runs and batches are now of 16; its 8 runs train again from step 0" in capsys.readouterr().err
    assert run(sweep_file(tmp_path, max_runs_per_batch=16), tmp_path / "fresh", "--set", sixteen) == 0
    assert same(tables(out), tables(tmp_path / "fresh"))


# -- 2. outcomes follow [grokking] --------------------------------------------------------------

def test_a_changed_threshold_recomputes_outcomes_from_the_stored_curves(tmp_path, capsys, fresh):
    out, raw = tmp_path / "out", make_raw(train={"steps": 600, "eval_every": 50, "chunk_steps": 100, "max_runs_per_batch": 8})
    assert run(write_raw(tmp_path / "a.toml", raw), out) == 0
    raw["grokking"] = {"threshold": 0.02, "phase_accuracy": 0.02}  # below chance (1/31): validation reaches it
    changed = write_raw(tmp_path / "b.toml", raw)
    capsys.readouterr()
    assert run(changed, out, "--set", "train.chunk_steps=100") == 0
    assert "trained 0 more" in capsys.readouterr().out  # nothing retrained
    assert run(changed, tmp_path / "fresh") == 0
    outcomes = ["t_train", "t_val", "delay", "censored", "phase"]
    got, want = tables(out)[0], tables(tmp_path / "fresh")[0]
    assert got.select(outcomes).equals(want.select(outcomes))
    assert not got.select(outcomes).equals(fresh[100][0].select(outcomes))  # they did change
    assert results.sweep_config(got)["grokking"]["threshold"] == 0.02


# -- 3. damaged part files ----------------------------------------------------------------------

def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garble(path):  # bytes inside the first column's pages: the file still opens
    data = bytearray(path.read_bytes())
    data[40:48] = b"\x5a" * 8
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind,damage", [
    ("runs", _truncate), ("runs", lambda p: p.write_bytes(b"")), ("curves", _garble), ("curves", os.remove),
    ("curves", lambda p: pq.write_table(pq.read_table(p).slice(0, 5), p)),  # a readable part with rows missing
])
def test_a_damaged_part_is_set_aside_and_its_runs_trained_again(tmp_path, capsys, fresh, kind, damage):
    sweep, out = sweep_file(tmp_path), tmp_path / "out"
    assert run(sweep, out) == 0
    part = next((out / "parts").glob(f"{kind}-*.parquet"))
    damage(part)
    capsys.readouterr()
    assert run(sweep, out) == 0
    err = capsys.readouterr().err
    assert f"parts/runs-{part.name.split('-', 1)[1]}" in err and "damaged" in err and "trained again" in err
    assert same(tables(out), fresh[100])
    if kind != "curves" or damage is not os.remove:
        assert (out / "parts" / "damaged" / part.name).exists()  # set aside, not deleted


# -- 4. one run per directory -------------------------------------------------------------------

def test_a_second_run_into_a_held_directory_is_turned_away_naming_the_holder(tmp_path, capsys):
    sweep, out = sweep_file(tmp_path), tmp_path / "out"
    with lock.holding(out):
        assert run(sweep, out) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"pid {os.getpid()}" in err and "in use" in err
    # Shards of one directory share it; the same shard twice does not.
    with lock.holding(out, "s0of2"), lock.holding(out, "s1of2"):
        with pytest.raises(lock.InUse):
            with lock.holding(out, "s0of2"):
                pass
        with pytest.raises(lock.InUse, match="s0of2|--shard"):
            with lock.holding(out):
                pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "out"
    code = f"from jaxgrok.store import lock; import time\nwith lock.holding({str(out)!r}):\n    print('held', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(lock.InUse, match=f"pid {proc.pid}"):
        with lock.holding(out):
            pass
    proc.kill()
    proc.wait()
    with lock.holding(out):  # the kernel released it with the process
        pass


# -- 5. full disks and read-only directories ----------------------------------------------------

def _failing_writes(monkeypatch, err, only=""):
    real = pq.write_table

    def write_table(table, where, *args, **kwargs):
        if only in str(where):  # as pyarrow says it: the errno, and no file named
            raise OSError(err, f"Error writing bytes to file. Detail: [errno {err}] {os.strerror(err)}")
        return real(table, where, *args, **kwargs)

    monkeypatch.setattr(pq, "write_table", write_table)


def test_a_full_disk_at_the_merge_keeps_the_published_pair_and_every_trained_run(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert run(sweep_file(tmp_path), out) == 0
    before = tables(out)
    _failing_writes(monkeypatch, errno.ENOSPC, only="curves.parquet")
    assert run(sweep_file(tmp_path), out, "--set", "sweep.seed={count=4}") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "curves.parquet" in err and "No space left on device" in err
    assert same(tables(out), before)  # the old pair, whole
    results.check_pair(out / "runs.parquet", out / "curves.parquet")
    monkeypatch.undo()
    capsys.readouterr()
    assert run(sweep_file(tmp_path), out, "--set", "sweep.seed={count=4}") == 0
    assert "8 runs were already done" in capsys.readouterr().out  # nothing trained is lost


def test_a_finished_sweep_reads_on_a_read_only_directory(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert run(sweep_file(tmp_path), out) == 0
    _failing_writes(monkeypatch, errno.EROFS)  # as root, chmod would not stop a write
    assert run(sweep_file(tmp_path), out) == 0  # nothing to train, nothing to write
    assert cli.main(["analyze", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Read-only file system" in err[0] and "writes stats.parquet" in err[0]


def test_a_mismatched_pair_is_refused_by_the_analysis(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(sweep_file(tmp_path), a) == 0
    assert run(sweep_file(tmp_path), b, "--set", "sweep.seed=[5]") == 0
    os.replace(b / "curves.parquet", a / "curves.parquet")
    assert cli.main(["analyze", str(a)]) == 2
    assert "from another merge" in capsys.readouterr().err


@pytest.mark.parametrize("meta", [b"{not json", b'{"name": "x"}', b"[1, 2]"])
def test_bad_metadata_in_a_results_file_gets_one_line(tmp_path, capsys, meta):
    out = tmp_path / "out"
    assert run(sweep_file(tmp_path), out) == 0
    table = pq.read_table(out / "runs.parquet")
    pq.write_table(table.replace_schema_metadata({**table.schema.metadata, b"jaxgrok.sweep": meta}), out / "runs.parquet")
    assert cli.main(["analyze", str(out)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (out / "stats.parquet").exists()  # nothing written from a bad input
    pq.write_table(table.drop_columns(["t_val"]), out / "runs.parquet")
    assert cli.main(["analyze", str(out)]) == 2
    assert "t_val" in capsys.readouterr().err


def test_a_batch_that_does_not_fit_leaves_no_directory(tmp_path, capsys, monkeypatch):
    # Passes the analytic check (one run's least bytes, 340 KiB) but not what XLA says the compiled
    # program needs (1.4 MiB), which is known only once the directory is held.
    monkeypatch.setenv("JAXGROK_MEMORY_BUDGET", "360000")
    out = tmp_path / "out"
    assert run(sweep_file(tmp_path, max_runs_per_batch=0), out) == 2
    assert "one run needs 1.4 MiB of device memory" in capsys.readouterr().err
    assert not out.exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs, smaller than one checkpoint of the tiny batch (mounting one needs root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root (the injected full disk below runs everywhere)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_full_disk_while_orbax_writes_a_checkpoint_is_one_line(small_disk, fresh):
    # A process of its own: orbax's threads log through absl, and tensorstore's callbacks raise into
    # sys.unraisablehook, which pytest would catch.
    out, sweep = small_disk / "out", sweep_file(small_disk.parent)
    command = [sys.executable, "-m", "jaxgrok", "run", str(sweep), "--out", str(out), "--no-analyze", "--quiet",
               "--checkpoint-every", "1"]
    failed = subprocess.run(command, capture_output=True, text=True)
    err = failed.stderr.strip().splitlines()
    assert failed.returncode == 1
    assert len(err) == 1 and f"{out / 'checkpoints'}: could not write checkpoint 1: No space left on device" in err[0], err[:4]
    assert not list((out / "checkpoints").glob("*tmp*"))  # the half-written step is gone, and its space
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    assert subprocess.run(command, capture_output=True).returncode == 0  # the same command, space freed
    assert same(tables(out), fresh[100])


def test_an_injected_full_disk_in_the_checkpoint_writer(tmp_path, capfd, monkeypatch, fresh):
    import orbax.checkpoint as ocp

    def save(self, step, *args, **kwargs):  # what tensorstore says, after orbax began the step
        (Path(self.directory) / f"{step}.orbax-checkpoint-tmp-0").mkdir(parents=True)
        raise ValueError('RESOURCE_EXHAUSTED: Error writing "state.params.w1/1.0.0" in OCDBT database: Failed to '
                         "write 143864 bytes to file 18: No space left on device [os_error_code='28']")

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    out = tmp_path / "out"
    assert run(sweep_file(tmp_path), out, "--checkpoint-every", "1") == 1
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could not write checkpoint 1: No space left on device" in err[0], err
    assert not list((out / "checkpoints").glob("*tmp*"))
    monkeypatch.undo()
    assert run(sweep_file(tmp_path), out, "--checkpoint-every", "1") == 0
    assert same(tables(out), fresh[100])
