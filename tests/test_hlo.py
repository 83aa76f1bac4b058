"""The HLO audit of the vmapped chunk: one batched matmul per product for all runs, softmax fused."""

import pytest

from jaxgrok import hlo
from jaxgrok.cli import main

MODELS = {
    "mlp": ({"kind": "mlp"}, {"op": "x+y", "p": 31}),
    "transformer": ({"kind": "transformer", "d_model": 32, "n_heads": 4, "d_mlp": 64}, {"op": "x+y", "p": 11}),
}
# The measures in one of them: their Fourier projections are matmuls against a basis shared by all runs.
MEASURES = {
    "mlp": {},
    "transformer": {"dist_from_init": False, "fourier": False, "circularity": False, "restricted_loss": False},
}


@pytest.mark.parametrize("kind", MODELS)
def test_every_matmul_is_one_batched_matmul_over_the_runs(tiny_sweep, kind):
    model, task = MODELS[kind]
    # 7 runs: no dimension of these models is 7, so a leading 7 is the run axis.
    a = hlo.audit(tiny_sweep(model=model, task=task, train={"steps": 50, "eval_every": 50}, measures=MEASURES[kind]), n_runs=7)
    assert a["matmuls"] > 0 and a["matmuls_over_all_runs"] == a["matmuls"]
    assert a["matmuls_batched_over_runs"] > 0
    # The loops are the scan over evaluations and the loop over steps inside it, never one over runs.
    assert a["lowered"]["while"] == 2
    # The embedding look-ups' gradients are scatter-adds (one per gathered table; a vmapped gather
    # stays one batched scatter, not one per run).
    assert 0 < a["lowered"]["scatter"] <= a["lowered"]["gather"]
    # On this backend the softmax's exponentials are fused with their neighbours.
    assert a["compiled"].get("exponential", 0) == 0 and a["compiled"].get("fused:exponential", 0) > 0


def test_the_audit_parser_counts_what_it_should():
    text = ('%fused_computation.1 (p: f32[2]) -> f32[2] {\n  ROOT %e = f32[2]{0} exponential(%p)\n}\n'
            'ENTRY %main {\n  %d = f32[2,2]{1,0} dot(%a, %b)\n'
            '  %g = f32[2,2]{1,0} custom-call(%a, %b), custom_call_target="__cublas$gemm"\n}\n')
    assert hlo.compiled_ops(text) == {"fused:exponential": 1, "dot": 1, "custom-call:__cublas$gemm": 1}
    lowered = ('%0 = stablehlo.dot_general %a, %b, batching_dims = [0] x [0], contracting_dims = [2] x [1] : '
               '(tensor<4x3x5xf32>, tensor<4x5x2xf32>) -> tensor<4x3x2xf32>\n'
               '%1 = stablehlo.dot_general %c, %d, contracting_dims = [1] x [0] : (tensor<3x5xf32>, tensor<5x2xf32>) -> tensor<3x2xf32>\n')
    assert hlo.dots_over_runs(lowered, 4) == (2, 1, 1)


def test_bench_hlo_prints_the_audit(capsys):
    assert main(["bench", "--workload", "mlp", "--runs", "4", "--steps", "50", "--eval-every", "50", "--hlo"]) == 0
    out = capsys.readouterr().out
    assert "matmuls: 12, each for all runs: 12, of which batched over the run axis: 12" in out and "scatter" in out
