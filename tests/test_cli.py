"""Tests for s3t.cli: every command documented, the train → predict → delete → status → restore round trip,
and user mistakes reported as one `error:` line with exit code 1 (2 for Click usage errors), no traceback.

One tiny run is trained through `s3t train` per module; commands that change a run work on a copy of it.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

import s3t
from s3t import datasets
from s3t.cli import app
from s3t.partition import partition

README = Path(__file__).resolve().parents[1] / "README.md"
COMMANDS: dict[str, click.Command] = typer.main.get_command(app).commands  # type: ignore[attr-defined]

PLAN = dict(num_shards=2, num_slices=2, budget=1, epochs=1, max_length=16, batch_size=8, learning_rate=5e-3, seed=0)
ALICE = ("syn-1", "syn-4", "syn-9")   # records given the subject "alice"


def invoke(*args: object, input: str | None = None):
    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def ok(result) -> str:
    """Stdout of a successful command (fails with the command's output otherwise)."""
    assert result.exit_code == 0, (result.exit_code, result.output, result.exception)
    return result.stdout


def user_error(result, code: int = 1) -> str:
    """The message of a failed command: exit `code`, no traceback, `error:` on stderr; soft wraps undone."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), f"crashed instead of reporting: {result.exception!r}"
    assert "Traceback" not in result.output
    if code == 1:
        assert result.stderr.startswith("error: "), result.stderr
        assert result.stdout == ""
    return result.stderr


def has(text: str, fragment: str) -> bool:
    """Whether `fragment` is in `text`, ignoring whitespace: rich wraps long lines at the console width."""
    return re.sub(r"\s+", "", fragment) in re.sub(r"\s+", "", text)


def write_toml(path: Path, fields: dict) -> Path:
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in fields.items()), encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model) -> dict[str, Path]:
    """A small JSONL data file (three records of subject "alice") and a plan TOML on the tiny model."""
    folder = tmp_path_factory.mktemp("cli-files")
    data = datasets.synthetic(36, num_labels=3, seed=2)
    rows = [{"id": r.id, "text": r.text, "label": r.label} | ({"subject": "alice"} if r.id in ALICE else {})
            for r in data]
    cells = partition(s3t.Dataset.from_records(rows), seed=0, num_shards=2, num_slices=2)
    assert len(set(cells.values())) == 4, "every (shard, slice) needs a record"
    return {"data": write_jsonl(folder / "train.jsonl", rows),
            "plan": write_toml(folder / "plan.toml", PLAN | {"base_model": tiny_model})}


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, files) -> Path:
    """A run trained with `s3t train DIR --data FILE --plan FILE` (read-only: copy it to change it)."""
    run_dir = tmp_path_factory.mktemp("cli-run") / "run"
    out = ok(invoke("train", run_dir, "--data", files["data"], "--plan", files["plan"]))
    assert has(out, f"trained {run_dir}: served depth per shard 0: 2, 1: 2")
    return run_dir


@pytest.fixture
def run_copy(cli_run, tmp_path) -> Path:
    path = tmp_path / "run"
    shutil.copytree(cli_run, path)
    return path


def status_json(run_dir: Path) -> dict:
    return json.loads(ok(invoke("status", run_dir, "--json")))


# -- help and documentation ----------------------------------------------------------------------------
def test_the_expected_commands_are_registered():
    assert {"train", "predict", "delete", "status", "restore", "demo"} <= set(COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help(name):
    command = COMMANDS[name]
    doc = (command.callback.__doc__ or "").strip()
    assert doc, f"`s3t {name}` has no docstring"
    assert command.help and command.help.strip()
    assert has(ok(invoke(name, "--help")).replace("│", ""), doc.splitlines()[0])
    for param in command.params:
        if isinstance(param, click.Option) and param.name != "help":
            assert param.help, f"`s3t {name} {param.opts[0]}` has no help"


def test_top_level_help_lists_every_command():
    out = ok(invoke("--help"))
    for name in COMMANDS:
        assert re.search(rf"\b{name}\b", out), name


def test_every_command_is_documented_in_the_readme():
    assert README.is_file(), f"{README} is missing: document every command there (`s3t <command> ...`)"
    text = README.read_text(encoding="utf-8")
    code = "\n".join(re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S) + re.findall(r"`([^`\n]+)`", text))
    lines = [line.strip().removeprefix("$ ") for line in text.splitlines()]
    missing = [name for name in COMMANDS
               if not any(line.startswith(f"s3t {name}") for line in lines)
               and not re.search(rf"\bs3t {name}\b", code)]
    assert not missing, f"commands not documented in README.md: {missing}"


# -- the round trip ------------------------------------------------------------------------------------
def test_train_stores_the_plan_and_data_it_was_given(cli_run, files):
    system = s3t.S3T.open(cli_run)
    try:
        # the plan as given, with what create fixes for good: the label space and the thread count
        assert system.plan == s3t.Plan.from_toml(files["plan"]).replace(labels=system.labels,
                                                                         num_threads=system.plan.num_threads)
        assert system.labels == ("label-0", "label-1", "label-2")
        status = system.status()
        assert status.trained and status.serving and status.truncated_orders == 0
        assert (status.live_records, status.deleted_records) == (36, 0)
    finally:
        system.close()


def test_train_resumes_an_existing_run_without_data(run_copy):
    version = status_json(run_copy)["served_version"]
    out = ok(invoke("train", run_copy, "--quiet"))
    assert has(out, "served depth per shard 0: 2, 1: 2")
    assert status_json(run_copy)["served_version"] == version, "nothing was left to train"


def test_predict_texts_file_and_stdin(cli_run, tmp_path):
    texts = ["shares rose at the bank", "the team won the match", "a new phone chip"]
    by_args = ok(invoke("predict", cli_run, *texts)).splitlines()
    assert len(by_args) == 3 and set(by_args) <= {"label-0", "label-1", "label-2"}
    listing = tmp_path / "texts.txt"
    listing.write_text("\n".join(texts[:2]) + "\n\n   \n" + texts[2] + "\n", encoding="utf-8")
    assert ok(invoke("predict", cli_run, "--file", listing)).splitlines() == by_args   # blank lines skipped
    assert ok(invoke("predict", cli_run, "--file", "-", input="\n".join(texts))).splitlines() == by_args
    mixed = ok(invoke("predict", cli_run, texts[0], "--file", listing)).splitlines()
    assert mixed == by_args[:1] + by_args


def test_predict_json(cli_run):
    texts = ["shares rose at the bank", "the team won the match"]
    rows = json.loads(ok(invoke("predict", cli_run, *texts, "--json")))
    assert [r["label"] for r in rows] == ok(invoke("predict", cli_run, *texts)).splitlines()
    for row in rows:
        proba = row["probabilities"]
        assert list(proba) == ["label-0", "label-1", "label-2"]
        assert abs(sum(proba.values()) - 1) < 1e-5
        assert row["label"] == max(proba, key=proba.get)


def test_delete_by_id_json_receipt(run_copy):
    receipt = json.loads(ok(invoke("delete", run_copy, "--id", "syn-0", "--id", "nope", "--json",
                                   "--reference", "ticket-9")))
    assert receipt["deleted"] == ["syn-0"] and receipt["unknown"] == ["nope"]
    assert receipt["reference"] == "ticket-9"
    assert receipt["lineage_check"].startswith("passed")
    system = s3t.S3T.open(run_copy)
    assert [json.loads(json.dumps(r.to_dict())) for r in system.receipts()] == [receipt]
    system.close()
    status = status_json(run_copy)
    assert (status["live_records"], status["deleted_records"]) == (35, 1)
    assert status["served_version"] == receipt["served_version"]


def test_delete_by_subject_and_by_file(run_copy, tmp_path):
    out = ok(invoke("delete", run_copy, "--subject", "alice", "--subject", "nobody"))
    assert has(out, "deleted 3,") and has(out, "unknown subjects 1") and has(out, "lineage check passed")
    assert "alice" not in out and "nobody" not in out
    ids = tmp_path / "ids.txt"
    ids.write_text("syn-0\n\nsyn-2\nsyn-1\n", encoding="utf-8")   # syn-1 went with alice
    receipt = json.loads(ok(invoke("delete", run_copy, "--file", ids, "--json")))
    assert receipt["deleted"] == ["syn-0", "syn-2"] and receipt["already_deleted"] == ["syn-1"]
    receipt = json.loads(ok(invoke("delete", run_copy, "--file", "-", "--json", input="syn-3\n")))
    assert receipt["deleted"] == ["syn-3"]
    assert status_json(run_copy)["deleted_records"] == 6


def test_status_table_and_json(cli_run):
    out = ok(invoke("status", cli_run))
    assert has(out, "36 live / 0 deleted records")
    assert "truncated" not in out and "not trained" not in out
    status = status_json(cli_run)
    assert status["trained"] and status["serving"] and status["truncated_orders"] == 0
    assert [s["shard"] for s in status["shards"]] == [0, 1]
    assert all(s["served_depth"] == 2 and s["orders"] == 1 for s in status["shards"])


def test_restore_after_a_deletion(run_copy):
    json.loads(ok(invoke("delete", run_copy, "--id", "syn-0", "--json")))
    before = status_json(run_copy)
    assert before["truncated_orders"] == 1
    assert has(ok(invoke("status", run_copy)), f"1 truncated orders: `s3t restore {run_copy}`")
    out = ok(invoke("restore", run_copy, "--quiet"))
    assert out.startswith("restored 1 orders") and has(out, "served depth per shard 0: 2, 1: 2")
    after = status_json(run_copy)
    assert after["truncated_orders"] == 0 and after["serving"]
    assert after["served_version"] > before["served_version"]
    assert len(ok(invoke("predict", run_copy, "the team won the match")).splitlines()) == 1


# -- user mistakes -------------------------------------------------------------------------------------
def test_train_into_an_existing_run_with_data(cli_run, files):
    message = user_error(invoke("train", cli_run, "--data", files["data"]))
    assert has(message, f"{cli_run} already holds a run")


def test_train_without_data_on_a_missing_run(tmp_path):
    message = user_error(invoke("train", tmp_path / "new"))
    assert has(message, f"no run at {tmp_path / 'new'} yet: give --data FILE")
    assert not (tmp_path / "new").exists()


def test_predict_on_a_missing_run(tmp_path):
    message = user_error(invoke("predict", tmp_path / "missing", "some text"))
    assert has(message, f"no s3t run at {tmp_path / 'missing'}")


def test_predict_without_texts(cli_run):
    assert has(user_error(invoke("predict", cli_run)), "give texts to classify")


def test_train_with_an_unsupported_data_file(tmp_path, files):
    data = tmp_path / "train.txt"
    data.write_text("some text\n", encoding="utf-8")
    message = user_error(invoke("train", tmp_path / "run", "--data", data, "--plan", files["plan"]))
    assert has(message, f"--data {str(data)!r}: use a .jsonl or .csv file")
    assert not (tmp_path / "run").exists()


def test_train_with_a_duplicate_id(tmp_path, files):
    rows = [{"id": f"r{i}", "text": f"text number {i}", "label": "a" if i % 2 else "b"} for i in range(8)]
    rows.append({"id": "r3", "text": "again", "label": "a"})
    data = write_jsonl(tmp_path / "dup.jsonl", rows)
    message = user_error(invoke("train", tmp_path / "run", "--data", data, "--plan", files["plan"]))
    assert has(message, f"Duplicate id 'r3' at line 4 of {data} and line 9 of {data}")
    assert not (tmp_path / "run" / "run.json").exists()


def test_train_with_an_unknown_plan_key(tmp_path, files, tiny_model):
    plan = write_toml(tmp_path / "plan.toml", PLAN | {"base_model": tiny_model, "num_shard": 2})
    message = user_error(invoke("train", tmp_path / "run", "--data", files["data"], "--plan", plan))
    assert has(message, "Unknown plan field(s): `num_shard`")
    assert not (tmp_path / "run").exists()


def test_delete_with_nothing_to_delete(cli_run):
    assert has(user_error(invoke("delete", cli_run)), "at least one id or subject")
    assert status_json(cli_run)["deleted_records"] == 0


@pytest.mark.parametrize("args", [
    ["delete"],                               # missing RUN_DIR
    ["predict", "somewhere", "--bogus"],      # unknown option
    ["frobnicate"],                           # unknown command
])
def test_usage_errors_exit_2(args):
    result = invoke(*args)
    user_error(result, code=2)
    assert "Usage:" in result.output


@pytest.mark.parametrize("option, value", [("--log-level", "bogus"), ("--guard", "maybe")])
def test_serve_rejects_an_unknown_choice_before_starting(tmp_path, option, value):
    # A missing run: were the value let through, the command would stop at opening it, not serve.
    result = invoke("serve", tmp_path / "run", option, value)
    user_error(result, code=2)
    assert has(result.stderr, f"Invalid value for '{option}'") and has(result.stderr, f"'{value}' is not one of")


def test_a_long_error_stays_on_one_line(tmp_path):
    missing = tmp_path / ("a-rather-long-folder-name-" * 4) / "run"
    result = invoke("predict", missing, "some text")
    user_error(result)
    assert len(result.stderr.splitlines()) == 1, result.stderr


def test_error_text_with_brackets_is_printed_verbatim(tmp_path, files):
    plan = tmp_path / "plan.toml"
    plan.write_text("epochs = 1\n[plan]\nnum_shards = 2\n", encoding="utf-8")
    message = user_error(invoke("train", tmp_path / "run", "--data", files["data"], "--plan", plan))
    assert has(message, "has a [plan] table")


def test_error_text_that_looks_like_markup_does_not_crash(tmp_path):
    message = user_error(invoke("train", tmp_path / "run", "--data", "data[/x].txt"))
    assert has(message, "data[/x].txt")


def test_delete_text_output_with_markup_like_ids(run_copy):
    out = ok(invoke("delete", run_copy, "--id", "[/x]"))
    assert has(out, "unknown ids ['[/x]']")


# -- capacity ------------------------------------------------------------------------------------------
def test_simulate_prints_simulation_and_closed_form_and_writes_outputs(tmp_path):
    out = ok(invoke("simulate", "-m", 2, "-L", 3, "-B", 1, "-B", 3, "--trials", 200,
                    "--out-json", tmp_path / "c.json", "--out-png", tmp_path / "c.png"))
    assert has(out, "closed form") and has(out, "cells") and has(out, "cyclic")
    results = json.loads((tmp_path / "c.json").read_text())["results"]
    assert [r["label"] for r in results] == ["cyclic B=1", "cyclic B=3"]
    assert has(out, f"{results[1]['closed_form']:.1f}")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_simulate_compares_selections_under_skew():
    out = ok(invoke("simulate", "-m", 2, "-L", 3, "-B", 2, "--selection", "cyclic", "--selection", "prior_aware",
                    "--distribution", "hot", "--population", 300, "--trials", 100))
    assert has(out, "hot") and has(out, "prior_a")


def test_simulate_reports_bad_settings_as_user_errors():
    assert has(user_error(invoke("simulate", "--distribution", "pareto", "--trials", 10)), "`distribution`")
    assert has(user_error(invoke("simulate", "--selection", "greedy", "--trials", 10)), "`selection`")


@pytest.mark.parametrize("option", ["--out-json", "--out-png"])
def test_simulate_checks_output_folders_before_simulating(tmp_path, monkeypatch, option):
    monkeypatch.setattr("s3t.capacity.sweep", lambda **_: pytest.fail("simulated before checking the output path"))
    missing = tmp_path / "no" / "such" / "x.out"
    message = user_error(invoke("simulate", "-m", 2, "-L", 2, "--trials", 10, option, missing))
    assert has(message, f"{option} {missing}: no folder {missing.parent}; create it first")
    assert has(user_error(invoke("simulate", "--trials", 10, option, tmp_path)), f"{option} {tmp_path} is a folder")


def test_simulate_reports_a_failed_write_as_a_user_error(tmp_path):
    too_long = tmp_path / ("x" * 300 + ".json")   # the folder exists, the name is over the OS limit
    message = user_error(invoke("simulate", "-m", 2, "-L", 2, "--trials", 10, "--out-json", too_long))
    assert has(message, f"cannot write --out-json {too_long}:") and has(message, "pick another path")


def test_plan_capacity_prints_confirmed_candidates():
    out = ok(invoke("plan-capacity", "--records", 2000, "--deletions", 10, "--max-slices", 4, "--trials", 200,
                    "--throughput", 100))
    assert has(out, "plans for 2,000 records that absorb 10 deletions")
    assert has(out, "passes/epoch") and re.search(r"\d+ (s|min|h)\b", out)


def test_plan_capacity_says_when_nothing_fits():
    message = user_error(invoke("plan-capacity", "--records", 50, "--deletions", 500, "--trials", 50))
    assert has(message, "no plan with at most 32 shards") and has(message, "--max-shards")
