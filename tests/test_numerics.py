"""The softmax numerics (Prieto et al. 2025): the collapse, exact-zero losses and the cosine of naive
loss minimisation, on logits whose answers are known; and a measure added later keeps every stored run."""

import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_raw, write_raw

from jaxgrok import cli, measures, train
from jaxgrok.measures import numerics
from jaxgrok.sweep import sweep_from_dict

ALL = jnp.ones(1, bool)


def _ce(z, y):
    return train.per_example_loss("cross_entropy", z.shape[-1], z, y)


@pytest.mark.parametrize("n_classes", [2, 11, 97])
def test_softmax_collapses_exactly_past_the_float32_gap(n_classes):
    # 1 + Σ e^(−gap) rounds to 1 in float32 once the terms are below half of 1's ulp, 2⁻²⁴: past a gap
    # of 24·ln 2 + ln(C − 1) = 16.6 + ln(C − 1) whatever the order of the sum, never below 16.6 (the
    # largest term alone would count); in between it depends on the order XLA sums in.
    above, below = 24 * np.log(2) + np.log(n_classes - 1) + 1.0, 24 * np.log(2) - 1.0
    for gap, collapsed in ((above, 1.0), (below, 0.0)):
        z = jnp.zeros((1, n_classes), jnp.float32).at[0, 0].set(gap)
        assert float(numerics.softmax_collapse(z, ALL)) == collapsed, (n_classes, gap)
        # A collapsed pair's loss is exactly 0; the loss can round to 0 sooner (log S is absorbed
        # by the largest logit), so zero losses are at least as many.
        zero = float(numerics.zero_loss_frac(_ce(z, jnp.zeros(1, int)), ALL))
        assert zero == 1.0 if collapsed else zero >= collapsed


def test_only_training_pairs_count():
    z = jnp.asarray([[40.0, 0.0], [1.0, 0.0], [1.0, 0.0], [40.0, 0.0]], jnp.float32)
    is_train = jnp.asarray([True, True, False, False])
    assert float(numerics.softmax_collapse(z, is_train)) == 0.5


def test_nlm_cosine_is_one_for_two_classes_and_the_centred_formula_above():
    z = jnp.asarray([[2.0, -2.0], [0.3, -0.3]], jnp.float32)  # two classes: the gradient is along z − z̄
    y = jnp.zeros(2, int)
    assert np.allclose(float(numerics.nlm_cosine(z, y, jnp.ones(2, bool), _ce)), 1.0, atol=1e-6)
    rng = np.random.default_rng(0)
    z = rng.normal(size=(50, 7)).astype(np.float32)
    y = rng.integers(0, 7, 50)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    g = p - np.eye(7)[y]  # ∂CE/∂z
    c = z - z.mean(1, keepdims=True)
    want = np.mean(np.sum(-g * c, 1) / (np.linalg.norm(g, axis=1) * np.linalg.norm(c, axis=1)))
    got = numerics.nlm_cosine(jnp.asarray(z), jnp.asarray(y), jnp.ones(50, bool), _ce)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_a_measure_added_later_keeps_every_hash_and_every_stored_run(tmp_path, capsys):
    raw = make_raw(train={"steps": 100, "eval_every": 50, "chunk_steps": 100, "max_runs_per_batch": 8})
    assert "numerics" in {m.switch for m in measures.MEASURES if m.later}
    off, on = sweep_from_dict(raw), sweep_from_dict({**raw, "measures": {"numerics": True}})
    assert not set(off.run_hashes) & set(on.run_hashes)  # on: recorded columns of its own
    out, path = tmp_path / "out", write_raw(tmp_path / "s.toml", raw)
    args = ["run", str(path), "--out", str(out), "--no-analyze", "--quiet"]
    assert cli.main(args) == 0
    for part in (out / "parts").glob("curves-*.parquet"):  # as a version before the measure wrote it
        table = pq.read_table(part)
        pq.write_table(table.drop_columns(list(measures.LATER_COLUMNS)), part, write_page_checksum=True)
    (out / "runs.parquet").unlink()
    capsys.readouterr()
    assert cli.main(["run", str(path), "--out", str(out), "--no-analyze"]) == 0
    assert "6 runs were already done" in capsys.readouterr().out  # merged, none retrained
    curves = pq.read_table(out / "curves.parquet")
    assert all(curves.column(c).null_count == curves.num_rows for c in measures.LATER_COLUMNS)
    assert curves.schema.field("nlm_cosine").type == pa.float32()
