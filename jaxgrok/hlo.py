"""What the vmapped chunk compiles to: an audit of its HLO for the kernels that a run axis can spoil.

`jaxgrok bench --hlo` prints, for each workload, the operations of the chunk as JAX lowers it (the
same on every backend) and as this backend's compiler leaves it:
- matmuls: every `dot_general` should carry the run axis as a batch dimension, one batched matmul
  for all runs, never a loop of small per-run ones;
- gathers (embedding look-ups) and the scatter-adds their gradients become;
- transposes that einsum layouts force, and copies;
- softmax: exponentials outside a fusion mean the softmax was not fused;
- on GPUs, the library matmul calls (cuBLAS custom calls) and fusions, i.e. kernel launches.
"""

from __future__ import annotations

import collections
import re

import jax

from jaxgrok import train

LOWERED_OPS = ("dot_general", "gather", "scatter", "transpose", "while", "exponential", "reduce", "convert")


def lowered_ops(text: str) -> collections.Counter:
    """Operation counts of StableHLO text."""
    return collections.Counter(re.findall(r"= \"?stablehlo\.([a-z_]+)", text))


def dots_over_runs(text: str, n_runs: int) -> tuple[int, int, int]:
    """(matmuls, of which one for all runs, of which batched over the run axis) in StableHLO text.
    One matmul serves all runs where an operand leads with the run axis: as a batch dimension, or
    folded into the rows against a shared operand (a constant such as the Fourier basis). A matmul
    with no operand leading with it would be one run's, inside a loop over runs."""
    total = over = batched = 0
    for line in re.findall(r"stablehlo\.dot_general[^\n]*", text):
        total += 1
        leading = [int(s) for s in re.findall(r"tensor<(\d+)x", line)[:2]]
        over += n_runs in leading
        dims = re.search(r"batching_dims = \[(\d+)", line)
        batched += bool(dims and dims.group(1) == "0" and leading and leading[0] == n_runs)
    return total, over, batched


def compiled_ops(text: str) -> collections.Counter:
    """Top-level operation counts of optimized HLO text (instructions inside fusions counted apart
    as `fused:<op>`), and library calls as `custom-call:<target>`."""
    counts: collections.Counter = collections.Counter()
    fused = False
    for line in text.splitlines():
        if line.startswith(("%fused", "fused_")) or re.match(r"^%?\S*fus\S* ", line):
            fused = True
        elif line and not line.startswith(" "):
            fused = False
        m = re.search(r"= \S+ ([a-z][a-z\-]*)\(", line)
        if not m:
            continue
        op = m.group(1)
        if op == "custom-call" and (t := re.search(r'custom_call_target="([^"]+)"', line)):
            op = f"custom-call:{t.group(1)}"
        counts[f"fused:{op}" if fused else op] += 1
    return counts


def audit(sweep, n_runs: int = 8) -> dict:
    """The audit of a sweep's vmapped chunk for `n_runs` runs on one device of this backend."""
    program = train.make_program(sweep.static, jax.devices()[:1], vectorize=True)
    hp, state = train.abstract_inputs(program, n_runs)
    lowered = program.chunk.lower(state, hp, train.first_evals(n_runs))
    text = lowered.as_text()
    dots, over, batched = dots_over_runs(text, n_runs)
    compiled = compiled_ops(lowered.compile().as_text())
    ops = lowered_ops(text)
    return {
        "runs": n_runs, "backend": jax.devices()[0].platform,
        "lowered": {op: ops.get(op, 0) for op in LOWERED_OPS},
        "matmuls": dots, "matmuls_over_all_runs": over, "matmuls_batched_over_runs": batched,
        "compiled": {k: v for k, v in compiled.most_common() if k.split(":")[-1] in (
            "dot", "gather", "scatter", "transpose", "copy", "fusion", "exponential", "while")
            or k.startswith("custom-call")},
    }


def format_audit(name: str, a: dict) -> str:
    """An audit (`audit`) as the lines `jaxgrok bench --hlo` prints."""
    lines = [f"{name}: vmapped chunk for {a['runs']} runs ({a['backend']})",
             (f"  matmuls: {a['matmuls']}, each for all runs: {a['matmuls_over_all_runs']}, "
              f"of which batched over the run axis: {a['matmuls_batched_over_runs']}"),
             "  lowered: " + ", ".join(f"{k} {v}" for k, v in a["lowered"].items()),
             "  compiled: " + ", ".join(f"{k} {v}" for k, v in a["compiled"].items())]
    return "\n".join(lines)
