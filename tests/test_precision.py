"""[train] precision: in the run hash and the results, and what each choice compiles to."""

import json
import re

import jax
import numpy as np
import pyarrow.parquet as pq
import pytest

from jaxgrok import engine, results, train
from jaxgrok.analysis.compare import compare, format_comparison
from jaxgrok.store import Store


def _chunk_text(sweep) -> str:
    program = train.make_program(sweep.static, jax.devices()[:1])
    hp, state = train.abstract_inputs(program, 1)
    return program.chunk.lower(state, hp, train.first_evals(1)).as_text()


def test_precision_is_in_the_run_hash_but_float32_keeps_the_old_one(tiny_sweep):
    plain = tiny_sweep()
    assert plain.resolved["train"]["precision"] == "float32"  # the metadata says it
    explicit = tiny_sweep(train={"precision": "float32"})
    assert explicit.run_hashes == plain.run_hashes
    tf32, bf16 = tiny_sweep(train={"precision": "tf32"}), tiny_sweep(train={"precision": "bfloat16"})
    assert len({tuple(s.run_hashes) for s in (plain, tf32, bf16)}) == 3


@pytest.mark.parametrize("precision,dots,bf16", [("float32", {"HIGHEST"}, False), ("tf32", {"HIGH"}, False),
                                                 ("bfloat16", {"HIGHEST"}, True)])
def test_what_each_precision_compiles_to(tiny_sweep, precision, dots, bf16):
    """float32 asks for true float32 matmuls (JAX would let a GPU use TF32); tf32 for TF32 in the
    model (the measures' own projections stay float32); bfloat16 computes the model in bfloat16."""
    text = _chunk_text(tiny_sweep(train={"precision": precision}))
    seen = set(re.findall(r"precision = \[(\w+), \w+\]", text))
    assert dots <= seen and ("HIGH" in seen) == (precision == "tf32")
    model_dots = [d for d in re.findall(r"stablehlo\.dot_general[^\n]*", text) if "bf16" in d]
    assert bool(model_dots) == bf16


def test_bfloat16_trains_with_float32_state_is_written_as_such_and_compared(tiny_sweep, tmp_path):
    off = {"dist_from_init": False, "fourier": False, "circularity": False, "restricted_loss": False}
    sweeps = {p: tiny_sweep(train={"precision": p, "steps": 100, "eval_every": 50}, measures=off)
              for p in ("float32", "bfloat16")}
    program = train.make_program(sweeps["bfloat16"].static, jax.devices()[:1])
    _, state = train.abstract_inputs(program, 1)
    floats = [x.dtype for x in jax.tree.leaves((state.params, state.opt_state)) if jax.numpy.issubdtype(x.dtype, jax.numpy.floating)]
    assert floats and set(floats) == {np.dtype("float32")}  # parameters and optimizer state
    curves = {}
    for precision, sweep in sweeps.items():
        store = Store(tmp_path / precision, sweep)
        curves[precision] = engine.train_sweep(sweep, store=store).curves["train_loss"]
        store.merge()
        runs = pq.read_table(tmp_path / precision / "runs.parquet")
        assert set(runs.column("precision").to_pylist()) == {precision}
        assert results.sweep_config(runs)["train"]["precision"] == precision
    # bfloat16 trains, and not bit for bit as float32 does (else it would not be in use).
    assert np.isfinite(curves["bfloat16"]).all() and not np.array_equal(curves["bfloat16"], curves["float32"])
    np.testing.assert_allclose(curves["bfloat16"], curves["float32"], rtol=0.05)
    c = compare(tmp_path / "float32", tmp_path / "bfloat16")
    assert c["differences"] == {"train.precision": ("float32", "bfloat16")}
    p = c["paired"]  # the same six runs in both
    assert p["n"] == 6 and p["later"] + p["earlier"] + p["same"] + p["both_censored"] == 6
    text = format_comparison(c)
    assert "train.precision = 'float32' (A) vs 'bfloat16' (B)" in text and "log-rank" in text


def test_an_old_runs_table_reads_as_float32():
    import pyarrow as pa

    row = {f.name: pa.array([None], f.type) for f in results.RUNS_SCHEMA if f.name != "precision"}
    upgraded = results.upgrade_runs(pa.table(row))
    assert upgraded.column_names == results.RUNS_SCHEMA.names
    assert upgraded.column("precision").to_pylist() == ["float32"]
    # An axis that is also a [train] key takes that key's value from the table's own sweep.
    del row["batch_size"]
    table = pa.table(row).replace_schema_metadata({b"jaxgrok.sweep": json.dumps({"train": {"batch_size": 128}})})
    assert results.upgrade_runs(table).column("batch_size").to_pylist() == [128]
    assert results.upgrade_runs(pa.table(row)).column("batch_size").to_pylist() == [0]


def test_float64_trains_in_float64_inside_its_own_scope(tiny_sweep):
    """x64 mode for a float64 sweep's program only: its weights and optimizer state are float64, its
    curves differ from float32's in the last bits and not more early on, its hash is its own, and
    JAX stays in float32 outside it."""
    # Plain gradient descent: Adam's first steps are about lr·sign(g), which turns rounding in the
    # gradient's near-zero components into whole steps; gradient descent keeps it at rounding's size.
    cfg = {"steps": 10, "eval_every": 5, "chunk_steps": 10, "optimizer": "sgd"}
    f32, f64 = tiny_sweep(train=cfg), tiny_sweep(train={**cfg, "precision": "float64"})
    assert not set(f32.run_hashes) & set(f64.run_hashes)
    a, b = engine.train_sweep(f32, devices=jax.devices()[:1]), engine.train_sweep(f64, devices=jax.devices()[:1])
    assert not jax.config.jax_enable_x64  # scoped: nothing leaks into the process
    params = engine.params_at(f64, 0, [5])[5]
    assert {np.asarray(w).dtype for w in jax.tree.leaves(params)} == {np.dtype("float64")}
    loss_a, loss_b = a.curves["train_loss"], b.curves["train_loss"]
    assert not np.array_equal(loss_a, loss_b)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)  # the same runs, rounded apart
    with pytest.raises(RuntimeError, match="x64"):  # the program refuses to be built outside its scope
        train.make_program(f64.static)


def test_float64_on_a_tpu_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
    from types import SimpleNamespace

    from jaxgrok.cli import main

    real = jax.devices
    monkeypatch.setattr(jax, "devices", lambda *a: [SimpleNamespace(platform="tpu")] if not a else real(*a))
    out = tmp_path / "out"
    assert main(["run", "sweeps/quickstart.toml", "--set", "precision=float64", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.precision: float64 is not supported on TPU" in err[0] and not out.exists()
