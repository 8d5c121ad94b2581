"""Tests for s3t.demo that need no training: argument checks and console formatting (the demo itself takes minutes)."""

from __future__ import annotations

import pytest

from s3t.demo import _accuracy, demo_data, run_demo
from s3t.errors import DataError


def test_too_many_deletions_is_refused_before_training(tmp_path):
    limit = len(demo_data()[0]) - 1
    with pytest.raises(DataError, match=rf"`deletions` \(--deletions\) must be between 0 and {limit}.*got {limit + 1}"):
        run_demo(tmp_path / "run", deletions=limit + 1)
    assert not (tmp_path / "run").exists(), "nothing was created or trained"


def test_accuracy_without_a_live_shard_says_so():
    assert _accuracy(0.91234) == "[bold]0.912[/]"
    assert _accuracy(None) == "no live shard (needs restore)"
