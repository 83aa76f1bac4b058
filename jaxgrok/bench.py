"""`jaxgrok bench`: model-steps per second of jaxgrok beside its peers, measured in one invocation.

Contenders, interleaved within each repeat so that machine drift falls on all of them alike:
- jaxgrok: the engine (vmapped over runs, sharded over devices), training alone: no progress measures,
  like its peers;
- jaxgrok_measures: the same with the default measures (as `jaxgrok run` does by default);
- jaxgrok_llc: the default measures and the LLC at its default cadence;
- jaxgrok_numerics: training alone plus the softmax numerics and relative flatness (every evaluation);
- jaxgrok_curvature: training alone plus the curvature measures at their default cadence;
- jax_loop: the engine's own program for one run, called once per run from a Python loop;
- torch_loop: one PyTorch model after another, the way the reference implementations train;
- torch_vmap: a torch.func ensemble (stack_module_state + vmap over functional_call).
Loop contenders train at most `--loop-runs` models and their rate is per model, so it does not depend
on the run count: extrapolating it is exact up to noise.
"""

from __future__ import annotations

import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxgrok import engine, memory, tasks, train
from jaxgrok.sweep import sweep_from_dict

CONTENDERS = ("jaxgrok", "jaxgrok_measures", "jaxgrok_llc", "jaxgrok_numerics", "jaxgrok_curvature", "jax_loop",
              "torch_loop", "torch_vmap")
MEASURES = {  # the [measures] table of each jaxgrok contender
    "jaxgrok": {"dist_from_init": False, "fourier": False, "circularity": False, "restricted_loss": False},
    "jaxgrok_measures": {},
    "jaxgrok_llc": {"llc": True},
    "jaxgrok_numerics": {"dist_from_init": False, "fourier": False, "circularity": False, "restricted_loss": False,
                         "numerics": True, "flatness": True},
    "jaxgrok_curvature": {"dist_from_init": False, "fourier": False, "circularity": False, "restricted_loss": False,
                          "curvature": True},
}

WORKLOADS = {
    # The quick-start model: embedding + MLP on x+y mod 31, half the table, full batch.
    "mlp": {"task": {"op": "x+y", "p": 31}, "model": {"kind": "mlp", "d_embed": 32, "d_hidden": 128},
            "learning_rate": 1e-2, "weight_decay": 1.0, "train_fraction": 0.5},
    # Nanda et al. 2023: 1-layer transformer on x+y mod 113, 30% train, full batch.
    "nanda": {"task": {"op": "x+y", "p": 113},
              "model": {"kind": "transformer", "n_layers": 1, "d_model": 128, "n_heads": 4, "d_mlp": 512},
              "learning_rate": 1e-3, "weight_decay": 1.0, "train_fraction": 0.3},
}


def workload_sweep(name: str, n_runs: int, steps: int, eval_every: int, contender: str = "jaxgrok",
                   precision: str = "float32"):
    """The sweep one contender trains on a workload: `n_runs` seeds of WORKLOADS[name], one chunk, its measures table."""
    w = WORKLOADS[name]
    return sweep_from_dict({
        "name": f"bench_{name}", "paper": "benchmark workload", "task": w["task"], "model": w["model"],
        "train": {"steps": steps, "eval_every": eval_every, "chunk_steps": steps, "precision": precision},
        "measures": MEASURES.get(contender, MEASURES["jaxgrok"]),
        "sweep": {"seed": {"count": n_runs}, "weight_decay": w["weight_decay"],
                  "learning_rate": w["learning_rate"], "train_fraction": w["train_fraction"]},
    }, f"bench:{name}")


def flops_per_model_step(sweep) -> float:
    """Analytic matmul FLOPs of one run's training step, its evaluation amortised (memory.flops_per_step)."""
    return memory.flops_per_step(sweep.static)


CEILING_PRECISION = {"float32": (jnp.float32, "highest"), "tf32": (jnp.float32, "high"), "bfloat16": (jnp.bfloat16, None)}


def matmul_ceiling(n: int = 2048, reps: int = 5, precision: str = "float32") -> float:
    """The device's matmul rate at a precision, measured on one large square matmul (best of reps)."""
    dtype, level = CEILING_PRECISION[precision]
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda a, b: jnp.dot(a, b, precision=level))
    f(a, a).block_until_ready()
    best = np.inf
    for _ in range(reps):
        t = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def device_name() -> str:
    """The devices JAX computes on, in words (the CPU's model and cores, or the accelerators' kind)."""
    d = jax.devices()[0]
    if d.platform == "cpu":
        model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                     platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
        return f"{model}, {os.cpu_count()} cores ({len(jax.devices())} JAX CPU devices)"
    return f"{len(jax.devices())} × {d.device_kind}"


def _jax_loop_seconds(sweep, n_runs: int) -> tuple[float, float]:
    """(compile, train) seconds of the single-run program run once per run from Python."""
    program = train.make_program(sweep.static, jax.devices()[:1])
    hp = jax.device_put(train.hparams_for(sweep, np.array([0])), program.sharding)
    t = time.perf_counter()
    chunk = program.chunk.lower(program.init(hp), hp, train.first_evals(1)).compile()
    compile_s = time.perf_counter() - t
    n_chunks = sweep.static.train.steps // sweep.static.train.eval_every // program.evals_per_chunk
    start = time.perf_counter()
    for r in range(n_runs):
        hp = jax.device_put(train.hparams_for(sweep, np.array([r])), program.sharding)
        state = program.init(hp)
        for c in range(n_chunks):
            state, metrics = chunk(state, hp, train.first_evals(1, c * program.evals_per_chunk))
            np.asarray(metrics)  # the same per-chunk host transfer the engine makes
    return compile_s, time.perf_counter() - start


