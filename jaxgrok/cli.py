"""The `jaxgrok` command: run a sweep, analyse its results, benchmark the engine."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from jaxgrok.analysis import AnalysisError
from jaxgrok.results import ResultsError
from jaxgrok.sweep import SweepError, load_sweep


class _Display:
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
        if p.compiled_s is not None:
            if self.live:
                self.bar.update(self.task, stage="training", info=f"compiled in {p.compiled_s:.1f} s; first chunk…")
            else:
                print(f"compiled in {p.compiled_s:.1f} s; training", flush=True)
            return
        left = (p.steps_total - p.steps_done) / p.model_steps_per_s if p.model_steps_per_s > 0 else float("nan")
        info = (f"{p.steps_done:,}/{p.steps_total:,} model-steps · memorised {p.memorised} · "
                f"grokked {p.grokked} · {p.model_steps_per_s:,.0f} model-steps/s")
        if p.n_batches > 1:
            info += f" · batch {p.batch + 1}/{p.n_batches}"
        left_text = f"about {_duration(left)} left" if np.isfinite(left) else ""
        if self.live:
            self.bar.update(self.task, completed=p.steps_done, info=info, left=left_text)
        else:
            elapsed = time.perf_counter() - self.start
            print(f"{info} · {_duration(elapsed)} elapsed{', ' + left_text if left_text else ''}", flush=True)

    def close(self) -> None:
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
                     f"({len(result.index) * result.sweep.static.train.steps / max(result.train_s, 1e-9):,.0f} model-steps/s)")
    lines.append(f"wrote {out / 'runs.parquet'} and {out / 'curves.parquet'}")
    return "\n".join(lines)


def _parse_shard(text: str | None) -> tuple[int, int]:
    if text is None:
        return 0, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise SweepError(f"--shard {text}: expected I/N, e.g. 0/4") from None
    if not 0 <= i < n:
        raise SweepError(f"--shard {text}: I must be in [0, N)")
    return i, n


def _start_processes(args) -> None:
    """jax.distributed: explicit coordinator, or auto-detected (SLURM, Cloud TPU)."""
    import jax

    explicit = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise SweepError("--coordinator, --num-processes and --process-id go together")
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    else:
        jax.distributed.initialize()


def out_dir(sweep, out: str | None, overrides) -> Path:
    """`--out`, else results/NAME, or for a sweep with overrides results/NAME-set-HASH: an
    overridden sweep never lands in (and never replaces) the results of the file as it is."""
    from jaxgrok.sweep import overrides_id

    if out:
        return Path(out)
    return Path("results") / (f"{sweep.name}-set-{overrides_id(overrides)}" if overrides else sweep.name)


def cmd_run(args) -> int:
    sweep = load_sweep(args.sweep, args.set)  # every input error surfaces here, before any output
    return run_sweep(sweep, args)


def run_sweep(sweep, args) -> int:
    """`jaxgrok run` on a loaded sweep (args: the run command's options; also the Python API's path)."""
    shard, n_shards = _parse_shard(args.shard)
    if args.distributed:
        _start_processes(args)
    import jax

    from jaxgrok import lock, train

    train.check_fits(sweep, train.memory_budget())  # before anything is written
    out = out_dir(sweep, args.out, args.set)
    if args.dry_run:
        return _dry_run(sweep, out)
    if args.set and not args.out and not args.quiet and jax.process_index() == 0:
        print(f"with --set: results in {out} ({Path('results') / sweep.name} keeps the sweep file's own)", flush=True)
    shard_tag = f"s{shard}of{n_shards}" if n_shards > 1 else ""
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
            return _run(args, sweep, out, shard, n_shards, shard_tag)
        except SweepError:  # refused after the directory was made (the compiled batch does not fit):
            if created:  # leave no trace of this run
                _remove_if_empty(out)
            raise


def _remove_if_empty(out: Path) -> None:
    """Remove a results directory this run created, if it holds nothing but its lock and empty folders."""
    for f in out.glob(".lock*"):
        f.unlink()
    from jaxgrok.store import _rmdir_if_empty

    for folder in sorted((p for p in out.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [out]:
        _rmdir_if_empty(folder)


def _run(args, sweep, out: Path, shard: int, n_shards: int, shard_tag: str) -> int:
    import jax

    from jaxgrok import engine
    from jaxgrok.store import Interrupted, Store

    me, n_proc = jax.process_index(), jax.process_count()
    tag = "-".join(t for t in (shard_tag, f"p{me}" if n_proc > 1 else "") if t)
    store = Store(out, sweep, restart=args.restart and me == 0, checkpoint_every=args.checkpoint_every,
                  tag=tag, shard_tag=shard_tag)
    store.catch_signals()
    index = np.arange(sweep.n_runs)[shard::n_shards]  # round robin: every shard gets every cell
    n_done = len(index) - len(store.pending(index))
    quiet = args.quiet or me != 0  # one voice per sweep
    if not quiet and (others := store.done_hashes() - set(sweep.run_hashes)):
        print(_other_version(out, sweep, len(others)), flush=True)
    display = _Display((len(index) - n_done) * sweep.static.train.steps, live=sys.stdout.isatty() and not quiet)
    if not quiet:
        where = f" (shard {shard}/{n_shards})" if n_shards > 1 else ""
        print(f"{sweep.name}{where}: {len(index)} runs × {sweep.static.train.steps} steps "
              f"({sweep.static.model.kind} on {sweep.static.task.op}) on {len(jax.devices())} devices"
              f"{f' of {n_proc} processes' if n_proc > 1 else ''}; following {sweep.paper}", flush=True)
        if n_done:
            print(f"resuming in {out}: {n_done} of {len(index)} runs already done", flush=True)
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
        print(f"shard {shard}/{n_shards} done; {missing} runs of other shards still to come in {out}")
        return 0
    store.merge()
    print(_summary(out, result, n_done))
    if not args.no_analyze:
        return cmd_analyze(argparse.Namespace(results_dir=out, x=None, y=None))
    return 0


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
    from jaxgrok.train import human_bytes

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
    return 0


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


GPU_FLOPS = 1e15  # a sweep past this many matmul FLOPs is sized for an accelerator


def presets_dir() -> Path:
    """sweeps/ here, else the one beside the package (a checkout installed with pip -e)."""
    here = Path("sweeps")
    return here if here.is_dir() else Path(__file__).resolve().parent.parent / "sweeps"


def cmd_list(args) -> int:
    folder = Path(args.dir) if args.dir else presets_dir()
    files = sorted(folder.glob("*.toml"))
    if not files:
        raise SweepError(f"{folder}: no sweep files (*.toml) there")
    from jaxgrok.train import flops_per_step

    short = lambda x: f"{x:.1e}".replace("e+0", "e").replace("e+", "e")  # noqa: E731
    rows = []
    for f in files:
        sw = load_sweep(f)
        flops = flops_per_step(sw.static) * sw.n_runs * sw.static.train.steps
        # Past 10¹⁵ FLOPs a sweep takes hours on a CPU (the quick start, 4·10¹² FLOPs, trains in 38 s on 2 cores).
        sized = "GPU" if flops > GPU_FLOPS else "CPU"
        follows = sw.paper.split("(")[0].split(":")[0].strip()
        rows.append((f.stem, sized, f"{sw.n_runs:,}", f"{sw.static.train.steps:,}", short(sw.n_runs * sw.static.train.steps),
                     short(flops), f"{sw.static.model.kind} on {sw.static.task.op}", follows))
    head = ("preset", "for", "runs", "steps", "model-steps", "FLOPs", "model on task", "follows")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) if i in (0, 1, 6, 7) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())
    print(f"\n{folder}/NAME.toml: `jaxgrok run {folder}/NAME.toml --dry-run` says what a run would take here")
    return 0


def cmd_analyze(args) -> int:
    from jaxgrok.analysis import analyze, write

    try:
        written = write(analyze(args.results_dir, args.x, args.y), args.results_dir)
    except OSError as e:  # reading problems are ResultsErrors: this is a write
        raise AnalysisError(f"{e.filename or args.results_dir}: {e.strerror or e}; the analysis writes stats.parquet, "
                            "figures/ and report.html into the results directory") from None
    print(f"analysis: {written['report']} (stats.parquet, figures/)")
    return 0


def cmd_compare(args) -> int:
    from jaxgrok.analysis.compare import compare, format_comparison

    print(format_comparison(compare(args.a, args.b)))
    return 0


def cmd_bench(args) -> int:
    from jaxgrok import bench

    split = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    workloads, contenders = split(args.workload), split(args.contenders)
    for w in workloads:
        if w not in bench.WORKLOADS:
            raise SweepError(f"--workload {w}: unknown; one of {', '.join(bench.WORKLOADS)}")
    for c in contenders:
        if c not in bench.CONTENDERS:
            raise SweepError(f"--contenders {c}: unknown; one of {', '.join(bench.CONTENDERS)}")
    try:
        runs = [int(r) for r in split(args.runs)]
    except ValueError:
        raise SweepError(f"--runs {args.runs}: expected comma-separated integers") from None
    if args.hlo:  # the audit of the vmapped chunk instead of timings
        from jaxgrok import hlo

        for w in workloads:
            print(hlo.format_audit(w, hlo.audit(bench.workload_sweep(w, runs[0], args.steps, args.eval_every,
                                                                      precision=args.precision), runs[0])))
        return 0
    if args.steps % args.eval_every:
        raise SweepError(f"--steps {args.steps}: must be a multiple of --eval-every ({args.eval_every})")
    bench.run(workloads, runs, args.steps, args.eval_every, contenders, args.loop_runs, args.repeats, args.json,
              args.precision)
    return 0


class _Parser(argparse.ArgumentParser):
    """Command-line mistakes get one line and exit 2, like every other bad input."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def _version() -> str:
    from jaxgrok.results import versions

    v = versions()
    return f"jaxgrok {v['jaxgrok']} (jax {v['jax']}, jaxlib {v['jaxlib']}, python {v['python']})"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jaxgrok", description=__doc__)
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train every run of a sweep file and write Parquet results")
    run.add_argument("sweep", help="a sweep file, e.g. sweeps/quickstart.toml")
    run.add_argument("--out", help="results directory (default results/<sweep name>/)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a value of the sweep file, e.g. --set steps=500 or --set sweep.seed='{count=4}'")
    run.add_argument("--quiet", action="store_true", help="no progress output")
    run.add_argument("--no-analyze", action="store_true", help="skip the statistics, figures and report")
    run.add_argument("--restart", action="store_true", help="discard what DIR holds and start over")
    run.add_argument("--dry-run", action="store_true",
                     help="print the batches, memory and an estimated time from one timed interval; write nothing")
    run.add_argument("--checkpoint-every", type=_positive, default=10, metavar="N",
                     help="checkpoint the batch in progress every N chunks (and on SIGTERM/SIGINT)")
    run.add_argument("--shard", metavar="I/N", type=str, help="train every N-th run from the I-th (job arrays, no coordinator)")
    run.add_argument("--distributed", action="store_true",
                     help="one sweep over every device of every process (jax.distributed; SLURM and Cloud TPU auto-detected)")
    run.add_argument("--coordinator", metavar="HOST:PORT", help="with --distributed: process 0's address")
    run.add_argument("--num-processes", type=int)
    run.add_argument("--process-id", type=int)
    run.set_defaults(func=cmd_run)

    lst = sub.add_parser("list", help="the preset sweeps: what each follows, its size, CPU or GPU")
    lst.add_argument("dir", nargs="?", help="a folder of sweep files (default: sweeps/)")
    lst.set_defaults(func=cmd_list)

    ana = sub.add_parser("analyze", help="statistics, figures and report.html for a results directory")
    ana.add_argument("results_dir", help="a directory holding runs.parquet (and curves.parquet)")
    ana.add_argument("--x", help="phase-diagram x axis (a swept axis, e.g. weight_decay)")
    ana.add_argument("--y", help="phase-diagram y axis (e.g. learning_rate)")
    ana.set_defaults(func=cmd_analyze)

    cmp = sub.add_parser("compare", help="two results directories' grokking times: medians and the log-rank test")
    cmp.add_argument("a", help="a results directory (e.g. results/precision)")
    cmp.add_argument("b", help="another (e.g. results/precision_bfloat16)")
    cmp.set_defaults(func=cmd_compare)

    bench = sub.add_parser("bench", help="model-steps per second beside PyTorch and a Python loop")
    bench.add_argument("--workload", default="mlp,nanda", help="comma-separated: mlp, nanda")
    bench.add_argument("--runs", default="1,8,64,256", help="comma-separated run counts")
    bench.add_argument("--steps", type=int, default=500)
    bench.add_argument("--eval-every", type=int, default=100)
    bench.add_argument("--contenders", default="jaxgrok,jax_loop,torch_loop,torch_vmap")
    bench.add_argument("--loop-runs", type=int, default=4, help="models the loop contenders time (rate is per model)")
    bench.add_argument("--repeats", type=int, default=2)
    bench.add_argument("--json", help="also write the figures to this JSON file")
    bench.add_argument("--precision", default="float32", choices=("float32", "tf32", "bfloat16"),
                       help="jaxgrok's [train] precision, and the matmul ceiling measured at it")
    bench.add_argument("--hlo", action="store_true",
                       help="audit the HLO of the vmapped chunk (first --runs value) instead of timing")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    # On CPU every core becomes a JAX device that trains its share of the runs one at a time, which
    # beats one device running batched kernels (BENCHMARKS.md). Must be set before jax starts.
    os.environ.setdefault("JAX_NUM_CPU_DEVICES", str(os.cpu_count() or 1))
    args = build_parser().parse_args(argv)
    from jaxgrok.lock import InUse

    try:
        return args.func(args)
    except (SweepError, ResultsError, AnalysisError, InUse) as e:
        print(f"jaxgrok: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a read-only directory, a permission: the path and the problem
        print(f"jaxgrok: error: {f'{e.filename}: {e.strerror}' if e.filename else e}", file=sys.stderr)
        return 1
