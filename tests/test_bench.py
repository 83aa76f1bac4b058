"""The benchmark's accounting and output (its speed is measured by `jaxgrok bench`, not here)."""

import json

import jax
import jax.numpy as jnp
import pytest

from jaxgrok import bench, models, tasks
from jaxgrok.cli import main
from jaxgrok.models import GromovConfig, MLPConfig, TransformerConfig
from jaxgrok.tasks import TaskConfig


@pytest.mark.parametrize("cfg,p", [(MLPConfig(), 31), (TransformerConfig(d_model=64, d_mlp=256), 23),
                                   (TransformerConfig(n_layers=2, d_model=64, d_mlp=256, layer_norm=True), 23),
                                   (GromovConfig(d_hidden=100), 31)])
def test_analytic_flops_agree_with_xla_cost_analysis(cfg, p):
    """XLA counts every operation, the analytic count only matmuls: XLA's is a little larger."""
    model = models.build(cfg, p, p)
    pairs = jnp.asarray(tasks.make_table(TaskConfig("x+y", p)).inputs)
    xla = jax.jit(model.apply).lower(model.init(jax.random.key(0)), pairs).compile().cost_analysis()["flops"]
    analytic = model.forward_flops(len(pairs))
    assert analytic <= xla <= 1.1 * analytic


def test_bench_writes_the_figures_as_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", "--workload", "mlp", "--runs", "3", "--steps", "20", "--eval-every", "10",
                 "--contenders", "jaxgrok,jax_loop", "--repeats", "1", "--loop-runs", "2", "--json", str(path)]) == 0
    (row,) = json.loads(path.read_text())
    assert row["workload"] == "mlp" and row["runs"] == 3
    assert set(row["contenders"]) == {"jaxgrok", "jax_loop"}
    assert all(c["model_steps_per_s"] > 0 for c in row["contenders"].values())
    assert row["contenders"]["jax_loop"]["runs_timed"] == 2
    assert row["flops_per_model_step"] == pytest.approx(bench.flops_per_model_step(bench.workload_sweep("mlp", 3, 20, 10)))
    assert row["achieved_flops"] > 0 and row["matmul_ceiling_flops"] > row["achieved_flops"]
    assert "jaxgrok/jax_loop" in row["ratios"] and row["device"]
    assert "mlp runs=3" in capsys.readouterr().out


def test_bench_rejects_unknown_names(capsys):
    assert main(["bench", "--workload", "resnet"]) == 2
    assert "--workload resnet: unknown" in capsys.readouterr().err
