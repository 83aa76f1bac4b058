"""The researcher's day: the Python API, overrides that keep the original results, know before you run."""

import pyarrow.parquet as pq
import pytest
from conftest import make_raw, write_raw

import jaxgrok
from jaxgrok.cli import main
from jaxgrok.sweep import SweepError

TRAIN = {"steps": 200, "eval_every": 50, "chunk_steps": 100, "max_runs_per_batch": 8}


def test_run_from_a_dict_and_load_give_the_parquet_files_as_frames(tmp_path):
    raw = make_raw(train=TRAIN)
    res = jaxgrok.run(raw, set={"learning_rate": 3e-3}, out=tmp_path / "out")
    assert res.sweep["sweep"]["learning_rate"] == 3e-3 and len(res.runs) == 6
    for name in ("runs", "curves", "stats"):
        assert res.table(name).equals(pq.read_table(tmp_path / "out" / f"{name}.parquet"))
        assert res.pandas(name).equals(pq.read_table(tmp_path / "out" / f"{name}.parquet").to_pandas())
    again = jaxgrok.load(tmp_path / "out")
    assert again.curves.equals(res.curves) and "6 runs" in repr(again)
    # The same resume as the command: nothing is trained twice.
    assert jaxgrok.run(raw, set=["learning_rate=3e-3"], out=tmp_path / "out").runs.equals(res.runs)
    with pytest.raises(SweepError, match="model.kind"):
        jaxgrok.run({**raw, "model": {"kind": "nope"}}, out=tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_polars_reads_the_same_frames(tmp_path):
    pl = pytest.importorskip("polars")
    jaxgrok.run(make_raw(train=TRAIN), out=tmp_path / "out", analyze=False)
    assert jaxgrok.load(tmp_path / "out").polars("runs").equals(pl.read_parquet(tmp_path / "out" / "runs.parquet"))


def test_an_overridden_sweep_leaves_the_original_results_untouched(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    sweep = write_raw(tmp_path / "tiny.toml", make_raw(train=TRAIN))
    assert main(["run", str(sweep), "--no-analyze", "--quiet"]) == 0
    original = {p: p.read_bytes() for p in (tmp_path / "results" / "tiny").glob("*.parquet")}
    assert main(["run", str(sweep), "--no-analyze", "--set", "steps=100", "--set", "weight_decay=[1, 2, 3]"]) == 0
    said = capsys.readouterr().out
    assert "with --set: results in results/tiny-set-" in said and "results/tiny keeps" in said
    # Progress: compiling is said to be over before the first chunk ends; then elapsed and left.
    lines = said.splitlines()
    first = next(i for i, ln in enumerate(lines) if "model-steps ·" in ln)
    assert any(ln.startswith("compiled in ") for ln in lines[:first])
    assert "elapsed" in lines[first] and "left" in lines[first]
    assert {p: p.read_bytes() for p in original} == original
    [own] = (tmp_path / "results").glob("tiny-set-*")
    assert pq.read_table(own / "runs.parquet").num_rows == 9
    # The same overrides in another order land in the same folder (and train nothing).
    assert main(["run", str(sweep), "--no-analyze", "--set", "weight_decay=[1, 2, 3]", "--set", "steps=100"]) == 0
    assert f"results/{own.name}" in capsys.readouterr().out
    # A file changed under the same directory: announced in one line, the other runs kept aside.
    write_raw(sweep, make_raw(train={**TRAIN, "steps": 100}))
    assert main(["run", str(sweep), "--no-analyze"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "another version" in ln]
    assert len(lines) == 1 and "6 runs of another version" in lines[0] and "train.steps: 200 → 100" in lines[0]


def test_dry_run_writes_nothing_and_says_what_a_run_would_take(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    sweep = write_raw(tmp_path / "tiny.toml", make_raw(train=TRAIN))
    assert main(["run", str(sweep), "--dry-run"]) == 0
    said = capsys.readouterr().out
    assert "6 runs × 200 steps = 1,200 model-steps" in said and "1 batch of 8 runs" in said
    assert "about" in said and "would write results/tiny/" in said
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.toml"]


def test_list_shows_every_preset_and_version(capsys):
    from jaxgrok.cli import presets_dir

    assert main(["list"]) == 0
    said = capsys.readouterr().out
    for f in presets_dir().glob("*.toml"):
        assert f.stem in said  # and every preset loads and validates
    sized = {line.split()[0]: line.split()[1] for line in said.splitlines()[1:] if line.split()[1:2] in (["CPU"], ["GPU"])}
    # Sized by their FLOPs: every preset written for a GPU is counted as one, the quick start is not.
    assert all(sized[f] == "GPU" for f in sized if f.endswith("_gpu")) and sized["quickstart"] == "CPU"
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("jaxgrok ")
