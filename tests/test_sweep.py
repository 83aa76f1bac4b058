"""Sweep files: expansion of the axes, overrides, and every kind of bad input."""

import os
import subprocess
import sys

import pytest
from conftest import make_raw, write_sweep

from jaxgrok.cli import main
from jaxgrok.sweep import SweepError, load_sweep, sweep_from_dict


def test_product_of_axes_with_seeds_fastest(tiny_sweep):
    s = tiny_sweep()
    assert s.n_runs == 6
    assert list(s.runs["seed"]) == [0, 1, 2, 0, 1, 2]
    assert list(s.runs["weight_decay"]) == [1.0, 1.0, 1.0, 2.0, 2.0, 2.0]
    assert s.swept == ["weight_decay", "seed"]
    assert len(set(s.run_hashes)) == 6


def test_zipped_axes_vary_together(tiny_sweep):
    s = tiny_sweep(sweep={"seed": {"count": 3, "start": 5}, "data_seed": [7, 8, 9], "zip": [["seed", "data_seed"]],
                          "weight_decay": [1.0, 2.0], "learning_rate": 1e-2, "train_fraction": 0.5})
    assert s.n_runs == 6
    assert list(zip(s.runs["seed"], s.runs["data_seed"]))[:3] == [(5, 7), (6, 8), (7, 9)]


def test_overrides_from_the_command_line(tmp_path):
    path = write_sweep(tmp_path / "s.toml", train={"steps": 1000, "chunk_steps": None},
                       sweep={"weight_decay": 1.0, "learning_rate": 1e-2, "train_fraction": 0.5})
    s = load_sweep(path, ["steps=500", "model.d_hidden=64", "seed={count=4}", "weight_decay=[0.5, 1]"])
    assert s.static.train.steps == 500 and s.static.model.d_hidden == 64
    assert s.n_runs == 8 and s.name == "tiny"
    with pytest.raises(SweepError, match="--set nonsense: no such key"):
        load_sweep(path, ["nonsense=1"])


BAD = [
    ({"train": {"steps": 100, "eval_every": 50, "colour": 3}}, "train.colour: unknown key"),
    ({"train": {"steps": "many"}}, "train.steps: must be an integer"),
    ({"train": {"steps": None}}, "train.steps: missing required key"),
    ({"sweep": {"seed": [], "weight_decay": 1.0, "learning_rate": 0.01, "train_fraction": 0.5}}, "sweep.seed: empty axis"),
    ({"sweep": {"weight_decay": 1.0, "learning_rate": 0.01, "train_fraction": 1.5}}, "sweep.train_fraction: must be in \\(0, 1\\)"),
    ({"sweep": {"weight_decay": 1.0, "learning_rate": 0.01, "train_fraction": 0.0}}, "sweep.train_fraction: must be in \\(0, 1\\)"),
    ({"sweep": {"weight_decay": -1.0, "learning_rate": 0.01, "train_fraction": 0.5}}, "sweep.weight_decay: must be ≥ 0"),
    ({"sweep": {"weight_decay": 1.0, "learning_rate": -0.01, "train_fraction": 0.5}}, "sweep.learning_rate: must be > 0"),
    ({"sweep": {"weight_decay": 1.0, "train_fraction": 0.5}}, "sweep.learning_rate: missing required key"),
    ({"task": {"op": "x/y", "p": 30}}, "task.p: x/y needs a prime modulus, got 30"),
    ({"task": {"op": "x%y", "p": 31}}, "task.op: unknown task"),
    ({"model": {"kind": "lstm"}}, "model.kind: unknown model 'lstm'"),
    ({"model": {"kind": "mlp", "n_heads": 4}}, "model.n_heads: unknown key"),
    ({"sweep": {"weight_decay": float("inf"), "learning_rate": 0.01, "train_fraction": 0.5}}, "sweep.weight_decay: must be finite"),
    ({"sweep": {"weight_decay": 1.0, "learning_rate": 0.01, "train_fraction": 0.5, "init_noise": -1e-3}}, "sweep.init_noise: must be ≥ 0"),
    ({"sweep": {"weight_decay": 1.0, "learning_rate": 0.01, "train_fraction": 0.5, "init_noise": float("nan")}}, "sweep.init_noise: must be finite"),
    ({"sweep": {"weight_decay": 1.0, "learning_rate": 0.01, "train_fraction": 0.5, "noise_seed": -1}}, "sweep.noise_seed: must be in"),
    ({"sweep": {"weight_decay": 1.0, "learning_rate": 0.01, "train_fraction": 0.5, "batch_seed": [0.5]}}, "sweep.batch_seed: must be an integer"),
    ({"sweep": {"weight_decay": 1.0, "learning_rate": 0.01, "train_fraction": 0.5, "grokfast_lambda": -2}}, "sweep.grokfast_lambda: must be ≥ 0"),
    ({"sweep": {"weight_decay": 1.0, "learning_rate": 0.01, "train_fraction": 0.5, "grokfast_alpha": 1.0}}, "sweep.grokfast_alpha: must be in \\[0, 1\\)"),
]


@pytest.mark.parametrize("sections,message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_input_raises_one_line_naming_file_and_key(sections, message):
    with pytest.raises(SweepError, match=message) as err:
        sweep_from_dict(make_raw(**sections), "bad.toml")
    assert str(err.value).startswith("bad.toml: ") and "\n" not in str(err.value)


@pytest.mark.parametrize("sections,message", BAD[:5] + BAD[9:11], ids=[m.split(":")[0] for _, m in BAD[:5] + BAD[9:11]])
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, sections, message):
    path = write_sweep(tmp_path / "bad.toml", **sections)
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"jaxgrok: error: {path}: ") and len(err.splitlines()) == 1
    assert not out.exists()


def test_cli_not_toml_and_missing_file(tmp_path, capsys):
    path = tmp_path / "broken.toml"
    path.write_text("[task\nop = ")
    assert main(["run", str(path)]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "nope.toml")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_every_shipped_sweep_file_is_valid():
    sweeps = os.path.join(os.path.dirname(__file__), "..", "sweeps")
    files = sorted(f for f in os.listdir(sweeps) if f.endswith(".toml"))
    assert "quickstart.toml" in files
    for name in files:
        s = load_sweep(os.path.join(sweeps, name))
        assert s.paper.strip(), name
        assert s.n_runs >= 1


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "jaxgrok", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "run" in out.stdout
