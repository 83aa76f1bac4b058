"""Your own task and model: registered from Python or found through an installed package's entry
points, swept like the built-in ones, and held to the contract with one-line errors."""

import dataclasses
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import make_raw, write_raw

import jaxgrok
from jaxgrok import registry, results
from jaxgrok.sweep import SweepError, sweep_from_dict

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "sparse_parity"
TRAIN = {"steps": 200, "eval_every": 50, "chunk_steps": 100, "batch_size": 16, "optimizer": "sgd", "warmup_steps": 0}


def parity_raw(**task):
    return make_raw(task={"op": "sparse_parity", "n_bits": 10, "k": 2, "n_samples": 256, **task},
                    model={"kind": "parity_mlp", "width": 32}, train=TRAIN,
                    sweep={"seed": [0, 1], "weight_decay": 0.01, "learning_rate": 0.1, "train_fraction": 0.5})


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    """The docs' sparse-parity example as an installed package: its module beside a dist-info
    folder with the example's entry points, on the path of a subprocess (what pip install makes)."""
    site = tmp_path_factory.mktemp("site")
    shutil.copy(EXAMPLE / "sparse_parity.py", site)
    info = site / "jaxgrok_sparse_parity-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: jaxgrok-sparse-parity\nVersion: 0.1.0\n")
    # The entry points exactly as the example's pyproject.toml declares them.
    import tomllib

    eps = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]["entry-points"]
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in items.items()) for group, items in eps.items()))
    return site


def run_cli(args, site, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "jaxgrok", *args], cwd=tmp_path, env=env, capture_output=True, text=True)


def test_an_installed_package_adds_a_task_and_a_model_to_the_command(plugin, tmp_path):
    sweep = write_raw(tmp_path / "parity.toml", parity_raw())
    # Checkpointed after every chunk: a state without the Fourier spectrum is saved too.
    out = run_cli(["run", str(sweep), "--out", "out", "--quiet", "--checkpoint-every", "1"], plugin, tmp_path)
    assert out.returncode == 0, out.stderr
    runs = pq.read_table(tmp_path / "out" / "runs.parquet")  # results.read would need the package here too
    assert runs.num_rows == 2 and (tmp_path / "out" / "report.html").exists()
    resolved = results.sweep_config(runs)
    assert resolved["task"] == {"op": "sparse_parity", "n_bits": 10, "k": 2, "n_samples": 256, "seed": 0}
    assert resolved["model"] == {"kind": "parity_mlp", "width": 32}
    curves = pq.read_table(tmp_path / "out" / "curves.parquet").to_pandas()
    assert len(curves) == 2 * 4 and curves["fourier_gini"].isna().all()  # no residues: no Fourier measures
    assert curves["val_acc"].between(0, 1).all()
    # Its keys are checked like a built-in table's: one line naming the file and the key, exit 2.
    bad = write_raw(tmp_path / "bad.toml", parity_raw(k=20))
    out = run_cli(["run", str(bad), "--out", "bad"], plugin, tmp_path)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "bad.toml: task: k, n_bits: need" in out.stderr
    assert not (tmp_path / "bad").exists()
    # A name that nothing registers is refused, and the message says how to add one.
    unknown = write_raw(tmp_path / "unknown.toml", parity_raw(op="no_such_task"))
    out = run_cli(["run", str(unknown)], plugin, tmp_path)
    assert out.returncode == 2 and "task.op: unknown task 'no_such_task'; one of x+y" in out.stderr
    assert "sparse_parity" in out.stderr and "register one" in out.stderr  # the installed one is offered


def test_the_sparse_parity_table_is_the_parity_of_k_bits():
    sys.path.insert(0, str(EXAMPLE))
    try:
        import sparse_parity
    finally:
        sys.path.remove(str(EXAMPLE))
    t = sparse_parity.SparseParity(n_bits=12, k=3, n_samples=500, seed=1).table()
    assert t.inputs.shape == (500, 12) and set(np.unique(t.inputs)) == {0, 1}
    assert len({tuple(r) for r in t.inputs}) == 500  # distinct strings: none in both splits
    assert np.array_equal(t.targets, t.inputs[:, :3].sum(1) % 2)
    assert 200 < t.targets.sum() < 300  # balanced classes


# ---------------------------------------------------------------------------------------------
# Registered from Python (a notebook), with contract violations said in one line


