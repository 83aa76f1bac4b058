"""The `jaxgrok` command: run a sweep, analyse its results, benchmark the engine."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from jaxgrok.analysis import AnalysisError
from jaxgrok.results import ResultsError
from jaxgrok.sweep import SweepError, load_sweep


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


def cmd_run(args) -> int:
    """`jaxgrok run`: the pipeline over a sweep file, with the command's options."""
    sweep = load_sweep(args.sweep, args.set)  # every input error surfaces here, before any output
    shard = _parse_shard(args.shard)
    if args.distributed:
        _start_processes(args)
    from jaxgrok import pipeline

    return pipeline.run(sweep, out=args.out, overrides=args.set, quiet=args.quiet, analyze=not args.no_analyze,
                        restart=args.restart, checkpoint_every=args.checkpoint_every, shard=shard,
                        dry_run=args.dry_run)


GPU_FLOPS = 1e15  # a sweep past this many matmul FLOPs is sized for an accelerator


def presets_dir() -> Path:
    """sweeps/ here, else the one beside the package (a checkout installed with pip -e)."""
    here = Path("sweeps")
    return here if here.is_dir() else Path(__file__).resolve().parent.parent / "sweeps"


def cmd_list(args) -> int:
    """`jaxgrok list [DIR]`: the preset sweeps, what each follows, its size and whether it is CPU- or GPU-sized."""
    folder = Path(args.dir) if args.dir else presets_dir()
    files = sorted(folder.glob("*.toml"))
    if not files:
        raise SweepError(f"{folder}: no sweep files (*.toml) there")
    from jaxgrok.memory import flops_per_step

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
    """`jaxgrok analyze DIR [--x --y]`: statistics, figures and report.html for a results directory."""
    from jaxgrok import pipeline

    return pipeline.analyze_dir(args.results_dir, args.x, args.y, args.final_keys)


def cmd_compare(args) -> int:
    """`jaxgrok compare A B`: two results directories' grokking times side by side."""
    from jaxgrok.analysis.compare import compare, format_comparison

    print(format_comparison(compare(args.a, args.b)))
    return 0


def cmd_bench(args) -> int:
    """`jaxgrok bench`: model-steps per second beside the peers (or, with --hlo, the kernel audit)."""
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
    """The `jaxgrok` command's arguments and subcommands."""
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
    ana.add_argument("--final-keys", action="store_true",
                     help="Nanda's restricted and excluded losses with each run's final key frequencies at every "
                          "evaluation: retrains the runs (as long as the sweep took)")
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
    """The `jaxgrok` command: a bad input is one line on stderr and exit status 2."""
    os.environ.setdefault("JAX_NUM_CPU_DEVICES", str(os.cpu_count() or 1))
    args = build_parser().parse_args(argv)
    from jaxgrok.store.lock import InUse

    try:
        return args.func(args)
    except (SweepError, ResultsError, AnalysisError, InUse) as e:
        print(f"jaxgrok: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a read-only directory, a permission: the path and the problem
        print(f"jaxgrok: error: {f'{e.filename}: {e.strerror}' if e.filename else e}", file=sys.stderr)
        return 1
