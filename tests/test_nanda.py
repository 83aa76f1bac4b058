"""Nanda et al.'s restricted and excluded losses with each run's final key frequencies (analysis/nanda.py):
a second pass that retrains the runs, checked against a direct computation and against the curves."""

import jax.numpy as jnp
import numpy as np
import pyarrow.parquet as pq
from conftest import make_raw, write_raw

from jaxgrok import engine, models, tasks, train
from jaxgrok.analysis import analyze, nanda
from jaxgrok.cli import main
from jaxgrok.measures import fourier
from jaxgrok.sweep import sweep_from_dict

RAW = make_raw(train={"steps": 150, "eval_every": 50, "chunk_steps": 100, "max_runs_per_batch": 4},
               sweep={"seed": [0, 1, 2], "weight_decay": 1.0, "learning_rate": 1e-2, "train_fraction": 0.5})


def test_the_second_pass_is_the_runs_and_uses_the_keys_it_is_given():
    """At every evaluation, the losses equal restricted_losses computed on the run's parameters there
    (retrained alone) with the frequencies given, a different number per run; the replay's training
    loss is the sweep's, bit for bit."""
    sweep = sweep_from_dict(RAW, "s.toml")
    keys = [[3, 7], [1], [2, 5, 11]]
    values, metrics = nanda.losses(sweep, np.arange(3), keys, batch=2)  # two batches, padded differently
    result = engine.train_sweep(sweep)
    np.testing.assert_array_equal(metrics[..., 0], result.curves["train_loss"])
    table = tasks.make_table(sweep.static.task)
    model = models.build(sweep.static.model, table.n_symbols, table.n_classes)
    basis = jnp.asarray(fourier.basis(table.n_symbols))
    loss = lambda logits, y: train.per_example_loss("cross_entropy", table.n_classes, logits, y)  # noqa: E731
    program, hp = engine._replay_program(sweep, np.arange(3))
    is_train = np.asarray(program.init(hp).is_train)
    for run in range(3):
        for e, params in enumerate(engine.params_at(sweep, run, [50, 100, 150]).values()):
            want = fourier.restricted_losses(model.apply(params, jnp.asarray(table.inputs)), jnp.asarray(table.targets),
                                             jnp.asarray(is_train[run]), jnp.asarray(np.array(keys[run]) - 1), basis, loss)
            np.testing.assert_allclose(values[run, e], np.asarray(want), rtol=1e-5)


def test_analyze_final_keys_writes_the_losses_and_the_signatures(tmp_path):
    out = tmp_path / "out"
    path = write_raw(tmp_path / "s.toml", RAW)
    assert main(["run", str(path), "--out", str(out), "--quiet", "--no-analyze"]) == 0
    a = analyze(out, final_keys=True)
    assert a.nanda_exact is True  # on CPU the second pass is the runs
    written = pq.read_table(out / "curves.parquet")
    assert a.tables["final_key_losses"].num_rows == written.num_rows
    assert [r["signature"].split(" ")[0] for r in a.nanda] == ["restricted", "excluded", "weight", "key"]
    assert main(["analyze", str(out), "--final-keys"]) == 0
    assert (out / "final_key_losses.parquet").exists()
    assert "final key frequencies" in (out / "report.html").read_text()


def test_final_keys_is_refused_where_it_is_not_defined(tmp_path, capsys):
    out = tmp_path / "out"
    raw = make_raw(task={"op": "x*y", "p": 31}, train={"steps": 50, "eval_every": 50, "chunk_steps": 50},
                   sweep={"seed": 0, "weight_decay": 1.0, "learning_rate": 1e-2, "train_fraction": 0.5})
    assert main(["run", str(write_raw(tmp_path / "s.toml", raw)), "--out", str(out), "--quiet", "--no-analyze"]) == 0
    assert main(["analyze", str(out), "--final-keys"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--final-keys" in err[0] and "x+y and x-y" in err[0]
    assert not (out / "final_key_losses.parquet").exists()
