"""Statistics on hand-computed examples, the figures, the report, and bad input."""

import warnings

import matplotlib.image
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import stats

from jaxgrok.analysis import cells
from jaxgrok.cli import main
from jaxgrok.report import figures


def test_kaplan_meier_median_on_a_hand_computed_example():
    # Events at 2, 4, 6; two runs censored at 8. S(2)=4/5, S(4)=4/5·3/4=0.6, S(6)=0.6·2/3=0.4.
    t = np.array([2.0, 4, 6, 0, 0])
    observed = np.array([True, True, True, False, False])
    s = cells.survival(t, observed, np.full(5, 8.0))
    assert s["median"] == 6 and s["q25"] == 4 and s["q10"] == 2
    assert s["q75"] is None and s["q90"] is None  # S never falls to 0.25
    assert s["restricted_mean"] == pytest.approx(2 * 1 + 2 * 0.8 + 2 * 0.6 + 2 * 0.4)
    assert s["median_lo"] <= 6 and (s["median_hi"] is None or s["median_hi"] >= 6)


def test_median_not_reached_is_null_not_the_budget():
    # S: 6/7 at 3, ·5/6 at 5, ·3/4 at 8 = 0.536 > 0.5, then only censored runs.
    t = np.array([3.0, 5, 5, 8, 10, 10, 10])
    observed = np.array([True, True, False, True, False, False, False])
    s = cells.survival(t, observed, np.where(observed, 10.0, t))
    assert s["median"] is None and s["median_hi"] is None
    assert s["q10"] == 3


def _cols(t_val, seeds=None, wd=None, budget=1000):
    t_val = np.asarray(t_val, float)
    n = len(t_val)
    return {
        "run_id": np.arange(n), "seed": np.arange(n) if seeds is None else np.asarray(seeds),
        "data_seed": np.zeros(n, int), "weight_decay": np.ones(n) if wd is None else np.asarray(wd, float),
        "learning_rate": np.full(n, 1e-2), "init_scale": np.ones(n), "train_fraction": np.full(n, 0.5),
        "t_train": np.full(n, 50.0), "t_val": t_val, "censored": np.isnan(t_val),
        "steps": np.full(n, budget), "phase": np.where(np.isnan(t_val), "memorization", "grokking"),
    }


def test_all_censored_and_none_censored_cells():
    cols = _cols([np.nan] * 5 + [100, 300, 200, 500, 400], wd=[1] * 5 + [2] * 5)
    censored, clean = cells.cell_stats(cols, ["weight_decay"])
    assert censored["n_grokked"] == 0 and censored["t_val_median"] is None and censored["t_val_q10"] is None
    assert censored["frac_grokked_lo"] == 0 and censored["frac_grokked_hi"] == pytest.approx(1 - 0.025 ** (1 / 5))
    assert censored["t_val_restricted_mean"] == 1000  # nobody grokked within the budget
    assert clean["t_val_median"] == 300 and clean["frac_grokked"] == 1
    assert clean["t_val_restricted_mean"] == pytest.approx(300)  # no censoring: the plain mean


def test_exact_binomial_interval_is_clopper_pearson():
    cols = _cols([100, 200, 300] + [np.nan] * 4)
    (row,) = cells.cell_stats(cols, [])
    assert row["frac_grokked_lo"] == pytest.approx(stats.beta.ppf(0.025, 3, 5))
    assert row["frac_grokked_hi"] == pytest.approx(stats.beta.ppf(0.975, 4, 4))


def test_phase_diagram_on_a_synthetic_table(tmp_path):
    wd, lr = np.meshgrid([0.1, 1.0, 10.0], [1e-3, 1e-2], indexing="ij")
    rows = [{"weight_decay": w, "learning_rate": r, "phase": p, "t_val_median": m, "frac_grokked": f}
            for w, r, p, m, f in zip(wd.ravel(), lr.ravel(),
                                     ["memorization", "grokking", "grokking", "comprehension", "confusion", "grokking"],
                                     [None, 2000.0, 800.0, 300.0, None, 5000.0], [0, 0.5, 1, 1, 0, 0.75])]
    path = figures.phase_diagram(rows, "weight_decay", "learning_rate", tmp_path)
    height, width, _ = matplotlib.image.imread(path).shape
    assert width > 1200 and 350 < height < 700
    assert (tmp_path / "phase_diagram.svg").exists()


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    out = tmp_path_factory.mktemp("a") / "res"
    assert main(["run", "sweeps/quickstart.toml", "--out", str(out), "--quiet", "--set", "steps=300",
                 "--set", "chunk_steps=100", "--set", "seed={count=3}", "--set", "data_seed={count=3}"]) == 0
    return out


