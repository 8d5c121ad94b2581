"""Tests for s3t.calibration on the 2-block tiny model: throughput per depth from the real trainer, the run
left untouched, and `s3t cost --calibrate RUN_DIR` / `--calibrate-data FILE --plan FILE`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from s3t.calibration import calibrate, calibrate_run, run_info
from s3t.cli import app
from s3t.cost import Throughput
from s3t.errors import DataError


def digest_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_calibrate_times_every_depth(tiny_plan, tiny_data):
    throughput = calibrate(tiny_plan, tiny_data, batches=1)
    assert isinstance(throughput, Throughput)
    assert len(throughput.per_depth) == tiny_plan.num_slices
    assert all(r > 0 for r in throughput.per_depth) and throughput.trunk > 0
    assert throughput.source == "calibrated: fastest of 1 batches per depth"


def test_calibrate_needs_enough_records(tiny_plan, tiny_data):
    with pytest.raises(DataError, match="at least 9 records"):
        calibrate(tiny_plan, tiny_data.subset(tiny_data.ids[:5]))


def test_calibrating_on_a_run_only_reads_it(trained_dir, tiny_plan):
    before = digest_tree(trained_dir)
    plan, live = run_info(trained_dir)
    # The run's plan, with what create resolved (the label space, the thread count).
    assert plan.replace(labels=None, num_threads=None) == tiny_plan and live == 96
    throughput = calibrate_run(trained_dir, batches=1)
    assert len(throughput.per_depth) == tiny_plan.num_slices
    assert digest_tree(trained_dir) == before


def test_cli_calibrates_on_a_run_and_prices_its_plan(trained_dir, tmp_path):
    result = CliRunner().invoke(app, ["cost", "--calibrate", str(trained_dir), "--calibrate-batches", "1",
                                      "--deletions", "2", "--periods", "3", "--trials", "200",
                                      "--out-json", str(tmp_path / "c.json")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["records"] == 96                                  # the run's live records
    assert data["plan"]["num_shards"] == 2 and data["plan"]["epochs"] == 2   # the run's plan
    assert data["throughput"]["source"].startswith("calibrated")
    assert data["throughput"]["trunk"] > 0


def test_cli_calibrates_on_a_data_file_with_a_plan(tiny_plan, tiny_data, tmp_path):
    data_file = tmp_path / "train.jsonl"
    data_file.write_text("".join(json.dumps({"id": r.id, "text": r.text, "label": r.label}) + "\n"
                                 for r in tiny_data))
    plan_file = tmp_path / "plan.toml"
    plan_file.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in tiny_plan.to_dict().items()
                                 if v is not None and k != "lora_targets"))
    result = CliRunner().invoke(app, ["cost", "--calibrate-data", str(data_file), "--plan", str(plan_file),
                                      "--calibrate-batches", "1", "--records", "5000", "--deletions", "4",
                                      "-L", "2", "-B", "1", "--trials", "200", "--out-json", str(tmp_path / "c.json")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["records"] == 5000 and data["plan"]["budget"] == 1
    assert len(data["throughput"]["per_depth"]) == 2


def test_a_recommended_plan_for_timing_fits_the_model(tiny_model):
    from s3t import Plan
    from s3t.errors import PlanError
    from s3t.planner import recommended_plan

    tiny = Plan(base_model=tiny_model, blocks_per_slice=1)   # 2 blocks: at most 2 layer groups of 1
    assert recommended_plan(Plan(), 20_000, 10, trials=300).num_slices == 3
    with pytest.raises(PlanError, match="2 slices"):
        recommended_plan(tiny, 20_000, 10, fit_model=True, trials=300)
    fitted = recommended_plan(tiny, 20_000, 3, fit_model=True, trials=300)
    assert fitted.num_slices <= 2 and fitted.base_model == tiny_model and fitted.blocks_per_slice == 1
