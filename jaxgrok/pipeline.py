"""One sweep from file to report: lock -> store -> engine -> merge -> analyze.

`jaxgrok run` (cli.py) and `jaxgrok.run` (api.py) are both thin callers of `run`; every message,
exit status and file of a run is decided here. With several processes (`--distributed`) process 0
holds the lock and speaks; every process trains its share; process 0 merges and analyses. With
`--shard I/N`, each shard trains every N-th run and the last one to finish merges.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from jaxgrok.sweep import SweepError


def out_dir(sweep, out: str | Path | None, overrides) -> Path:
    """`--out`, else results/NAME, or for a sweep with overrides results/NAME-set-HASH: an
    overridden sweep never lands in (and never replaces) the results of the file as it is."""
    from jaxgrok.sweep import overrides_id

    if out:
        return Path(out)
    return Path("results") / (f"{sweep.name}-set-{overrides_id(overrides)}" if overrides else sweep.name)


def run(sweep, *, out: str | Path | None = None, overrides=(), quiet: bool = False, analyze: bool = True,
        restart: bool = False, checkpoint_every: int = 10, shard: tuple[int, int] = (0, 1),
        dry_run: bool = False) -> int:
    """Train a loaded sweep into its results directory (see out_dir; `overrides` as given on the
    command line, for its name), merge and analyse it; the exit status (128 + the signal's number
    when a signal stopped it after a checkpoint). `shard`: (I, N), this shard's place. With
    `dry_run`, say what a run would take and write nothing. Bad input raises SweepError (and a
    held directory lock.InUse) before anything is written."""
    import jax

    from jaxgrok import memory
    from jaxgrok.store import lock

    memory.check_fits(sweep, memory.memory_budget())  # before anything is written
    if sweep.static.train.precision == "float64" and (platform := jax.devices()[0].platform) == "tpu":
        raise SweepError(f"{sweep.path}: train.precision: float64 is not supported on {platform.upper()} (float32, tf32 or bfloat16)")
    given, out = out, out_dir(sweep, out, overrides)
    if dry_run:
        return _dry_run(sweep, out)
    if overrides and not given and not quiet and jax.process_index() == 0:
        print(f"with --set: results in {out} ({Path('results') / sweep.name} keeps the sweep file's own)", flush=True)
    i, n = shard
    shard_tag = f"s{i}of{n}" if n > 1 else ""
    created = not out.exists()
    with contextlib.ExitStack() as held:
        refused = None
        if jax.process_index() == 0:  # the processes of one --distributed sweep share the directory
            try:
                held.enter_context(lock.holding(out, shard_tag))
            except lock.InUse as e:
                refused = e
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            if multihost_utils.process_allgather(np.array(refused is not None)).any():
                refused = refused or lock.InUse(f"{out} is in use by another jaxgrok run (see process 0)")
        if refused:
            raise refused
        try:
            return _train(sweep, out, quiet, analyze, restart, checkpoint_every, shard, shard_tag)
        except SweepError:  # refused after the directory was made (the compiled batch does not fit):
            if created:  # leave no trace of this run
                _remove_if_empty(out)
            raise


def _remove_if_empty(out: Path) -> None:
    """Remove a results directory this run created, if it holds nothing but its lock and empty folders."""
    for f in out.glob(".lock*"):
        f.unlink()
    from jaxgrok.store import rmdir_if_empty

    for folder in sorted((p for p in out.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [out]:
        rmdir_if_empty(folder)


def _train(sweep, out: Path, quiet: bool, analyze: bool, restart: bool, checkpoint_every: int,
           shard: tuple[int, int], shard_tag: str) -> int:
    """In the held directory: the store, the engine over this shard's pending runs, the merge, the
    summary and the analysis."""
    import jax

    from jaxgrok import engine
    from jaxgrok.store import Interrupted, Store

    (i, n), me, n_proc = shard, jax.process_index(), jax.process_count()
    tag = "-".join(t for t in (shard_tag, f"p{me}" if n_proc > 1 else "") if t)
    store = Store(out, sweep, restart=restart and me == 0, checkpoint_every=checkpoint_every, tag=tag, shard_tag=shard_tag)
    store.catch_signals()
    index = np.arange(sweep.n_runs)[i::n]  # round robin: every shard gets every cell
    kept, continued = store.carry_over(index)  # a raised budget: what the directory holds at a smaller one
    n_done = len(index) - len(store.pending(index))
    quiet = quiet or me != 0  # one voice per sweep
    if not quiet and (others := store.done_hashes() - set(sweep.run_hashes)):
        print(_other_version(out, sweep, len(others)), flush=True)
    display = Display((len(index) - n_done) * sweep.static.train.steps, live=sys.stdout.isatty() and not quiet)
    if not quiet:
        _announce(sweep, out, index, n_done, shard, n_proc)
        if kept or continued:
            print(f"extending to {sweep.static.train.steps:,} steps: {kept} runs that retired within a smaller budget "
                  f"are kept as they are, {len(continued)} continue from their final state there", flush=True)
    try:
        result = engine.train_sweep(sweep, index=index, on_chunk=None if quiet else display, store=store)
    except Interrupted as e:
        print(f"jaxgrok: {e}; checkpoint written in {out}; run the same command again to resume", file=sys.stderr)
        return 128 + e.signum
    finally:
        display.close()
        store.release_signals()
    if n_proc > 1:  # every process has written its parts before process 0 merges them
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jaxgrok: parts written")
        if me != 0:
            return 0
    missing = len(store.pending(np.arange(sweep.n_runs)))
    if missing:  # other shards are still at work: the last one to finish merges
        print(f"shard {i}/{n} done; {missing} runs of other shards still to come in {out}")
        return 0
    store.merge()
    print(_summary(out, result, n_done))
    return analyze_dir(out) if analyze else 0


def _announce(sweep, out: Path, index, n_done: int, shard: tuple[int, int], n_proc: int) -> None:
    """The run's first lines: what trains where, and how much was already done."""
    import jax

    where = f" (shard {shard[0]}/{shard[1]})" if shard[1] > 1 else ""
    print(f"{sweep.name}{where}: {len(index)} runs × {sweep.static.train.steps} steps "
          f"({sweep.static.model.kind} on {sweep.static.task.op}) on {len(jax.devices())} devices"
          f"{f' of {n_proc} processes' if n_proc > 1 else ''}; following {sweep.paper}", flush=True)
    if n_done:
        print(f"resuming in {out}: {n_done} of {len(index)} runs already done", flush=True)


