"""The accelerator check: one short, scripted measurement of jaxgrok on a GPU or TPU.

    PYTHONPATH=. python3 -m jaxgrok.device_check --out DIR          # ≤ 8 minutes on one H100/H200
    python3 -m jaxgrok.device_check --out DIR --tiny                 # the same parts, CPU-sized (a test)

It needs nothing installed beyond jaxgrok's dependencies (torch where present), so it runs on a lent
machine where pip cannot reach anything. Each part runs as its own process under its own time limit
and writes `DIR/NN_part.json` (what it measured, its status and wall time) and `DIR/NN_part.log` (all
it printed), so a run cut short still tells what it reached. Parts, in order:

1. versions: Python, JAX, jaxlib, the devices and their memory;
2. tests: a fast subset of the test suite on the device (engine, precision, memory, HLO);
3. bench: `jaxgrok bench` on Nanda's transformer at 64, 256 and 1,024 runs, float32 and bfloat16,
   each with its matmul ceiling measured at that precision;
4. torch: the torch.func ensemble and the per-model loop at 1,024 runs, where torch is present;
5. memory: XLA's bytes per run at 1,024 runs and the batch the engine picks (`run --dry-run`);
6. sweep: a real sweep of 1,024 Nanda runs in bfloat16, long enough to memorise, timed: the figure
   the "1,024 runs × 20,000 steps in ≤ 30 minutes" target extrapolates from.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Sizes of each part: the device check's and a CPU's (--tiny: seconds, for the test that keeps the
# script from rotting). Time limits are in seconds; on the device they add up to 8 minutes.
# The torch part trains jaxgrok beside the torch contenders (ratios from one run); on a CPU only the
# plumbing is checked, so the tiny part leaves jaxgrok out there.
FULL = {"runs": "64,256,1024", "bench_steps": 300, "torch_runs": 1024, "memory_runs": 1024,
        "torch_contenders": "jaxgrok,torch_vmap,torch_loop",
        "sweep_runs": 1024, "sweep_steps": 2000, "workload": "nanda",
        "limits": {"versions": 30, "tests": 90, "bench": 130, "torch": 60, "memory": 40, "sweep": 130}}
TINY = {"runs": "2", "bench_steps": 20, "torch_runs": 2, "memory_runs": 4, "torch_contenders": "torch_vmap,torch_loop",
        "sweep_runs": 4, "sweep_steps": 40, "workload": "mlp",
        "limits": {"versions": 60, "tests": 300, "bench": 240, "torch": 120, "memory": 120, "sweep": 240}}
TESTS = ["tests/test_engine.py", "tests/test_precision.py", "tests/test_memory.py", "tests/test_hlo.py"]
TINY_TESTS = ["tests/test_grokking.py"]  # on a CPU the point is the plumbing, not the coverage

VERSIONS = """
import json, platform, jax, jaxlib
devs = jax.devices()
mem = [d.memory_stats() or {} if d.platform != "cpu" else {} for d in devs]
print(json.dumps({"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
                  "backend": jax.default_backend(), "devices": [str(d) for d in devs],
                  "device_kind": devs[0].device_kind,
                  "memory_bytes": [m.get("bytes_limit") for m in mem]}))
