"""Every key of a sweep file, every kind of value: a sweep or one line naming the file and the key.

The generator writes the quick-start file with one key replaced at a time, over every key that the
configuration tables and the sweep know (not only those the file has), with values of every kind
TOML can hold: integers small, negative and huge, floats finite and not, booleans, strings, lists,
tables, dates and times. In-process and without training, so it stays fast; grow KINDS and the
special cases below as new causes turn up.
"""

import dataclasses
import json
import os
import tomllib
from pathlib import Path

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
import pytest
from conftest import make_raw, write_raw

from jaxgrok import memory, models, tasks
from jaxgrok import sweep as S
from jaxgrok.cli import main

BASE = tomllib.loads(Path(__file__).parent.parent.joinpath("sweeps/quickstart.toml").read_text())
INT_LIMITS = [2**31 - 1, 2**31, -(2**31) - 1, 2**63 - 1, 2**63, -(2**63)]  # int32's and int64's edges
KINDS = [0, -1, 1, 7, 10**18, 2**61 - 1, *INT_LIMITS, 0.5, -0.5, 1e308, float("inf"), float("-inf"), float("nan"), True, False,
         "", "x", "mlp", "x/y", "../x", [], [1], [0.5, 2.0], ["mlp"], [[1]], [[]], {}, {"a": 1}, {"count": 0},
         {"count": -1}, {"count": 10**7}, {"count": 4, "start": -1},
         "RAW:1979-05-27", "RAW:1979-05-27T07:32:00Z", "RAW:07:32:00", "RAW:1979-05-27T07:32:00"]


def _keys():
    tables = {"task": tasks.TaskConfig, "train": S.TrainConfig, "grokking": S.GrokkingConfig, "measures": S.MeasuresConfig}
    out = [(None, k) for k in ("name", "paper", "description")]
    for table, cls in tables.items():
        out += [(table, f.name) for f in dataclasses.fields(cls)]
    out += sorted({("model", f.name) for cls in models.MODELS.values() for f in dataclasses.fields(cls)})
    out += [("sweep", a) for a in S.AXES + ("zip",)]
    return out


def _assert_one_line(error: S.SweepError, path, *names):
    msg = str(error)
    assert "\n" not in msg and msg.startswith(str(path)), msg
    assert any(n in msg for n in names), f"{names} not named in: {msg}"


def test_every_key_with_every_kind_of_value(tmp_path):
    path, failures, n_ok = tmp_path / "s.toml", [], 0
    for table, key in _keys():
        for value in KINDS:
            raw = json.loads(json.dumps(BASE))
            (raw if table is None else raw.setdefault(table, {}))[key] = value
            write_raw(path, raw)
            try:
                sweep = S.load_sweep(path)
                memory.least_bytes_per_run(sweep.static)  # the size check before anything is built
                n_ok += 1
            except S.SweepError as e:
                try:
                    _assert_one_line(e, path, key)
                except AssertionError as bad:
                    failures.append(f"{table}.{key} = {value!r}: {bad}")
            except Exception as e:  # noqa: BLE001 - anything else is the failure we look for
                failures.append(f"{table}.{key} = {value!r}: {type(e).__name__}: {e}")
    assert not failures, f"{len(failures)} variants failed:\n" + "\n".join(failures[:20])
    assert n_ok > 100  # the generator also makes valid files: the checks do not refuse everything


def _integer_keys():
    """(file, table, key) for every integer key of a sweep file: each model's in a preset of its kind."""
    presets = {"mlp": "sweeps/quickstart.toml", "transformer": "sweeps/nanda.toml", "gromov": "sweeps/gromov.toml"}
    tables = {"task": tasks.TaskConfig, "train": S.TrainConfig, "grokking": S.GrokkingConfig, "measures": S.MeasuresConfig}
    out = [(presets["mlp"], t, f.name) for t, cls in tables.items() for f in dataclasses.fields(cls) if f.type in (int, "int")]
    out += [(presets[kind], "model", f.name) for kind, cls in models.MODELS.items() for f in dataclasses.fields(cls)
            if f.type in (int, "int")]
    out += [(presets["mlp"], "sweep", a) for a in S.SEED_AXES]
    return out