def test_run_analyses_its_results_and_the_report_references_every_figure(analysed):
    html = (analysed / "report.html").read_text()
    for name in ("phase_diagram", "survival", "t_val_distribution", "accuracy_curves"):
        assert (analysed / "figures" / f"{name}.png").exists() and (analysed / "figures" / f"{name}.svg").exists()
        assert f'href="figures/{name}.svg"' in html and f'alt="{name}"' in html
    assert html.count("data:image/png;base64,") == 4
    stats_table = pq.read_table(analysed / "stats.parquet")
    assert stats_table.num_rows == 4 and stats_table.column("n_runs").to_pylist() == [3] * 4
    assert "sensitivity.parquet" in {p.name for p in analysed.iterdir()}


def test_analyze_bad_input_gets_one_line_and_exit_2(tmp_path, capsys, analysed):
    assert main(["analyze", str(tmp_path)]) == 2
    assert "runs.parquet: no such file" in capsys.readouterr().err
    pq.write_table(pa.table({"x": [1]}), tmp_path / "runs.parquet")
    assert main(["analyze", str(tmp_path)]) == 2
    assert "not a jaxgrok runs table" in capsys.readouterr().err
    assert main(["analyze", str(analysed), "--x", "init_scale"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--x init_scale: not a swept axis" in err and len(err.splitlines()) == 1


def test_one_seed_per_cell_is_said_in_the_report(tmp_path):
    out = tmp_path / "res"
    assert main(["run", "sweeps/quickstart.toml", "--out", str(out), "--quiet", "--set", "steps=100",
                 "--set", "chunk_steps=100", "--set", "seed=0", "--set", "data_seed=0"]) == 0
    html = (out / "report.html").read_text()
    assert "Fewer than 2 seeds in every cell: no spread to report." in html
    assert not (out / "sensitivity.parquet").exists()


def _synthetic(n_cells: int, censored_everywhere: bool = False, seeds: int = 4):
    """runs columns for `n_cells` weight decays × `seeds` seeds, with made-up grokking times."""
    rng = np.random.default_rng(0)
    wd = np.repeat(np.geomspace(0.01, 10, n_cells), seeds)
    t_val = rng.uniform(100, 900, len(wd)).round()
    censored = np.ones(len(wd), bool) if censored_everywhere else rng.random(len(wd)) < 0.3
    t_val[censored] = np.nan
    return {"run_id": np.arange(len(wd)), "seed": np.tile(np.arange(seeds), n_cells), "weight_decay": wd,
            "learning_rate": np.full(len(wd), 1e-3), "steps": np.full(len(wd), 1000), "t_val": t_val,
            "t_train": np.full(len(wd), 50.0), "censored": censored,
            "phase": np.where(censored, "memorization", "grokking")}


@pytest.mark.parametrize("n_cells,all_censored", [(1, False), (3, False), (5, True), (50, False)])
def test_figures_for_one_axis_all_censored_and_many_cells(tmp_path, n_cells, all_censored):
    cols = _synthetic(n_cells, all_censored)
    rows = cells.cell_stats(cols, ["weight_decay"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no library warning reaches the user
        one = figures.along_one_axis(rows, "weight_decay", 1000.0, tmp_path)
        surv = figures.survival_curves(rows, ["weight_decay"], 1000.0, tmp_path)
        dist = figures.t_val_distribution(cols, ["weight_decay"], rows, tmp_path)
    assert one.exists() and surv.exists() and dist.exists()
    svg = (tmp_path / "survival.svg").read_text()
    shown = n_cells if n_cells <= 36 else 25  # beyond 36 panels: one cell in two
    assert svg.count("(n=4, ") == shown  # every shown cell is labelled, with its censored count
    if n_cells > 36:
        assert "25 of 50 cells (one in 2" in svg  # a stated selection, never a silent subset
    dist_svg = (tmp_path / "t_val_distribution.svg").read_text()
    assert "&gt;1000" in dist_svg  # censored runs are a bar of their own
    if all_censored:
        cols2 = {**cols, "learning_rate": np.tile([1e-3, 1e-2], len(cols["run_id"]) // 2)}
        rows2 = cells.cell_stats(cols2, ["weight_decay", "learning_rate"])
        figures.phase_diagram(rows2, "weight_decay", "learning_rate", tmp_path)
        assert "no cell" in (tmp_path / "phase_diagram.svg").read_text()


def test_histogram_ticks_label_a_range_within_one_decade():
    from jaxgrok.report.figures import _round_ticks

    # 5,100 to 8,800 holds no 1-2-5 value: the axis would have had no labels at all.
    assert _round_ticks(5100, 8800) == [6000, 7000, 8000]
    assert _round_ticks(100, 20000) == [100, 500, 2000, 10000]
