"""Tests for s3t.records: loaders, validation messages, selection and the deterministic split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from s3t.errors import DataError
from s3t.records import Dataset, Record, check_labels

ROWS = [
    {"id": "a", "text": "rates rise again", "label": "business"},
    {"id": "b", "text": "cup final tonight", "label": "sport", "subject": "user-1"},
    {"id": "c", "text": "new phone launched", "label": "tech", "subject": "user-1"},
]


def make(n: int, *, labels: int = 2) -> Dataset:
    return Dataset([Record(id=f"r{i}", text=f"text {i}", label=f"l{i % labels}") for i in range(n)])


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_from_records_accepts_dicts_records_and_ints() -> None:
    data = Dataset.from_records([*ROWS, Record(id="d", text="x", label="tech"),
                                 {"id": 7, "text": "seven", "label": 1, "subject": 42}])
    assert data.ids == ("a", "b", "c", "d", "7")
    assert data.get("7") == Record(id="7", text="seven", label="1", subject="42")
    assert data.labels == ("1", "business", "sport", "tech")
    assert data.texts[0] == "rates rise again"
    assert data[1].subject == "user-1" and data[-1].id == "7"
    assert len(data) == 5 and [r.id for r in data] == list(data.ids)
    assert "a" in data and "z" not in data


def test_constructor_validates_records() -> None:
    assert Dataset([Record(id=1, text="t", label=2)]).get("1").label == "2"  # type: ignore[arg-type]
    with pytest.raises(DataError, match=r"`text` at records\[1\] is blank"):
        Dataset([Record("a", "t", "x"), Record("b", "  ", "x")])


def test_repr() -> None:
    assert repr(Dataset.from_records(ROWS)) == "Dataset(3 records, 3 labels)"
    assert repr(make(1, labels=1)) == "Dataset(1 record, 1 label)"


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([], "empty"),
        ([ROWS[0], {**ROWS[1], "id": "a"}], r"Duplicate id 'a' at records\[0\] and records\[1\]"),
        ([{"id": "a", "text": "t"}], r"Missing field `label` at records\[0\]"),
        ([ROWS[0], {"text": "t", "label": "x"}], r"Missing field `id` at records\[1\]"),
        ([{**ROWS[0], "subjet": "u"}], r"Unknown field\(s\) `subjet` at records\[0\]"),
        ([{**ROWS[0], "text": 5}], r"`text` at records\[0\] must be a string; got int"),
        ([{**ROWS[0], "text": "\n "}], r"`text` at records\[0\] is blank"),
        ([{**ROWS[0], "id": " "}], r"`id` at records\[0\] is blank"),
        ([{**ROWS[0], "id": 1.5}], r"`id` at records\[0\] must be a string or int; got 1.5 \(float\)"),
        ([{**ROWS[0], "label": True}], r"`label` at records\[0\] must be a string or int; got True"),
        ([["a", "t", "x"]], r"Expected a record or a mapping .* at records\[0\]; got list"),
    ],
)
def test_from_records_errors_name_the_record(rows: list, expected: str) -> None:
    with pytest.raises(DataError, match=expected):
        Dataset.from_records(rows)


def test_from_jsonl(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", ROWS)
    path.write_text(path.read_text() + "\n\n")  # trailing blank lines are fine
    assert Dataset.from_jsonl(path) == Dataset.from_records(ROWS)
    assert Dataset.from_jsonl(str(path)).ids == ("a", "b", "c")


def test_from_jsonl_errors_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + '{"id": "b", "text": \n')
    with pytest.raises(DataError, match=r"Line 3 of .*bad\.jsonl is not valid JSON: Expecting value"):
        Dataset.from_jsonl(path)
    write_jsonl(path, [ROWS[0], ROWS[1], {**ROWS[2], "id": "a"}])
    with pytest.raises(DataError, match=r"Duplicate id 'a' at line 1 of .*bad\.jsonl and line 3 of"):
        Dataset.from_jsonl(path)
    write_jsonl(path, [ROWS[0], {"id": "x", "label": "y"}])
    with pytest.raises(DataError, match=r"Missing field `text` at line 2 of .*bad\.jsonl"):
        Dataset.from_jsonl(path)
    write_jsonl(path, [ROWS[0], [1, 2]])
    with pytest.raises(DataError, match=r"at line 2 of .*; got list"):
        Dataset.from_jsonl(path)
    path.write_text("\n \n")
    with pytest.raises(DataError, match=r"bad\.jsonl has no records"):
        Dataset.from_jsonl(path)
    with pytest.raises(DataError, match=r"No such data file: .*missing\.jsonl"):
        Dataset.from_jsonl(tmp_path / "missing.jsonl")
    path.write_bytes(b'{"id": "a", "text": "caf\xe9", "label": "x"}\n')
    with pytest.raises(DataError, match="not UTF-8"):
        Dataset.from_jsonl(path)


def test_from_csv(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text('id,text,label,subject\na,rates rise again,business,\n'
                    'b,"cup final, tonight",sport,user-1\nc,"new phone\nlaunched",tech,user-1\n')
    data = Dataset.from_csv(path)
    assert data.ids == ("a", "b", "c")
    assert data.get("a").subject is None  # an empty cell means no subject
    assert data.get("b") == Record("b", "cup final, tonight", "sport", "user-1")
    assert data.get("c").text == "new phone\nlaunched"
    no_subject = tmp_path / "plain.csv"
    no_subject.write_text("text,label,id\nhello,x,1\n")
    assert Dataset.from_csv(no_subject)[0] == Record("1", "hello", "x")


def test_from_csv_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("id,body\na,hello\n")
    with pytest.raises(DataError, match=r"missing required column\(s\) text, label; found columns: 'id', 'body'"):
        Dataset.from_csv(path)
    path.write_text("id,text,label,owner\na,hello,x,u\n")
    with pytest.raises(DataError, match=r"unknown column\(s\) 'owner'"):
        Dataset.from_csv(path)
    path.write_text("")
    with pytest.raises(DataError, match="found columns: none"):
        Dataset.from_csv(path)
    # Line numbers count physical lines, so a quoted multi-line text shifts the next row's number.
    path.write_text('id,text,label\na,"two\nlines",x\na,again,x\n')
    with pytest.raises(DataError, match=r"Duplicate id 'a' at line 2 of .*bad\.csv and line 4 of"):
        Dataset.from_csv(path)
    path.write_text("id,text,label\na,hello,x\nb,hello,world,x\n")
    with pytest.raises(DataError, match=r"Too many fields at line 3 of .*bad\.csv"):
        Dataset.from_csv(path)
    path.write_text("id,text,label\na,hello\n")
    with pytest.raises(DataError, match=r"Missing field `label` at line 2 of .*bad\.csv"):
        Dataset.from_csv(path)
    path.write_text("id,text,label\n")
    with pytest.raises(DataError, match="has no records"):
        Dataset.from_csv(path)
    with pytest.raises(DataError, match=r"No such data file: .*nope\.csv"):
        Dataset.from_csv(tmp_path / "nope.csv")


def test_from_csv_reads_long_texts_and_reports_oversized_fields(tmp_path: Path) -> None:
    import csv

    limit = csv.field_size_limit()
    path = tmp_path / "long.csv"
    path.write_text(f"id,text,label\na,{'w' * 500_000},x\n")  # over csv's default 128 KiB field limit
    assert len(Dataset.from_csv(path).get("a").text) == 500_000
    # An unclosed quote swallows the rest of the file into one field, past even the raised limit.
    path.write_text('id,text,label\na,hello,x\nb,"unclosed,x\n' + "w" * (16 << 20) + "\n")
    with pytest.raises(DataError, match=r"record at line 3 of .*long\.csv as CSV: field larger than field limit"):
        Dataset.from_csv(path)
    assert csv.field_size_limit() == limit, "the process-wide limit is restored"


def test_get_subset_without() -> None:
    data = make(5)
    assert data.get("r2").text == "text 2"
    with pytest.raises(DataError, match=r"No record with id 'r9'.*`Dataset.ids`"):
        data.get("r9")
    assert data.subset(["r3", "r1"]).ids == ("r1", "r3")  # dataset order, not argument order
    assert data.without(["r0", "r4"]).ids == ("r1", "r2", "r3")
    assert data.without([]) == data
    with pytest.raises(DataError, match=r"2 id\(s\) not in this dataset: 'x', 'y'"):
        data.without(["r1", "y", "x"])
    with pytest.raises(DataError, match="list of ids; got the string 'r1'"):
        data.subset("r1")
    with pytest.raises(DataError, match="removed all 5 records"):
        data.without(data.ids)
    with pytest.raises(DataError, match="no ids"):
        data.subset([])


def test_getitem_rejects_slices() -> None:
    with pytest.raises(TypeError, match="subset"):
        make(3)[0:2]  # type: ignore[index]


def test_split_sizes_and_partition() -> None:
    data = make(100)
    train, test = data.split(test_fraction=0.2, seed=1)
    assert (len(train), len(test)) == (80, 20)
    assert set(train.ids) | set(test.ids) == set(data.ids) and not set(train.ids) & set(test.ids)
    assert train.ids == tuple(i for i in data.ids if i in set(train.ids))  # keeps dataset order
    assert data.split(test_fraction=0.2, seed=1) == (train, test)
    assert data.split(test_fraction=0.2, seed=2)[1] != test


@settings(max_examples=25, deadline=None)
@given(st.permutations(list(range(30))), st.integers(0, 1000))
def test_split_does_not_depend_on_row_order(order: list[int], seed: int) -> None:
    records = [Record(id=f"r{i}", text=f"text {i}", label="x") for i in range(30)]
    base = Dataset(records).split(test_fraction=0.3, seed=seed)
    shuffled = Dataset([records[i] for i in order]).split(test_fraction=0.3, seed=seed)
    assert set(shuffled[1].ids) == set(base[1].ids)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5, "0.2", True])
def test_split_rejects_bad_fraction(fraction: object) -> None:
    with pytest.raises(DataError, match="`test_fraction` must be a float in \\(0, 1\\)"):
        make(10).split(test_fraction=fraction)  # type: ignore[arg-type]


def test_split_rejects_empty_side() -> None:
    with pytest.raises(DataError, match="0 test and 3 training records"):
        make(3).split(test_fraction=0.1)


def test_check_labels() -> None:
    check_labels(["a", "b"], ["a", "b", "c"])
    check_labels([1], ["1"])  # labels are compared as strings
    with pytest.raises(DataError, match=r"Unknown label\(s\) 'd', 'e'.*trained on 'a', 'b'"):
        check_labels(["e", "a", "d"], ["b", "a"])


# -- risk ------------------------------------------------------------------------------------------------
def test_risk_is_optional_and_read_by_every_loader(tmp_path: Path) -> None:
    data = Dataset.from_records([{"id": "a", "text": "t", "label": "x", "risk": 0.8},
                                 {"id": "b", "text": "t", "label": "x", "risk": 1},
                                 {"id": "c", "text": "t", "label": "x"}])
    assert [r.risk for r in data] == [0.8, 1.0, None]
    assert Record("d", "t", "x").risk is None
    jsonl = write_jsonl(tmp_path / "r.jsonl", [{"id": "a", "text": "t", "label": "x", "risk": 0.25}])
    assert Dataset.from_jsonl(jsonl)[0].risk == 0.25
    path = tmp_path / "r.csv"
    path.write_text("id,text,label,subject,risk\na,t,x,,0.9\nb,t,x,u1,\n")
    data = Dataset.from_csv(path)
    assert (data.get("a").risk, data.get("b").risk, data.get("b").subject) == (0.9, None, "u1")


@pytest.mark.parametrize("risk", [1.5, -0.1, "high", True, float("nan"), [0.5]])
def test_bad_risk_names_the_record_and_the_fix(risk: object) -> None:
    with pytest.raises(DataError, match=r"`risk` at records\[0\] must be a number in \[0, 1\]"):
        Dataset.from_records([{"id": "a", "text": "t", "label": "x", "risk": risk}])


def test_bad_risk_in_csv_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_text("id,text,label,risk\na,t,x,0.5\nb,t,x,lots\n")
    with pytest.raises(DataError, match="`risk` at line 3 of .*r.csv.*got 'lots'"):
        Dataset.from_csv(path)


def test_a_subjects_records_must_share_one_risk() -> None:
    rows = [{"id": "a", "text": "t", "label": "x", "subject": "u", "risk": 0.2},
            {"id": "b", "text": "t", "label": "x", "subject": "u", "risk": 0.9}]
    with pytest.raises(DataError, match=r"subject 'u' carry different risks: 0.2 at records\[0\] and 0.9 at "
                                        r"records\[1\]"):
        Dataset.from_records(rows)
    rows[1]["risk"] = 0.2
    assert len(Dataset.from_records(rows)) == 2