def _with_llc(table):  # the LLC's options act only where it is on
    return ["--set", "measures.llc=true"] if table == "measures" else []


def test_integers_past_int32_are_refused_in_one_line_before_anything_is_written(tmp_path, capsys):
    out, failures = tmp_path / "out", []
    for preset, table, key in _integer_keys():
        for value in INT_LIMITS[1:]:
            args = ["run", preset, "--set", f"{table}.{key}={value}", *_with_llc(table), "--out", str(out), "--quiet"]
            code, err = main(args), capsys.readouterr().err.strip()
            if code != 2 or len(err.splitlines()) != 1 or key not in err or preset not in err or out.exists():
                failures.append(f"{table}.{key} = {value}: exit {code}, {err[:200]!r}")
    assert not failures, "\n".join(failures)
    assert len(_integer_keys()) >= 25  # every table's integers: the list did not come out empty


def test_integers_at_the_int32_limit_are_refused_or_compile(tmp_path):
    """At 2³¹ − 1 a key is refused in one line, or its program traces and lowers: no integer overflows
    inside the jitted program (the error that came after parts/ was made)."""
    from jaxgrok import train

    checked = 0
    for preset, table, key in _integer_keys():
        overrides = [f"{table}.{key}={2**31 - 1}"] + _with_llc(table)[1:]
        try:
            sweep = S.load_sweep(preset, overrides)
            memory.check_fits(sweep, memory.memory_budget())
        except S.SweepError as e:
            _assert_one_line(e, preset, key)
            continue
        program = train.make_program(sweep.static, evals=1)
        hp, state = train.abstract_inputs(program, program.sharding.mesh.size)
        program.init.lower(hp)
        program.chunk.lower(state, hp, train.first_evals(program.sharding.mesh.size))
        checked += 1
    assert checked >= 5  # warm-up, chunk size, batch cap, phase gap, the measures' cadences


@pytest.mark.parametrize("text,named", [
    ('name = "a"\nname = "b"\n', "name = "),  # a duplicate key: tomllib does not name it, the line does
    ("name = 1979-05-27\n", "name"),
    ("[task\n", "[task"),
])
def test_toml_that_does_not_parse_or_holds_a_date(tmp_path, text, named):
    path = tmp_path / "s.toml"
    path.write_text(text)
    with pytest.raises(S.SweepError) as e:
        S.load_sweep(path)
    _assert_one_line(e.value, path, named)


def test_files_that_are_not_sweep_files(tmp_path):
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes('name = "caf\xe9"\n'.encode("latin-1"))
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)  # reading it would block forever
    for path, problem in ((latin1, "not UTF-8"), (tmp_path, "not a regular file"), (fifo, "not a regular file"),
                          (tmp_path / "missing.toml", "no such file")):
        with pytest.raises(S.SweepError, match=problem) as e:
            S.load_sweep(path)
        _assert_one_line(e.value, path, problem)


@pytest.mark.parametrize("override,named", [
    (".steps=5", ".steps"), ("steps..x=5", "steps..x"), ("train=1", "train"), ("model.kind=[1]", "model.kind"),
    ("steps=1979-05-27", "steps"), ("zip=[[]]", "zip"), ("nope=1", "nope"),
])
def test_overrides(override, named):
    path = "sweeps/quickstart.toml"
    with pytest.raises(S.SweepError) as e:
        S.load_sweep(path, [override])
    _assert_one_line(e.value, path, named)