"""


def _jaxgrok(*args: str) -> list[str]:
    return [sys.executable, "-m", "jaxgrok", *args]


def _sweep_args(cfg: dict, runs: int, steps: int, precision: str) -> list[str]:
    """`jaxgrok run` arguments for the workload at `runs` runs: Nanda's preset (or the quick start's
    model on a CPU) with one seed axis, measures off, as the benchmark trains it."""
    preset = "sweeps/nanda.toml" if cfg["workload"] == "nanda" else "sweeps/quickstart.toml"
    chunk = min(steps, 500)
    sets = [f"steps={steps}", "eval_every=" + str(min(100, steps)), f"chunk_steps={chunk}", f"precision={precision}",
            f"seed={{count = {runs}}}", "data_seed=0", "zip=[]", "weight_decay=1.0",
            "measures.fourier=false", "measures.circularity=false", "measures.restricted_loss=false",
            "measures.dist_from_init=false"]
    return [str(ROOT / preset), *[a for s in sets for a in ("--set", s)]]


def parts(cfg: dict, out: Path, tiny: bool) -> list[tuple[str, list[str]]]:
    """(name, command) of every part, in the order they run."""
    bench = ["bench", "--workload", cfg["workload"], "--runs", cfg["runs"], "--steps", str(cfg["bench_steps"]),
             "--eval-every", str(min(100, cfg["bench_steps"])), "--repeats", "1", "--contenders", "jaxgrok"]
    return [
        ("versions", [sys.executable, "-c", VERSIONS]),
        ("tests", [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                   *(TINY_TESTS if tiny else TESTS), f"--junitxml={out / 'tests.xml'}"]),
        ("bench", ["sh", "-c", " && ".join(
            " ".join(_jaxgrok(*bench, "--precision", p, "--json", str(out / f"bench_{p}.json")))
            for p in ("float32", "bfloat16"))]),
        ("torch", _jaxgrok("bench", "--workload", cfg["workload"], "--runs", str(cfg["torch_runs"]),
                           "--steps", str(cfg["bench_steps"]), "--eval-every", str(min(100, cfg["bench_steps"])),
                           "--repeats", "1", "--loop-runs", "2", "--contenders", cfg["torch_contenders"],
                           "--json", str(out / "torch.json"))),
        ("memory", _jaxgrok("run", *_sweep_args(cfg, cfg["memory_runs"], 1000 if not tiny else 40, "float32"),
                            "--dry-run", "--out", str(out / "dry"))),
        ("sweep", _jaxgrok("run", *_sweep_args(cfg, cfg["sweep_runs"], cfg["sweep_steps"], "bfloat16"),
                           "--out", str(out / "sweep"), "--no-analyze", "--restart")),
    ]


def _read(out: Path, name: str, log: str) -> dict:
    """What a finished part measured, read from the files it wrote and what it printed."""
    if name == "versions":
        lines = [line for line in log.splitlines() if line.startswith("{")]
        return json.loads(lines[-1]) if lines else {}
    if name == "tests":
        m = re.search(r"(\d+) passed", log)
        f = re.search(r"(\d+) failed", log)
        return {"passed": int(m.group(1)) if m else 0, "failed": int(f.group(1)) if f else 0}
    if name in ("bench", "torch"):
        files = [out / f"bench_{p}.json" for p in ("float32", "bfloat16")] if name == "bench" else [out / "torch.json"]
        return {"rows": [row for p in files if p.exists() for row in json.loads(p.read_text())]}
    if name == "memory":
        found = {k: re.search(pattern, log) for k, pattern in {
            "batch": r"batch(?:es)? of (\d+) runs", "per_run_estimate": r"about (\S+ \S+) per run",
            "per_batch_xla": r"run \(estimate\), (\S+ \S+) per device \(XLA\)"}.items()}
        return {k: m.group(1) for k, m in found.items() if m}
    if name == "sweep":
        runs = out / "sweep" / "runs.parquet"
        if not runs.exists():
            return {}
        import pyarrow.parquet as pq

        t = pq.read_table(runs, columns=["t_train", "t_val"]).to_pydict()
        timed = re.search(r"compile ([\d.]+) s, train ([\d.]+) s \(([\d,]+) model-steps/s\)", log)
        return {"runs": len(t["t_train"]), "memorised": sum(v is not None for v in t["t_train"]),
                "grokked": sum(v is not None for v in t["t_val"]),
                **({"compile_s": float(timed.group(1)), "train_s": float(timed.group(2)),
                    "model_steps_per_s": float(timed.group(3).replace(",", ""))} if timed else {})}
    return {}


def run_part(name: str, cmd: list[str], limit: float, out: Path, index: int, extra: dict) -> dict:
    """Run one part under its time limit; write its JSON and log; return the JSON."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
        status, log = ("ok" if proc.returncode == 0 else f"exit {proc.returncode}"), proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        status = f"timed out after {limit:.0f} s"
        log = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr))
    wall = time.perf_counter() - start
    stem = f"{index:02d}_{name}"
    (out / f"{stem}.log").write_text(log)
    result = {"part": name, "status": status, "wall_s": round(wall, 2), "limit_s": limit, "command": cmd,
              **extra, **_read(out, name, log)}
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"{stem}: {status} in {wall:.0f} s", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    """Run every part; exit 0 when each finished (a failed part is recorded, and the next one runs)."""
    ap = argparse.ArgumentParser(prog="python3 -m jaxgrok.device_check", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for the parts' JSON and logs")
    ap.add_argument("--tiny", action="store_true", help="CPU sizes: checks the script, measures nothing")
    ap.add_argument("--only", help="comma-separated part names to run (default: all)")
    args = ap.parse_args(argv)
    cfg = TINY if args.tiny else FULL
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(",")) if args.only else None
    results = []
    for i, (name, cmd) in enumerate(parts(cfg, out, args.tiny), 1):
        if only and name not in only:
            continue
        extra = {"sweep_runs": cfg["sweep_runs"], "sweep_steps": cfg["sweep_steps"]} if name == "sweep" else {}
        results.append(run_part(name, cmd, cfg["limits"][name], out, i, extra))
    (out / "summary.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