def analyze_dir(results_dir, x: str | None = None, y: str | None = None, final_keys: bool = False) -> int:
    """Statistics, figures and report.html for a results directory (`x`, `y`: the phase diagram's
    axes; `final_keys`: Nanda's losses by a second pass); says where the report is. A failed write is
    an AnalysisError of one line."""
    from jaxgrok.analysis import AnalysisError, analyze, write

    try:
        analysis = analyze(results_dir, x, y, final_keys)
        written = write(analysis, results_dir)
    except OSError as e:  # reading problems are ResultsErrors: this is a write
        raise AnalysisError(f"{e.filename or results_dir}: {e.strerror or e}; the analysis writes stats.parquet, "
                            "figures/ and report.html into the results directory") from None
    if analysis.nanda:
        print("with each run's final key frequencies (final_key_losses.parquet"
              + ("" if analysis.nanda_exact else "; the second pass did NOT reproduce the runs bit for bit: these are a rerun's") + "):")
        for r in analysis.nanda:
            print(f"  {r['signature']}: {r['runs']} of {r['of']} runs, median {_or_dash(r['median'])}")
    print(f"analysis: {written['report']} (stats.parquet, figures/)")
    return 0


def _or_dash(v) -> str:
    return "—" if v is None else f"{v:,.3g}"


class Display:
    """A live progress bar on a terminal; one line per chunk otherwise (logs, CI, pipes). It says
    when compiling ends, and gives the elapsed time and the time left from the measured rate."""

    def __init__(self, total: int, live: bool):
        self.live, self.start = live, time.perf_counter()
        if live:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("[bold]{task.fields[stage]}"), BarColumn(), TextColumn("{task.fields[info]}"),
                                TimeElapsedColumn(), TextColumn("{task.fields[left]}"))
            self.task = self.bar.add_task("train", total=total, stage="compiling", info="", left="")
            self.bar.start()

    def __call__(self, p) -> None:
        """Show one engine.Progress."""
        if p.compiled_s is not None:
            if self.live:
                self.bar.update(self.task, stage="training", info=f"compiled in {p.compiled_s:.1f} s; first chunk…")
            else:
                print(f"compiled in {p.compiled_s:.1f} s; training", flush=True)
            return
        left = (p.steps_total - p.steps_done) / p.model_steps_per_s if p.model_steps_per_s > 0 else float("nan")
        info = (f"{p.steps_done:,}/{p.steps_total:,} model-steps · memorised {p.memorised} · "
                f"grokked {p.grokked} · {p.model_steps_per_s:,.0f} model-steps/s")
        if p.trained < p.steps_done:  # runs retired: their budget counts as done, not as trained
            info += f" · {p.trained:,} trained"
        if p.n_batches > 1:
            info += f" · batch {p.batch + 1}/{p.n_batches}"
        left_text = f"about {_duration(left)} left" if np.isfinite(left) else ""
        if self.live:
            self.bar.update(self.task, completed=p.steps_done, info=info, left=left_text)
        else:
            elapsed = time.perf_counter() - self.start
            print(f"{info} · {_duration(elapsed)} elapsed{', ' + left_text if left_text else ''}", flush=True)

    def close(self) -> None:
        """Stop the live bar (once)."""
        if self.live:
            self.bar.stop()
            self.live = False


