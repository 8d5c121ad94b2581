"""Smoke tests of the model-family benchmarks (benchmarks/families.py) and the GPU check (benchmarks/gpu_check.py):
tiny sizes, synthetic images, the CPU; they check that every path runs, not the figures."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_bench", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def families():
    yield load("families")
    sys.modules.pop("families_bench", None)


@pytest.fixture(autouse=True)
def torch_settings_kept():
    """The benchmarks run in this process: they must leave torch's thread count and global RNG as they found them
    (runs created later resolve `num_threads` from torch's, and it enters their lineages)."""
    import torch

    threads, rng = torch.get_num_threads(), torch.random.get_rng_state()
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    assert torch.get_num_threads() == threads and torch.equal(torch.random.get_rng_state(), rng)
    assert (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()) \
        == deterministic


@pytest.mark.parametrize("family", ["gpt", "vit"])
def test_families_smoke(families, family, tmp_path):
    assert families.main([family, "--smoke", "--out-dir", str(tmp_path), "--plot", str(tmp_path / "f.png")]) == 0
    result = json.loads((tmp_path / f"families_{family}.json").read_text())
    assert result["smoke"] and [r["method"] for r in result["methods"]] == ["S3T", "SISA", "fine-tune"]
    s3t_row, sisa_row, fine_row = result["methods"]
    assert list(s3t_row["by_depth"]) == list(sisa_row["by_depth"]) == ["1", "2"] and list(fine_row["by_depth"]) == ["1"]
    for row in result["methods"]:
        assert len(row["delete_ms"]) == 2 and all(ms > 0 for ms in row["delete_ms"]) and row["after_restore"] > 0
    assert fine_row["after_deletions"] is None and fine_row["served_depths_after_deletions"] == [0]
    if family == "gpt":
        assert set(result["generation"]) == {"full depth", "depth 1"}
        assert all(g["shared_tok_s"] > 0 and g["per_shard_tok_s"] > 0 for g in result["generation"].values())
    else:
        assert result["data"] == "synthetic"
    assert (tmp_path / "f.png").stat().st_size > 0


def test_missing_fashion_mnist_is_one_line(families, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(families, "FASHION", tmp_path / "nowhere")
    assert families.main(["vit", "--out-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("Fashion-MNIST not found under") and "apt-get install -y dataset-fashion-mnist" in out[-1]


def test_gpu_check_dry_run_and_no_cuda_line(tmp_path, monkeypatch, capsys):
    import torch

    gpu_check = load("gpu_check")
    try:
        out = tmp_path / "gpu.json"
        assert gpu_check.main(["--dry-run", "--out", str(out)]) == 0
        result = json.loads(out.read_text())
        assert result["exactness"]["ran"] is False and "tests/test_generation.py" in result["exactness"]["command"]
        rows = {(r["model"], r["side"]): r for r in result["throughput"]}
        assert set(rows) == {(m, s) for m in ("llama", "vit") for s in ("s3t", "peft")}
        assert all(r["tokens_per_s"] > 0 for r in rows.values())
        # the same base model on both sides; s3t trains each record in several stages
        assert rows["llama", "s3t"]["parameters"] == rows["llama", "peft"]["parameters"]
        assert rows["llama", "s3t"]["examples_trained"] > rows["llama", "peft"]["examples_trained"]
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        capsys.readouterr()
        assert gpu_check.main([]) == 2
        assert capsys.readouterr().out.count("\n") == 1
    finally:
        sys.modules.pop("gpu_check_bench", None)


def test_the_exactness_tests_honour_the_device_setting():
    tests = Path(__file__).parent
    assert "device=TEST_DEVICE" in (tests / "test_generation.py").read_text()
    assert (tests / "conftest.py").read_text().count("device=TEST_DEVICE") >= 2
