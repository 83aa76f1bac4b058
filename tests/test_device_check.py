"""The accelerator check, at CPU sizes: every part runs and records what it measured."""

import json

from jaxgrok import device_check


def test_every_part_of_the_device_check_runs_and_records(tmp_path):
    assert device_check.main(["--out", str(tmp_path), "--tiny"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["part"] for r in summary] == ["versions", "tests", "bench", "torch", "memory", "sweep"]
    by = {r["part"]: r for r in summary}
    assert all(r["status"] == "ok" for r in summary), {k: r["status"] for k, r in by.items()}
    assert by["versions"]["backend"] == "cpu" and by["versions"]["jax"]
    assert by["tests"]["passed"] > 0 and by["tests"]["failed"] == 0
    assert {r["precision"] for r in by["bench"]["rows"]} == {"float32", "bfloat16"}
    assert all(r["contenders"]["jaxgrok"]["model_steps_per_s"] > 0 for r in by["bench"]["rows"])
    assert int(by["memory"]["batch"]) >= 4 and "per_run_estimate" in by["memory"]  # padded to the devices
    assert by["sweep"]["runs"] == 4 and by["sweep"]["train_s"] > 0
    for i, r in enumerate(summary, 1):  # one JSON and one log per part
        assert (tmp_path / f"{i:02d}_{r['part']}.json").exists() and (tmp_path / f"{i:02d}_{r['part']}.log").exists()