def _summary(out: Path, result, n_done_before: int) -> str:
    from jaxgrok.analysis.cells import load_runs

    cols, _ = load_runs(out)
    n, censored = len(cols["run_id"]), cols["censored"]
    grokked = int((~censored).sum())
    lines = []
    if n_done_before:
        lines.append(f"{n_done_before} runs were already done in {out}; trained {len(result.index)} more")
    lines.append(f"{n} runs: {grokked} grokked ({grokked / max(n, 1):.0%}), {n - grokked} censored at "
                 f"{int(cols['steps'].max())} steps, {int(cols['diverged'].sum())} diverged")
    if grokked:
        lines.append(f"median t_val of the grokked runs: {np.median(cols['t_val'][~censored]):.0f} steps "
                     f"(median delay after t_train: {np.nanmedian(cols['delay']):.0f})")
    phases, counts = np.unique(cols["phase"], return_counts=True)
    lines.append("phases: " + ", ".join(f"{p} {c}" for p, c in zip(phases, counts)))
    if len(result.index):
        lines.append(f"compile {result.compile_s:.1f} s, train {result.train_s:.1f} s "
                     f"({result.trained_steps / max(result.train_s, 1e-9):,.0f} model-steps/s)")
    if (window := result.sweep.static.train.stop_after_grokking) and len(result.index):
        fixed = len(result.index) * result.sweep.static.train.steps
        retired = int(np.isfinite(result.stopped_at).sum())
        lines.append(f"retired {retired} of {len(result.index)} runs {window} steps after they grokked: trained "
                     f"{result.trained_steps:,} model-steps, where training them from step 0 at a fixed budget costs "
                     f"{fixed:,} ({fixed / max(result.trained_steps, 1):.1f}× fewer)")
    elif len(result.index) and result.trained_steps < len(result.index) * result.sweep.static.train.steps:
        lines.append(f"trained {result.trained_steps:,} model-steps: runs continued from a smaller budget "
                     f"(from step 0: {len(result.index) * result.sweep.static.train.steps:,})")
    lines.append(f"wrote {out / 'runs.parquet'} and {out / 'curves.parquet'}")
    return "\n".join(lines)


def _other_version(out: Path, sweep, n_others: int) -> str:
    """One line: DIR holds runs that this sweep does not have (another version of the file)."""
    import pyarrow as pa

    from jaxgrok.sweep import said_differences

    what = ""
    try:
        before = json.loads(pq.read_schema(out / "runs.parquet").metadata[b"jaxgrok.sweep"])
        what = f" (differs in: {said})" if (said := said_differences(before, sweep.resolved, 3)) else ""
    except (OSError, KeyError, ValueError, TypeError, pa.ArrowException):  # no readable runs.parquet: no details
        pass
    return (f"{out} also holds {n_others} runs of another version of this sweep{what}: they stay in "
            f"{out / 'parts'} and are left out of runs.parquet")


def _dry_run(sweep, out: Path) -> int:
    from jaxgrok import engine
    from jaxgrok.memory import human_bytes

    d = engine.dry_run(sweep)
    batch = human_bytes(d["batch_bytes"]) + " per device (XLA)" if d["batch_bytes"] else "not reported by this backend"
    print(f"{sweep.name}: {d['runs']:,} runs × {d['steps']:,} steps = {d['model_steps']:,} model-steps "
          f"({sweep.static.model.kind} on {sweep.static.task.op}); following {sweep.paper}\n"
          f"on {d['devices']} {d['platform']} devices: {d['batches']} batch{'es' if d['batches'] > 1 else ''} of "
          f"{d['runs_per_batch']} runs, chunks of {d['chunk_steps']:,} steps\n"
          f"memory: about {human_bytes(d['bytes_per_run'])} per run (estimate), {batch} per batch; budget "
          f"{human_bytes(d['budget'])} per device\n"
          f"time: compile {d['compile_s']:.1f} s; one evaluation interval ({sweep.static.train.eval_every} steps) "
          f"of a batch took {d['interval_s'] * 1e3:,.1f} ms → about {_duration(d['train_s'])} of training\n"
          f"would write {out}/ (nothing was written)")
    if window := sweep.static.train.stop_after_grokking:
        print(_retiring_estimate(sweep, out, window, d["model_steps"]))
    return 0


def _retiring_estimate(sweep, out: Path, window: int, fixed: int) -> str:
    """One line: what retiring runs `window` steps after they grok would train, estimated from the
    grokking times already in DIR/runs.parquet (another budget or version of the sweep will do)."""
    from jaxgrok.analysis.cells import load_runs

    steps = sweep.static.train.steps
    head = f"retiring: at most {fixed:,} model-steps (a fixed budget)"
    try:
        cols, _ = load_runs(out)
    except Exception:  # noqa: BLE001 - nothing readable there: no estimate
        return f"{head}; how many fewer depends on when runs grok (no runs.parquet in {out} to estimate from)"
    t_val = np.where(cols["censored"], np.inf, np.asarray(cols["t_val"], float))
    per_run = np.minimum(t_val + window, steps).mean()
    return (f"{head}; about {sweep.n_runs * per_run:,.0f} ({steps / per_run:.1f}× fewer) if runs grok as the "
            f"{len(t_val)} in {out / 'runs.parquet'} did")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