@jaxgrok.register_task("mod_sum_test")
@dataclass(frozen=True)
class ModSum:
    """x + y mod p again, as a registered task: its run equals the built-in one's table."""

    p: int = 13
    bad: str = ""  # a way to break the contract on purpose

    def table(self):
        a, b = np.meshgrid(np.arange(self.p), np.arange(self.p), indexing="ij")
        targets = (a + b).ravel() % self.p
        if self.bad == "range":
            targets = targets + self.p
        if self.bad == "shape":
            targets = targets[:-1]
        return jaxgrok.Table(np.stack([a.ravel(), b.ravel()], 1), targets, self.p, self.p)


@jaxgrok.register_model("linear_test")
@dataclass(frozen=True)
class Linear:
    """Logits = E[a] + E[b]: a model with no embedding for the measures (unless asked to)."""

    bad: str = ""
    with_embedding: bool = False

    def build(self, n_symbols, n_classes, n_inputs):
        out = n_classes + (self.bad == "shape")

        def apply(params, inputs):
            return params["e"][inputs].sum(1)

        return jaxgrok.Model(
            init=lambda key: {"e": jnp.zeros((n_symbols, out))}, apply=apply,
            forward_flops=lambda n: 0, activations=lambda n: n * out,
            embedding=(lambda params: params["e"]) if self.with_embedding else None)


def test_a_task_and_model_registered_in_python_run_from_a_dict(tmp_path):
    train = {"steps": 100, "eval_every": 50, "chunk_steps": 100}
    # A registered task with a built-in model: the same table as the built-in x+y mod 13, so the same
    # curves, bit for bit (the run hashes differ: the task is named differently).
    mine = jaxgrok.run(make_raw(task={"op": "mod_sum_test", "p": 13}, train=train), out=tmp_path / "mine", analyze=False)
    builtin = jaxgrok.run(make_raw(task={"op": "x+y", "p": 13}, train=train), out=tmp_path / "builtin", analyze=False)
    assert mine.sweep["task"] == {"op": "mod_sum_test", "p": 13, "bad": ""}
    for col in ("train_loss", "train_acc", "val_loss", "val_acc", "weight_norm"):
        assert np.array_equal(mine.curves[col], builtin.curves[col])
    # It is not known to have residues: the Fourier measures are off, not wrong.
    assert mine.curves["fourier_gini"].isna().all() and builtin.curves["fourier_gini"].notna().all()

    # A registered model on the built-in task: without an embedding the Fourier measures are off...
    raw = make_raw(task={"op": "x+y", "p": 13}, model={"kind": "linear_test"}, train=train)
    res = jaxgrok.run(raw, out=tmp_path / "linear", analyze=False)
    assert len(res.runs) == 6 and res.curves["fourier_gini"].isna().all() and res.curves["dist_from_init"].notna().all()
    with pytest.raises(SweepError, match="measures.fourier: model linear_test has no embedding"):
        sweep_from_dict({**raw, "measures": {"fourier": True}}, "r.toml")
    # ... and with one they are on.
    with_emb = sweep_from_dict({**raw, "model": {"kind": "linear_test", "with_embedding": True}}, "r.toml")
    assert with_emb.static.measures.fourier and with_emb.static.measures.circularity


@pytest.mark.parametrize("change, message", [
    ({"task": {"op": "mod_sum_test", "bad": "range"}}, "task 'mod_sum_test': targets must lie in [0, 13), got 13 to 25"),
    ({"task": {"op": "mod_sum_test", "bad": "shape"}}, "inputs must be [N, L] and targets [N], got [169, 2] and [168]"),
    ({"task": {"op": "mod_sum_test", "p": "13"}}, "task.p: must be an integer, got '13'"),
    ({"task": {"op": "mod_sum_test", "q": 1}}, "task.q: unknown key (known: p, bad)"),
    ({"task": {"op": "nope"}}, "task.op: unknown task 'nope'; one of x+y,"),
    ({"task": {"op": 3}}, "task.op: must be a string, got 3"),
    ({"model": {"kind": "linear_test", "bad": "shape"}}, "must give float32[4, 13], got float32[4, 14]"),
    ({"model": {"kind": "linear_test", "width": 3}}, "model.width: unknown key"),
    ({"task": {"op": "sparse_parity_test"}, "model": {"kind": "mlp"}}, "model.kind: mlp reads two operands (a, b); the task's examples have 5 tokens"),
])
def test_a_broken_contract_is_one_line_naming_the_file(tmp_path, change, message):
    raw = {**make_raw(task={"op": "mod_sum_test"}, model={"kind": "linear_test"}), **change}
    with pytest.raises(SweepError) as e:
        sweep_from_dict(raw, "r.toml")
    assert str(e.value).startswith("r.toml: ") and message in str(e.value) and "\n" not in str(e.value)


