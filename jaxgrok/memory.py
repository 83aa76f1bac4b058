"""What a batch of runs costs on a device, and how many runs go into one.

An analytic estimate (`bytes_per_run`) gives a first batch size and the refusal of a sweep of which
not one run fits (`check_fits`, before anything is built or written); then what XLA says the
compiled programs need decides (`fit`: a few shape-only compiles, once per sweep). The budget is
the device's limit or $JAXGROK_MEMORY_BUDGET (`memory_budget`). `flops_per_step` is the compute
counterpart of the estimate, for `jaxgrok list` and the benchmark.
"""

from __future__ import annotations

import dataclasses
import os

import jax

from jaxgrok import models, tasks, train
from jaxgrok.sweep import Static, Sweep, SweepError


def bytes_per_run(static: Static, program: train.Program) -> int:
    """A generous estimate of one run's device memory: params, initial params, AdamW moments,
    gradients and update (6×), the split, and the activations of a forward and backward pass (3×)
    over the larger of the training batch and the full evaluation table; with the LLC, each chain's
    weights, gradient and noise (3× params) and its minibatch's activations."""
    n_params = models.n_params(jax.eval_shape(program.model.init, jax.random.key(0)))
    n_pairs = len(program.table.targets)
    activations = program.model.activations(max(n_pairs, static.n_train_max))
    m = static.measures
    if m.llc:
        batch = m.llc_batch_size if 0 < m.llc_batch_size < static.n_train_min else static.n_train_max
        activations += m.llc_chains * (3 * n_params + 3 * program.model.activations(batch))
    return 4 * (6 * n_params + _filter_copies(static) * n_params + 3 * activations) + 8 * n_pairs


def _filter_copies(static: Static) -> int:
    """Copies of the parameters that the Grokfast filter keeps: its EMA, or the MA's window."""
    if not static.grokfast:
        return 0
    return static.train.grokfast_window if static.train.grokfast_filter == "ma" else 1


def flops_per_step(static: Static) -> float:
    """Analytic matmul FLOPs of one run's training step (the forward pass ×3, for the backward pass,
    over its batch) plus its evaluation on the full table amortised over `eval_every` steps."""
    size = tasks.sizes(static.task)
    model = models.build(static.model, size.n_symbols, size.n_classes, size.n_inputs)
    batch = static.train.batch_size or static.n_train_max
    return 3 * model.forward_flops(batch) + model.forward_flops(size.n_pairs) / static.train.eval_every


class TooLarge(SweepError):
    """Not even one run per device fits in the device's memory budget; the message is one line."""


def _least_parts(static: Static, model_cfg=None) -> tuple[int, int]:
    """(parameters with their initial copy and two AdamW moments: 16 bytes each, the logits of an
    evaluation over the whole table) of one run, counted without building anything."""
    size = tasks.sizes(static.task)
    model = models.build(model_cfg or static.model, size.n_symbols, size.n_classes, size.n_inputs)
    n_params = models.n_params(jax.eval_shape(model.init, jax.random.key(0)))
    return (16 + 4 * _filter_copies(static)) * n_params, 4 * size.n_pairs * size.n_classes


def least_bytes_per_run(static: Static) -> int:
    """What one run needs at the very least, counted without building anything: its parameters,
    initial parameters and two AdamW moments (16 bytes a parameter), and the logits of an
    evaluation over the whole table."""
    return sum(_least_parts(static))


