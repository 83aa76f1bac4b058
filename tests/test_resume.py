"""Sweeps that survive being killed: resume, checkpoints, extension. Each sweep runs as a subprocess."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import write_sweep

ENV = {**os.environ, "JAX_NUM_CPU_DEVICES": "2", "PYTHONUNBUFFERED": "1"}


def sweep_file(tmp_path, seeds=10):
    """10 runs × 1,200 steps in 12 chunks, batches of 4: three batches."""
    return write_sweep(tmp_path / f"sweep{seeds}.toml", name="resumable",
                       train={"steps": 1200, "eval_every": 50, "chunk_steps": 100, "max_runs_per_batch": 4},
                       sweep={"seed": {"count": seeds}, "weight_decay": 1.0, "learning_rate": 1e-2,
                              "train_fraction": 0.5})


def start(sweep, out, *extra):
    cmd = [sys.executable, "-m", "jaxgrok", "run", str(sweep), "--out", str(out), "--no-analyze",
           "--checkpoint-every", "1", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def finish(sweep, out, *extra):
    proc = start(sweep, out, *extra)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    return stdout, stderr


def wait_for_training(proc, deadline=120):
    """Block until the process has printed its first progress line (it is inside a batch)."""
    t0 = time.time()
    for line in proc.stdout:
        if "model-steps" in line or time.time() - t0 > deadline:
            return


def tables(out: Path):
    return pq.read_table(out / "runs.parquet"), pq.read_table(out / "curves.parquet")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    finish(sweep_file(tmp), tmp / "out")
    return tables(tmp / "out")


def assert_same(out, reference, same_sweep=True):
    runs, curves = tables(out)
    assert runs.equals(reference[0]) and curves.equals(reference[1])
    if same_sweep:  # the metadata holds the resolved sweep, batch size included
        assert runs.schema.metadata == reference[0].schema.metadata
    assert runs.column("run_id").to_pylist() == list(range(10))  # none missing, none twice
    assert curves.num_rows == 10 * 24


def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path, reference):
    sweep, out = sweep_file(tmp_path), tmp_path / "out"
    rng = random.Random(0)
    for _ in range(3):
        proc = start(sweep, out)
        wait_for_training(proc)
        time.sleep(rng.uniform(0.0, 2.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finish(sweep, out)
    assert_same(out, reference)


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path, reference):
    sweep, out = sweep_file(tmp_path), tmp_path / "out"
    proc = start(sweep, out)
    wait_for_training(proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "checkpoint written" in stderr and "Traceback" not in stderr
    assert list((out / "checkpoints").iterdir())  # a usable checkpoint is there...
    stdout, _ = finish(sweep, out)
    assert_same(out, reference)  # ...and the sweep finishes from it, unchanged


class Killed(BaseException):
    """Stands in for a SIGKILL at one exact moment."""


def test_killed_between_committing_a_batch_and_clearing_its_checkpoint(tmp_path, monkeypatch):
    """The parts of a batch are written, its checkpoint is not yet deleted: the next run sees a
    checkpoint of finished runs, drops it, and finishes as an uninterrupted sweep (CI once caught
    this window by chance with SIGKILL)."""
    from jaxgrok import pipeline
    from jaxgrok.store import Store
    from jaxgrok.sweep import load_sweep

    sweep = load_sweep(write_sweep(tmp_path / "s.toml", name="window", train={"steps": 200, "eval_every": 50, "chunk_steps": 50,
                                                                   "max_runs_per_batch": 2},
                        sweep={"seed": {"count": 4}, "weight_decay": 1.0, "learning_rate": 1e-2, "train_fraction": 0.5}))
    pipeline.run(sweep, out=tmp_path / "ref", quiet=True, analyze=False)

    def commit_then_die(self, runs_table, curves_table, clear=True, state=None):
        from jaxgrok.store import parts
        parts.write_pair(self.parts, self.tag, runs_table, curves_table, state)
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(Store, "write_batch", commit_then_die)
        with pytest.raises(Killed):
            pipeline.run(sweep, out=tmp_path / "out", quiet=True, analyze=False, checkpoint_every=1)
    assert checkpoint_steps(tmp_path / "out")  # the window: parts written, checkpoint still there
    pipeline.run(sweep, out=tmp_path / "out", quiet=True, analyze=False, checkpoint_every=1)
    assert tables(tmp_path / "out")[0].equals(tables(tmp_path / "ref")[0])
    assert tables(tmp_path / "out")[1].equals(tables(tmp_path / "ref")[1])


def checkpoint_steps(out):
    folder = out / "checkpoints"
    found = [p for p in folder.iterdir() if p.name.isdigit()] if folder.exists() else []
    return sorted(found, key=lambda p: int(p.name))


def test_a_truncated_checkpoint_is_reported_and_the_one_before_used(tmp_path, reference):
    sweep, out = sweep_file(tmp_path), tmp_path / "out"
    # One batch, so that no finished batch clears the checkpoints (batching is not in the run hash).
    proc = start(sweep, out, "--set", "max_runs_per_batch=16")
    t0 = time.time()
    while len(checkpoint_steps(out)) < 2 and time.time() - t0 < 120:  # one per chunk; two are kept
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    steps = checkpoint_steps(out)
    assert len(steps) == 2
    for f in (steps[-1] / "state" / "d").iterdir():
        with open(f, "r+b") as fh:
            fh.truncate(8)
    _, stderr = finish(sweep, out, "--set", "max_runs_per_batch=16")
    assert f"checkpoint {steps[-1].name}" in stderr and "unreadable" in stderr
    assert_same(out, reference, same_sweep=False)


def test_extending_a_finished_sweep_trains_only_the_new_runs(tmp_path):
    out = tmp_path / "out"
    finish(sweep_file(tmp_path, seeds=3), out)
    runs3, curves3 = tables(out)
    stdout, _ = finish(sweep_file(tmp_path, seeds=5), out)
    assert "3 of 5 runs already done" in stdout and "trained 2 more" in stdout
    runs5, curves5 = tables(out)
    assert runs5.num_rows == 5 and runs5.column("run_id").to_pylist() == list(range(5))
    assert runs5.slice(0, 3).select(["run_hash", "t_val", "final_val_acc"]).equals(
        runs3.select(["run_hash", "t_val", "final_val_acc"]))
    stdout, _ = finish(sweep_file(tmp_path, seeds=5), out)
    assert "5 of 5 runs already done" in stdout and "trained 0 more" in stdout
    assert tables(out)[1].equals(curves5)
    # --restart starts over
    stdout, _ = finish(sweep_file(tmp_path, seeds=5), out, "--restart")
    assert "already done" not in stdout and tables(out)[1].equals(curves5)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_one_sweep_together(tmp_path, reference):
    """jax.distributed on 127.0.0.1 (CPU collectives): one device per process, one sweep, each process
    writing the parts of its own runs; process 0 merges. Equal to the single-process sweep."""
    sweep, out, port = sweep_file(tmp_path), tmp_path / "out", free_port()
    env = {**ENV, "JAX_NUM_CPU_DEVICES": "1"}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "jaxgrok", "run", str(sweep), "--out", str(out), "--no-analyze", "--distributed",
         "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert "2 devices of 2 processes" in outputs[0][0]
    parts = {p.name.split("-")[1] for p in (out / "parts").glob("runs-*.parquet")}
    assert parts == {"p0", "p1"}  # each process wrote its own runs
    assert_same(out, reference)


def test_shards_without_a_coordinator(tmp_path, reference):
    sweep, out = sweep_file(tmp_path), tmp_path / "out"
    stdout, _ = finish(sweep, out, "--shard", "0/2")
    assert "shard 0/2 done; 5 runs of other shards still to come" in stdout
    assert not (out / "runs.parquet").exists()
    finish(sweep, out, "--shard", "1/2")
    assert_same(out, reference)


def test_two_processes_retire_and_refill_as_one(tmp_path):
    """With stop_after_grokking, each process decides for its own slots and all refill alike (the
    decisions are gathered): the same files as one process."""
    sweep = write_sweep(tmp_path / "retiring.toml", name="retiring",
                        train={"steps": 2000, "eval_every": 50, "chunk_steps": 250, "max_runs_per_batch": 2,
                               "stop_after_grokking": 200},
                        sweep={"seed": {"count": 4}, "weight_decay": 1.0, "learning_rate": 1e-2, "train_fraction": 0.6})
    finish(sweep, tmp_path / "one", "--set", "max_runs_per_batch=2")
    port, env = free_port(), {**ENV, "JAX_NUM_CPU_DEVICES": "1"}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "jaxgrok", "run", str(sweep), "--out", str(tmp_path / "two"), "--no-analyze",
         "--distributed", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    one, two = tables(tmp_path / "one"), tables(tmp_path / "two")
    assert one[0].column("stopped_at").null_count < one[0].num_rows  # runs retired, and slots were refilled
    assert one[0].equals(two[0]) and one[1].equals(two[1])