def measure(workload: str, n_runs: int, steps: int, eval_every: int, contenders, loop_runs: int, repeats: int,
            precision: str = "float32") -> dict:
    """One row of the benchmark: every contender on one workload and run count. The jaxgrok
    contenders and jax_loop compute at `precision`; the torch ones in float32."""
    sweep = workload_sweep(workload, n_runs, steps, eval_every, precision=precision)
    w = WORKLOADS[workload]
    table = tasks.make_table(sweep.static.task)
    torch_mod = None
    if any(c.startswith("torch") for c in contenders):
        try:
            from jaxgrok import bench_torch as torch_mod
        except ImportError:
            print("torch is not installed (pip install -e '.[bench]'): skipping torch_loop and torch_vmap")
    rates: dict[str, dict] = {}
    k = min(n_runs, loop_runs)
    for _ in range(repeats):
        for c in contenders:
            if c.startswith("torch") and torch_mod is None:
                continue
            if c in MEASURES:
                res = engine.train_sweep(workload_sweep(workload, n_runs, steps, eval_every, c, precision))
                entry = {"model_steps_per_s": n_runs * steps / res.train_s, "compile_s": res.compile_s, "runs_timed": n_runs,
                         "runs_per_batch": res.runs_per_batch, "batch_bytes_per_device": res.batch_bytes}
            elif c == "jax_loop":
                compile_s, secs = _jax_loop_seconds(sweep, k)
                entry = {"model_steps_per_s": k * steps / secs, "compile_s": compile_s, "runs_timed": k}
            else:
                fn = getattr(torch_mod, c)
                timed = k if c == "torch_loop" else n_runs
                secs = fn(sweep.static, table, sweep.static.n_train_max, timed, w["learning_rate"], w["weight_decay"])
                entry = {"model_steps_per_s": timed * steps / secs, "runs_timed": timed}
            best = rates.get(c)
            if best is None or entry["model_steps_per_s"] > best["model_steps_per_s"]:
                rates[c] = entry
    flops = flops_per_model_step(sweep)
    row = {"workload": workload, "runs": n_runs, "steps": steps, "eval_every": eval_every, "precision": precision,
           "contenders": rates, "flops_per_model_step": flops, "device": device_name(), "jax_version": jax.__version__}
    if "jaxgrok" in rates:
        jg = rates["jaxgrok"]["model_steps_per_s"]
        row["achieved_flops"] = flops * jg
        row["ratios"] = {f"jaxgrok/{c}": jg / r["model_steps_per_s"] for c, r in rates.items() if c != "jaxgrok"}
        program = train.make_program(sweep.static)
        row["memory_per_run_bytes_estimate"] = memory.bytes_per_run(sweep.static, program)
        if (batch := rates["jaxgrok"].get("batch_bytes_per_device")) is not None:  # as XLA reports it
            row["memory_per_run_bytes_xla"] = batch * program.sharding.mesh.size / rates["jaxgrok"]["runs_per_batch"]
        stats = jax.devices()[0].memory_stats() if jax.devices()[0].platform != "cpu" else None
        if stats and "peak_bytes_in_use" in stats:
            row["peak_memory_per_run_bytes"] = stats["peak_bytes_in_use"] / n_runs
    return row


def format_row(row: dict) -> str:
    """One benchmark row as a line: each contender's model-steps per second, the ratios, the fraction of the ceiling."""
    parts = [f"{row['workload']:>5} runs={row['runs']:<5}"]
    for c in CONTENDERS:
        if c in row["contenders"]:
            parts.append(f"{c} {row['contenders'][c]['model_steps_per_s']:>10,.0f}")
    if "ratios" in row:
        parts.append(" ".join(f"×{v:.1f} vs {k.split('/')[1]}" for k, v in row["ratios"].items()))
        parts.append(f"{row['achieved_flops'] / 1e9:.1f} GFLOP/s = {row['fraction_of_ceiling']:.0%} of ceiling")
    return " | ".join(parts)


def run(workloads, runs, steps, eval_every, contenders, loop_runs, repeats, json_path=None,
        precision: str = "float32") -> list[dict]:
    """The benchmark: every workload at every run count, one row each (printed, and written to `json_path`)."""
    # The ceiling is measured again before every row and the best reading kept, so that a noisy
    # moment cannot inflate the fraction of it that jaxgrok reaches.
    ceiling = matmul_ceiling(precision=precision)
    print(f"device: {device_name()}; JAX {jax.__version__}; {precision} matmul ceiling {ceiling / 1e9:.1f} GFLOP/s")
    print("model-steps per second (steps × runs / training seconds, compile apart), best of "
          f"{repeats}; {steps} steps, evaluation every {eval_every}")
    rows = []
    for w in workloads:
        for n in runs:
            ceiling = max(ceiling, matmul_ceiling(precision=precision))
            row = measure(w, n, steps, eval_every, contenders, loop_runs, repeats, precision)
            row["matmul_ceiling_flops"] = ceiling = max(ceiling, matmul_ceiling(precision=precision))
            if "achieved_flops" in row:
                row["fraction_of_ceiling"] = row["achieved_flops"] / ceiling
            print(format_row(row), flush=True)
            rows.append(row)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"wrote {json_path}")
    return rows