def size_keys(static: Static) -> str:
    """The keys that make one run large, as a message names them ("model.d_hidden = 1,000,000,000"):
    task.p where the evaluation's logits (p² pairs × p classes) outweigh the parameters, else each
    integer key of [model] whose halving shrinks the parameters by a quarter or more, largest effect
    first (all of [model]'s integer keys where none does)."""
    params, logits = _least_parts(static)
    task_keys = [f"task.{f.name} = {getattr(static.task, f.name):,}" for f in dataclasses.fields(static.task)
                 if f.type in (int, "int")]
    if logits > params and task_keys:
        return ", ".join(task_keys)
    effects = []
    for f in dataclasses.fields(static.model):
        value = getattr(static.model, f.name)
        if f.type not in (int, "int") or value < 2:
            continue
        try:  # a halved size the model refuses (heads that no longer divide the width) says nothing
            smaller = _least_parts(static, dataclasses.replace(static.model, **{f.name: value // 2}))[0]
        except Exception:  # noqa: BLE001 - a registered model's own checks raise their own kinds
            continue
        effects.append((params - smaller, f"model.{f.name} = {value:,}"))
    effects.sort(reverse=True)
    large = [name for cut, name in effects if cut >= params / 4]
    return ", ".join(large or [name for _, name in effects])


def check_fits(sweep: Sweep, budget: int) -> None:
    """Refuse, before anything is built or written, a sweep of which not one run can fit."""
    params, logits = _least_parts(sweep.static)
    if params + logits > budget:
        raise TooLarge(f"{sweep.path}: {size_keys(sweep.static)}: one run needs at least {human_bytes(params + logits)} "
                       f"(parameters and optimizer state {human_bytes(params)}, the evaluation's logits "
                       f"{human_bytes(logits)}), more than the budget of {human_bytes(budget)} per device")


def memory_budget() -> int:
    """Bytes of one device that a batch may use: $JAXGROK_MEMORY_BUDGET if set (a number of bytes:
    to share a GPU, or to test the fallback on CPU), else 85% of what the accelerator reports as its
    limit, or an even share of 40% of host RAM among the CPU devices."""
    if (forced := os.environ.get("JAXGROK_MEMORY_BUDGET")) is not None:
        try:
            value = float(forced)
        except ValueError:
            value = float("nan")
        if not value >= 1:  # also refuses nan
            raise SweepError(f"JAXGROK_MEMORY_BUDGET: must be a number of bytes ≥ 1, got {forced!r}")
        return int(value)
    device = jax.local_devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] * 0.85)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(ram * 0.4) // max(1, len(jax.local_devices()))


def runs_per_batch(static: Static, program: train.Program, n_runs: int, budget: int) -> int:
    """The first guess at the runs trained together, from the analytic estimate: all of them if
    they fit, else what fits; a multiple of the devices. (The engine then corrects it with what XLA
    says the compiled program needs.)"""
    n_dev = program.sharding.mesh.size
    if static.train.max_runs_per_batch:
        per_device = max(1, static.train.max_runs_per_batch // n_dev)
    else:
        per_device = max(1, budget // bytes_per_run(static, program))
    per_device = min(per_device, -(-n_runs // n_dev))
    return per_device * n_dev


def human_bytes(n: float) -> str:
    """`n` bytes for people: GiB, MiB or KiB with one decimal, else bytes."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def batch_bytes(init, chunk, metrics_bytes: int) -> int | None:
    """Bytes one device needs for a batch, from XLA's analysis of the compiled programs: arguments,
    outputs (less what donation aliases) and temporaries of the larger of `init` and `chunk`, plus
    `metrics_bytes` for the next chunk's metrics, which are allocated before this chunk's are read.
    None where the backend does not report it."""
    needs = []
    for compiled in (init, chunk):
        try:
            m = compiled.memory_analysis()
        except (NotImplementedError, RuntimeError):
            return None
        if m is None:
            return None
        needs.append(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                     + m.temp_size_in_bytes + m.generated_code_size_in_bytes)
    return max(needs) + metrics_bytes


def metrics_bytes(program: train.Program, runs_per_device: int) -> int:
    """The bytes of one chunk's metrics on a device."""
    return runs_per_device * program.evals_per_chunk * len(train.METRICS) * 4


def compile_batch(program: train.Program, per_batch: int):
    """Both programs compiled ahead for batches of `per_batch` runs, from shapes alone: nothing is
    allocated on the device before we know that the batch fits."""
    hp, state = train.abstract_inputs(program, per_batch)
    init = program.init.lower(hp).compile()
    chunk = program.chunk.lower(state, hp, train.abstract_first_evals(program, per_batch)).compile()
    return init, chunk


def fit(program: train.Program, static, n_runs: int, budget: int, where: str = "sweep"):
    """(runs per batch, compiled init, compiled chunk, bytes per device) for batches that fit in
    `budget` bytes per device. The analytic estimate gives a first size; then what XLA says the
    compiled program needs (where the backend says it) decides: a line through two sizes' needs
    (fixed costs such as the task table and the code, plus a cost per run) gives the largest batch
    that fits. A few compiles at most, once per sweep."""
    n_dev = program.sharding.mesh.size
    per_device = runs_per_batch(static, program, n_runs, budget) // n_dev
    everything = -(-n_runs // n_dev)
    points: list[tuple[int, int]] = []  # (runs per device, bytes it needs)
    while True:
        init, chunk = compile_batch(program, per_device * n_dev)
        need = batch_bytes(init, chunk, metrics_bytes(program, per_device))
        if need is None or static.train.max_runs_per_batch:
            return per_device * n_dev, init, chunk, need
        if need > budget and per_device == 1:
            raise TooLarge(f"{where}: {size_keys(static)}: one run needs {human_bytes(need)} of device memory, more "
                           f"than the budget of {human_bytes(budget)} per device (JAXGROK_MEMORY_BUDGET, or the device's limit)")
        points.append((per_device, need))
        if len(points) >= 2:
            (n0, b0), (n1, b1) = points[-2:]
            per_run = max((b1 - b0) / (n1 - n0), 1.0)
            target = int((budget - (b1 - per_run * n1)) // per_run)
        else:  # one point: fixed costs counted per run, an underestimate of what fits
            target = int(budget // (need / per_device))
            if need <= budget and target <= per_device < everything:
                target = 2 * per_device  # a second size, to tell fixed costs from costs per run
        target = max(1, min(everything, target))
        if need <= budget and (target <= per_device or len(points) >= 4):
            return per_device * n_dev, init, chunk, need
        per_device = min(target, per_device - 1) if need > budget else target


def out_of_memory(error: Exception) -> bool:
    """Whether an XLA error says the device ran out of memory (at allocation or while running). A
    failed write (a full disk says RESOURCE_EXHAUSTED too, through tensorstore) never does."""
    if isinstance(error, OSError):
        return False
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()
