"""Parquet output: schemas, metadata, nulls for censored runs, atomic files, the CLI end to end."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import write_sweep

from jaxgrok import results
from jaxgrok.cli import main


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    sweep = write_sweep(out / "tiny.toml", train={"steps": 600, "eval_every": 50, "chunk_steps": 200},
                        sweep={"seed": {"count": 3}, "weight_decay": [0.0, 1.0], "learning_rate": 1e-2,
                               "train_fraction": 0.6})
    assert main(["run", str(sweep), "--out", str(out / "res"), "--set", "steps=800"]) == 0
    return out / "res"


def test_runs_round_trip_with_schema_and_metadata(results_dir):
    table = pq.read_table(results_dir / "runs.parquet")
    assert table.schema.remove_metadata() == results.RUNS_SCHEMA
    meta = table.schema.metadata
    sweep = json.loads(meta[b"jaxgrok.sweep"])
    assert sweep["train"]["steps"] == 800 and sweep["name"] == "tiny"  # the override, resolved
    assert "jax" in json.loads(meta[b"jaxgrok.versions"])
    assert table.num_rows == 6
    rows = table.to_pylist()
    assert [r["run_id"] for r in rows] == list(range(6))
    for r in rows:
        assert r["censored"] == (r["t_val"] is None)
        assert r["delay"] is None or r["delay"] == r["t_val"] - r["t_train"]
        assert r["phase"] in ("comprehension", "grokking", "memorization", "confusion")
        assert r["steps"] == 800 and r["n_train"] == round(0.6 * 961)
    assert len({r["run_hash"] for r in rows}) == 6


def test_curves_long_format(results_dir):
    table = results.read(results_dir / "curves.parquet", "curves")
    assert table.schema.remove_metadata() == results.CURVES_SCHEMA
    assert table.num_rows == 6 * 16
    df = table.to_pandas()
    assert sorted(df["step"].unique()) == list(range(50, 801, 50))
    runs = pq.read_table(results_dir / "runs.parquet").to_pandas()
    last = df[df["step"] == 800].sort_values("run_id")
    np.testing.assert_allclose(last["val_acc"].to_numpy(), runs["final_val_acc"].to_numpy())


def test_pandas_reads_the_files_as_they_are(results_dir):
    import pandas as pd

    runs = pd.read_parquet(results_dir / "runs.parquet")
    assert runs["t_val"].isna().sum() == runs["censored"].sum()
    assert not list(results_dir.glob(".*tmp"))  # no temporary files left behind


def test_read_rejects_foreign_parquet(tmp_path):
    import pyarrow as pa

    pq.write_table(pa.table({"x": [1, 2]}), tmp_path / "runs.parquet")
    with pytest.raises(results.ResultsError, match="not a jaxgrok runs table"):
        results.read(tmp_path / "runs.parquet", "runs")
    with pytest.raises(results.ResultsError, match="no such file"):
        results.read(tmp_path / "missing.parquet", "runs")