def test_an_override_on_a_table_that_is_a_string(tmp_path):
    raw = json.loads(json.dumps(BASE))
    raw["task"] = "x+y"  # a string where a table belongs
    path = write_raw(tmp_path / "s.toml", raw)
    with pytest.raises(S.SweepError, match="task is not a table") as e:
        S.load_sweep(path, ["task.p=5"])
    _assert_one_line(e.value, path, "task")
    with pytest.raises(S.SweepError, match="task: must be a table"):
        S.load_sweep(path)


@pytest.mark.parametrize("overrides,limit,named", [
    (["task.p=1000003"], "2³¹", "task.p"),  # 10¹² pairs
    (["task.p=20011"], "budget", "task.p = 20,011: "),  # one run's logits alone need more than the device
    (["model.d_hidden=1000000000"], "budget", "model.d_hidden = 1,000,000,000"),
    (["model.d_embed=100000000"], "budget", ": model.d_embed = 100,000,000, model.d_hidden = 128: "),  # both, the larger effect first
    (["sweep.seed={count=10000000}"], "JAXGROK_MAX_RUNS", "sweep.seed"),
    (["sweep.seed={count=2000}", "sweep.data_seed={count=2000}", "sweep.zip=[]"], "JAXGROK_MAX_RUNS",
     "(sweep.weight_decay 4 × sweep.data_seed 2,000 × sweep.seed 2,000)"),
    (["steps=1000000000000000000"], "at most", "train.steps"),
])
def test_sizes_that_cannot_fit_are_refused_up_front_naming_the_keys(tmp_path, capsys, overrides, limit, named):
    out = tmp_path / "out"
    args = [a for o in overrides for a in ("--set", o)]
    assert main(["run", "sweeps/quickstart.toml", *args, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "sweeps/quickstart.toml" in err and limit in err and named in err, err
    assert not out.exists()


def test_a_large_modulus_is_checked_quickly():
    # 2³¹ − 1 is prime, but its table of 2⁶² pairs is refused for its size, not built or hung on;
    # beyond it the integer limit refuses first. A composite near it fails the primality test.
    with pytest.raises(S.SweepError, match="more than 2³¹"):
        S.load_sweep("sweeps/quickstart.toml", ["task.op=x/y", f"task.p={2**31 - 1}"])
    with pytest.raises(S.SweepError, match="at most 2³¹ − 1"):
        S.load_sweep("sweeps/quickstart.toml", ["task.op=x/y", f"task.p={2**61 - 1}"])
    with pytest.raises(S.SweepError, match="prime"):
        S.load_sweep("sweeps/quickstart.toml", ["task.op=x/y", f"task.p={2**31 - 3}"])


@pytest.mark.parametrize("args", [["--checkpoint-every", "0"], ["--checkpoint-every", "-2"], ["--shard", "-1/2"],
                                  ["--shard=-1/2"], ["--shard", "2/2"], ["--bogus"]])
def test_command_line_mistakes(tmp_path, capsys, args):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:  # argparse's own errors exit from inside the parser
        code = main(["run", "sweeps/quickstart.toml", "--out", str(out), "--quiet", *args])
        raise SystemExit(code)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error" in err
    assert not out.exists()


@pytest.mark.parametrize("name", ["../../x", "/tmp/x", ".hidden", "a/b", "", "x" * 101, "a b"])
def test_a_name_that_would_write_outside_results_is_refused(name):
    with pytest.raises(S.SweepError, match="name: letters, digits"):
        S.load_sweep("sweeps/quickstart.toml", [f"name={json.dumps(name)}"])


def test_restart_deletes_only_what_jaxgrok_wrote(tmp_path):
    from jaxgrok.store import Store

    out = tmp_path / "mine"
    sweep = S.load_sweep("sweeps/quickstart.toml")
    Store(out, sweep)  # creates parts/
    (out / "parts" / "runs-abc.parquet").write_bytes(b"x")
    (out / "parts" / "notes.txt").write_text("mine")
    (out / "checkpoints" / "3").mkdir(parents=True)
    (out / "checkpoints" / "keep").mkdir()
    (out / "runs.parquet").write_text("not a jaxgrok table")
    Store(out, sweep, restart=True)
    assert not (out / "parts" / "runs-abc.parquet").exists() and not (out / "checkpoints" / "3").exists()
    assert (out / "parts" / "notes.txt").read_text() == "mine"
    assert (out / "checkpoints" / "keep").is_dir() and (out / "runs.parquet").exists()


# -- the analysis commands' inputs ----------------------------------------------------------------

@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finished")
    raw = make_raw(train={"steps": 200, "eval_every": 50, "chunk_steps": 100, "max_runs_per_batch": 8})
    out = tmp / "out"
    assert main(["run", str(write_raw(tmp / "s.toml", raw)), "--out", str(out), "--no-analyze", "--quiet"]) == 0
    return out


def _results_variants():
    """(file, what is wrong, a function of its table giving the damaged table)."""
    from jaxgrok import results

    def meta(key, value):
        return lambda t: t.replace_schema_metadata({**{k: v for k, v in t.schema.metadata.items() if k != key},
                                                     **({} if value is None else {key: value})})

    def resolved_with(path, value):
        def change(t):
            cfg = json.loads(t.schema.metadata[b"jaxgrok.sweep"])
            *head, last = path.split(".")
            node = cfg
            for k in head:
                node = node[k]
            node[last] = value
            return meta(b"jaxgrok.sweep", json.dumps(cfg).encode())(t)
        return change

    later = {"precision", "batch_seed", *S.LATER_AXES, *results.LATER_RUNS_COLUMNS}  # upgrade_runs fills them in older tables
    for kind, schema in (("runs", results.RUNS_SCHEMA), ("curves", results.CURVES_SCHEMA)):
        needed = [n for n in schema.names if n not in later] if kind == "runs" else schema.names[:7]
        for name in needed:
            yield kind, f"no {name}", lambda t, n=name: t.drop_columns([n])
            typed = schema.field(name).type != pa.string()
            yield kind, f"{name} as {'text' if typed else 'numbers'}", lambda t, n=name, typed=typed: t.set_column(
                t.schema.get_field_index(n), n, pa.array(["x"] * t.num_rows if typed else range(t.num_rows)))
        yield kind, "no rows", lambda t: t.slice(0, 0)
        yield kind, "a run missing", lambda t: t.filter(pa.compute.not_equal(t.column("run_id"), 1))
        if kind == "runs":
            yield kind, "an unknown phase", lambda t: t.set_column(t.schema.get_field_index("phase"), "phase",
                                                                   pa.array(["x"] * t.num_rows))
        yield kind, "no kind", meta(results.KIND_KEY, None)
        yield kind, "the other kind", meta(results.KIND_KEY, b"curves" if kind == "runs" else b"runs")
        yield kind, "no sweep", meta(b"jaxgrok.sweep", None)
        for bad in (b"{not json", b"null", b"[]", b"{}", b'"text"', b"\xff\xfe"):
            yield kind, f"sweep {bad!r}", meta(b"jaxgrok.sweep", bad)
        for path, value in (("model.kind", "nope"), ("train.steps", -1), ("train", "x"), ("sweep.seed", {"count": -3}),
                            ("task.p", 2**61 - 1), ("grokking.threshold", "high")):
            yield kind, f"sweep {path}={value!r}", resolved_with(path, value)


@pytest.mark.parametrize("kind,what,damage", list(_results_variants()),
                         ids=[f"{k}: {w}" for k, w, _ in _results_variants()])
def test_every_damaged_results_file_gets_one_line_and_nothing_written(tmp_path, capsys, finished, kind, what, damage):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(finished, out)
    path = out / f"{kind}.parquet"
    pq.write_table(damage(pq.read_table(path)), path)
    assert main(["analyze", str(out)]) == 2, what
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0], (what, err)
    assert not (out / "stats.parquet").exists() and not (out / "report.html").exists()