@jaxgrok.register_task("sparse_parity_test")
@dataclass(frozen=True)
class FiveBits:
    def table(self):
        bits = (np.arange(32)[:, None] >> np.arange(5)) & 1
        return jaxgrok.Table(bits, bits.sum(1) % 2, 2, 2)


def test_registration_refuses_what_a_sweep_file_could_not_say():
    @dataclass
    class Mutable:
        def table(self):
            pass

    @dataclass(frozen=True)
    class Listy:
        sizes: list = dataclasses.field(default_factory=list)

        def table(self):
            pass

    with pytest.raises(TypeError, match="frozen dataclass"):
        jaxgrok.register_task("m")(Mutable)
    with pytest.raises(TypeError, match="field sizes: a sweep file sets int, float, str or bool, not list"):
        jaxgrok.register_task("l")(Listy)
    with pytest.raises(ValueError, match="built into jaxgrok"):
        jaxgrok.register_task("x+y")(FiveBits)
    with pytest.raises(TypeError, match="has no method build"):
        jaxgrok.register_model("no_build")(FiveBits)
    @dataclass(frozen=True)
    class Clash:
        def table(self):
            pass

    with pytest.raises(ValueError, match="already registered by test_registry.ModSum"):
        jaxgrok.register_task("mod_sum_test")(Clash)
    jaxgrok.register_task("mod_sum_test")(ModSum)  # the same class again (a notebook cell re-run)
    assert "mod_sum_test" in registry.known("task") and "linear_test" in registry.known("model")


def test_a_broken_entry_point_is_one_line(tmp_path):
    site = tmp_path / "site"
    (site / "broken-0.1.dist-info").mkdir(parents=True)
    (site / "broken-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: broken\nVersion: 0.1\n")
    (site / "broken-0.1.dist-info" / "entry_points.txt").write_text("[jaxgrok.tasks]\nbroken = no_such_module:Task\n")
    sweep = write_raw(tmp_path / "b.toml", make_raw(task={"op": "broken"}))
    out = run_cli(["run", str(sweep)], site, tmp_path)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "task.op: entry point jaxgrok.tasks: broken = no_such_module:Task: cannot load (ModuleNotFoundError" in out.stderr


def test_two_classes_under_one_name_never_share_a_run_hash():
    raw = make_raw(task={"op": "hash_test", "p": 13})

    def hashes_with(cls):
        registry._registered["task"].pop("hash_test", None)  # as in another process
        jaxgrok.register_task("hash_test")(cls)
        return sweep_from_dict(raw, "r.toml").run_hashes

    @dataclass(frozen=True)
    class Mine(ModSum):  # a task of the same parameters...
        pass

    @dataclass(frozen=True)
    class Theirs(ModSum):  # ... and another class of the same name's (a notebook's copy of a package's)
        pass

    try:
        first, again, other = hashes_with(Mine), hashes_with(Mine), hashes_with(Theirs)
    finally:
        registry._registered["task"].pop("hash_test", None)
    with pytest.raises(ValueError, match="registered as 'mod_sum_test' already"):
        jaxgrok.register_task("another_name")(ModSum)
    assert first == again and not set(first) & set(other)
    builtin = sweep_from_dict(make_raw(task={"op": "x+y", "p": 13}), "r.toml").run_hashes
    assert not set(builtin) & set(first)


def test_an_entry_point_to_a_class_that_breaks_the_rules_is_one_line(tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "loose-0.1.dist-info").mkdir(parents=True)
    (site / "loose-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: loose\nVersion: 0.1\n")
    (site / "loose-0.1.dist-info" / "entry_points.txt").write_text("[jaxgrok.tasks]\nloose = loose_task:Task\n")
    (site / "loose_task.py").write_text("from dataclasses import dataclass\n\n@dataclass\nclass Task:\n"
                                        "    def table(self):\n        pass\n")
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(SweepError) as e:
        sweep_from_dict(make_raw(task={"op": "loose"}), "r.toml")
    assert "r.toml: task.op: entry point jaxgrok.tasks: loose = loose_task:Task: cannot load (TypeError: " \
           "task 'loose': must be a frozen dataclass" in str(e.value) and "\n" not in str(e.value)
