"""Tests for s3t.plan: validation messages, serialisation round trips, repr and training fields."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from s3t.errors import PlanError
from s3t.plan import Plan


def test_defaults_and_resolved_budget() -> None:
    plan = Plan()
    assert (plan.num_shards, plan.num_slices, plan.budget) == (2, 3, None)
    assert plan.resolved_budget == 3
    assert Plan(budget=5).resolved_budget == 5


def test_plan_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Plan().num_shards = 3  # type: ignore[misc]


def test_normalises_lists_and_exact_floats() -> None:
    plan = Plan(num_shards=4.0, lora_alpha=8, lora_targets=["query", "key"], deletion_prior=[1, 2, 3])
    assert plan.num_shards == 4 and type(plan.num_shards) is int
    assert plan.lora_alpha == 8.0 and type(plan.lora_alpha) is float
    assert plan.lora_targets == ("query", "key")
    assert plan.deletion_prior == (1.0, 2.0, 3.0)
    assert Plan(base_model=Path("/models/x")).base_model == "/models/x"


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"num_shards": 0}, ["`num_shards`", "int >= 1", "got 0"]),
        ({"num_shards": 2.5}, ["`num_shards`", "got 2.5"]),
        ({"num_shards": True}, ["`num_shards`", "True (bool)"]),
        ({"num_slices": "3"}, ["`num_slices`", "'3' (str)"]),
        ({"blocks_per_slice": 0}, ["`blocks_per_slice`", "or None", "got 0"]),
        ({"lora_rank": -1}, ["`lora_rank`", "got -1"]),
        ({"lora_alpha": 0}, ["`lora_alpha`", "float > 0", "got 0"]),
        ({"lora_dropout": 1.0}, ["`lora_dropout`", "[0, 1)", "got 1.0", "0.0 to disable"]),
        ({"lora_dropout": -0.1}, ["`lora_dropout`", "got -0.1"]),
        ({"learning_rate": 0.0}, ["`learning_rate`", "got 0.0"]),
        ({"learning_rate": math.inf}, ["`learning_rate`", "got inf"]),
        ({"learning_rate": math.nan}, ["`learning_rate`", "got nan"]),
        ({"learning_rate": False}, ["`learning_rate`", "False (bool)"]),
        ({"epochs": 0}, ["`epochs`", "got 0"]),
        ({"batch_size": 0}, ["`batch_size`", "got 0"]),
        ({"max_length": 0}, ["`max_length`", "got 0"]),
        ({"seed": -1}, ["`seed`", "int >= 0", "got -1"]),
        ({"selection": "greedy"}, ["`selection`", "'cyclic', 'bms', 'random'", "got 'greedy'"]),
        ({"aggregation": "max"}, ["`aggregation`", "'mean_proba', 'mean_logits', 'vote'", "got 'max'"]),
        ({"lora_targets": []}, ["`lora_targets`", "non-empty"]),
        ({"lora_targets": "query"}, ["`lora_targets`", "string 'query'", "['query']"]),
        ({"lora_targets": ["query", ""]}, ["`lora_targets`", "non-empty strings", "got ''"]),
        ({"lora_targets": ["query", "query"]}, ["`lora_targets`", "'query' more than once"]),
        ({"deletion_prior": [1.0, 1.0]}, ["`deletion_prior`", "one weight per slice", "got 2"]),
        ({"deletion_prior": [1.0, -1.0, 1.0]}, ["`deletion_prior`", ">= 0", "got -1.0"]),
        ({"deletion_prior": [0, 0, 0]}, ["`deletion_prior`", "positive sum"]),
        ({"deletion_prior": "1,1,1"}, ["`deletion_prior`", "(str)"]),
        ({"base_model": ""}, ["`base_model`", "None for the embedded"]),
        ({"budget": 0}, ["`budget`", "got 0"]),
        # placement
        ({"placement": "smart"}, ["`placement`", "'hash', 'prior_aware'", "got 'smart'"]),
        ({"risky_slices": 0}, ["`risky_slices`", "int >= 1", "got 0"]),
        ({"risk_threshold": 1.0}, ["`risk_threshold`", "[0, 1)", "got 1.0"]),
        ({"risk_threshold": "high"}, ["`risk_threshold`", "'high' (str)"]),
        ({"placement": "prior_aware", "num_slices": 1}, ["`num_slices` >= 2", "got 1", "placement = 'hash'"]),
        ({"placement": "prior_aware", "risky_slices": 3}, ["`risky_slices`", "got 3", "at most 2"]),
        ({"placement": "prior_aware", "selection": "bms"}, ["`selection` must be 'cyclic'", "got 'bms'"]),
    ],
)
def test_invalid_field_messages(changes: dict, expected: list[str]) -> None:
    with pytest.raises(PlanError) as info:
        Plan(**changes)
    for part in expected:
        assert part in str(info.value)


def test_budget_above_factorial_names_the_limit_and_fix() -> None:
    with pytest.raises(PlanError) as info:
        Plan(num_slices=3, budget=7)
    message = str(info.value)
    assert "`budget` must be an int in [1, 6]" in message
    assert "num_slices! = 6 distinct orders of 3 slices" in message
    assert "got 7" in message and "Lower `budget` or raise `num_slices`" in message
    assert Plan(num_slices=3, budget=6).budget == 6


def test_large_num_slices_accepts_a_modest_budget() -> None:
    # L! is only compared with the budget, so a deep slicing with a small budget is valid.
    assert Plan(num_slices=10_000, budget=10**9).resolved_budget == 10**9


def test_deletion_prior_accepted_with_any_selection() -> None:
    assert Plan(selection="cyclic", deletion_prior=(1, 0, 0)).deletion_prior == (1.0, 0.0, 0.0)


@pytest.mark.parametrize(
    ("plan", "num_blocks", "expected"),
    [(Plan(num_slices=3), 6, 2), (Plan(num_slices=3), 7, 2), (Plan(num_slices=2), 2, 1),
     (Plan(num_slices=3, blocks_per_slice=1), 6, 1), (Plan(num_slices=1), 6, 6)],
)
def test_blocks_for(plan: Plan, num_blocks: int, expected: int) -> None:
    assert plan.blocks_for(num_blocks) == expected


def test_blocks_for_too_many_blocks_per_slice() -> None:
    with pytest.raises(PlanError) as info:
        Plan(num_slices=3, blocks_per_slice=3).blocks_for(6)
    message = str(info.value)
    assert "needs 9 transformer blocks" in message and "the model has 6" in message
    assert "at most 2" in message


def test_blocks_for_more_slices_than_blocks() -> None:
    with pytest.raises(PlanError, match=r"`num_slices` = 3 .* the model has 2\. Lower `num_slices` to at most 2"):
        Plan(num_slices=3).blocks_for(2)


def test_labels_are_the_task_label_space_in_their_declared_order() -> None:
    plan = Plan(labels=["sport", "business"])
    assert plan.labels == ("sport", "business")
    assert Plan.from_json(plan.to_json()) == plan
    assert plan.training_fields(6)["labels"] == ["sport", "business"]   # part of every lineage


@pytest.mark.parametrize("labels, match", [
    ("sport", r"`labels` must be a non-empty list.*got 'sport'"),
    ([], r"`labels` must be a non-empty list"),
    (["sport", " "], r"`labels` must hold non-blank strings; got ' '"),
    (["sport", 3], r"`labels` must hold non-blank strings; got 3"),
    (["a", "b", "a"], r"`labels` names 'a' more than once"),
])
def test_labels_are_checked(labels, match) -> None:
    with pytest.raises(PlanError, match=match):
        Plan(labels=labels)


def test_device_and_dtype_are_choices_that_enter_lineage_through_the_environment() -> None:
    assert (Plan().device, Plan().dtype) == ("auto", "float32")
    with pytest.raises(PlanError, match=r"`device` must be one of 'auto', 'cpu', 'cuda'; got 'gpu'"):
        Plan(device="gpu")
    with pytest.raises(PlanError, match=r"`dtype` must be one of 'float32', 'bfloat16'; got 'float16'"):
        Plan(dtype="float16")
    plan = Plan(device="cuda", dtype="bfloat16")
    assert Plan.from_json(plan.to_json()) == plan and repr(plan) == "Plan(device='cuda', dtype='bfloat16')"
    # not training fields: the numeric environment carries the device actually used and the dtype (so lineages
    # of float32 CPU runs are those they were before these settings existed)
    assert plan.training_fields(6) == Plan().training_fields(6)


def test_num_threads_is_a_positive_int_or_none() -> None:
    assert Plan(num_threads=1).num_threads == 1 and Plan().num_threads is None
    with pytest.raises(PlanError, match=r"`num_threads` must be an int >= 1 or None; got 0"):
        Plan(num_threads=0)


def test_to_json_is_sorted_indented_and_stamped() -> None:
    text = Plan(lora_targets=("query",)).to_json()
    data = json.loads(text)
    assert list(data) == sorted(data)
    assert data["s3t_version"] and data["lora_targets"] == ["query"]
    assert text.startswith('{\n  "aggregation"')


def test_from_dict_names_unknown_keys_sorted() -> None:
    with pytest.raises(PlanError) as info:
        Plan.from_dict({"num_shards": 2, "zeta": 1, "alpha": 2})
    message = str(info.value)
    assert "`alpha`, `zeta`" in message and "num_shards" in message and "lora_rank" in message


def test_from_dict_ignores_version_stamp() -> None:
    assert Plan.from_dict({"num_shards": 5, "s3t_version": "9.9"}) == Plan(num_shards=5)


def test_from_json_rejects_bad_json_and_non_objects() -> None:
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.from_json("{num_shards: 2")
    with pytest.raises(PlanError, match="must be an object; got list"):
        Plan.from_json("[1, 2]")


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    num_slices = draw(st.integers(1, 5))
    budget = draw(st.none() | st.integers(1, math.factorial(num_slices)))
    prior = draw(st.none() | st.lists(st.floats(0.01, 10), min_size=num_slices, max_size=num_slices))
    targets = draw(st.none() | st.lists(st.sampled_from(["query", "key", "value", "dense"]),
                                        min_size=1, max_size=4, unique=True))
    return Plan(
        num_shards=draw(st.integers(1, 64)), num_slices=num_slices, budget=budget,
        blocks_per_slice=draw(st.none() | st.integers(1, 4)), lora_rank=draw(st.integers(1, 64)),
        lora_alpha=draw(st.floats(0.1, 128)), lora_dropout=draw(st.floats(0, 0.99)),
        lora_targets=targets, epochs=draw(st.integers(1, 5)), learning_rate=draw(st.floats(1e-6, 1)),
        batch_size=draw(st.integers(1, 256)), max_length=draw(st.integers(1, 512)),
        seed=draw(st.integers(0, 2**32)), selection=draw(st.sampled_from(["cyclic", "bms", "random"])),
        deletion_prior=prior, aggregation=draw(st.sampled_from(["mean_proba", "mean_logits", "vote"])),
        base_model=draw(st.none() | st.text(min_size=1).filter(str.strip)),
    )


@settings(max_examples=60, deadline=None)
@given(plans())
def test_json_round_trip(plan: Plan) -> None:
    again = Plan.from_json(plan.to_json())
    assert again == plan
    assert again.to_json() == plan.to_json()


@settings(max_examples=30, deadline=None)
@given(plans())
def test_repr_shows_only_non_defaults(plan: Plan) -> None:
    text = repr(plan)
    for f in dataclasses.fields(Plan):
        assert (f"{f.name}=" in text) == (getattr(plan, f.name) != f.default)


def test_repr_examples() -> None:
    assert repr(Plan()) == "Plan()"
    assert repr(Plan(num_shards=4, epochs=2)) == "Plan(num_shards=4, epochs=2)"
    assert repr(Plan(num_shards=2)) == "Plan()"


def test_from_toml_top_level_and_plan_table(tmp_path: Path) -> None:
    top = tmp_path / "top.toml"
    top.write_text('num_shards = 4\nlora_targets = ["query", "value"]\nlearning_rate = 5e-4\n')
    table = tmp_path / "table.toml"
    table.write_text('[service]\nport = 8000\n\n[plan]\nnum_shards = 4\nlora_targets = ["query", "value"]\n'
                     'learning_rate = 5e-4\n')
    expected = Plan(num_shards=4, lora_targets=("query", "value"), learning_rate=5e-4)
    assert Plan.from_toml(top) == expected
    assert Plan.from_toml(str(table)) == expected


def test_from_toml_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(PlanError, match=r"No plan file at .*nope\.toml"):
        Plan.from_toml(missing)
    bad = tmp_path / "bad.toml"
    bad.write_text("num_shards = = 2\n")
    with pytest.raises(PlanError, match=r"bad\.toml.*not valid TOML.*line 1"):
        Plan.from_toml(bad)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[plan]\nshards = 2\n")
    with pytest.raises(PlanError, match="`shards`"):
        Plan.from_toml(unknown)
    mixed = tmp_path / "mixed.toml"
    mixed.write_text("epochs = 2\n[plan]\nnum_shards = 2\n")
    with pytest.raises(PlanError, match="top-level keys `epochs`"):
        Plan.from_toml(mixed)


def test_training_fields_exclude_non_training_settings() -> None:
    plan = Plan(num_slices=3, lora_targets=("query",))
    fields = plan.training_fields(6)
    assert fields["blocks_per_slice"] == 2 and fields["lora_targets"] == ["query"]
    assert set(fields) == {"method", "num_slices", "blocks_per_slice", "lora_rank", "lora_alpha", "lora_dropout",
                           "lora_targets", "epochs", "learning_rate", "batch_size", "max_length", "seed", "labels"}
    json.dumps(fields)  # must be hashable as JSON
    # Settings that only choose which stages run, or how they are served, must not change lineage.
    other = plan.replace(num_shards=7, budget=6, selection="bms", deletion_prior=(1, 2, 3),
                         aggregation="vote", base_model="/elsewhere")
    assert other.training_fields(6) == fields
    assert plan.replace(epochs=2).training_fields(6) != fields
    assert plan.replace(method="sisa").training_fields(6) != fields


def test_replace_validates_and_names_unknown_fields() -> None:
    plan = Plan()
    assert plan.replace(num_shards=5) == Plan(num_shards=5)
    assert plan == Plan()  # the original is untouched
    with pytest.raises(PlanError, match="`num_shards`"):
        plan.replace(num_shards=0)
    with pytest.raises(PlanError, match="`shards`"):
        plan.replace(shards=5)


# -- prior-aware placement -----------------------------------------------------------------------------
def test_placement_defaults_and_round_trip() -> None:
    plan = Plan()
    assert (plan.placement, plan.risky_slices, plan.risk_threshold) == ("hash", 1, 0.5)
    aware = Plan(num_slices=4, placement="prior_aware", risky_slices=2, risk_threshold=0.25)
    assert repr(aware) == "Plan(num_slices=4, placement='prior_aware', risky_slices=2, risk_threshold=0.25)"
    assert Plan.from_json(aware.to_json()) == aware
    # A plan stored before these fields existed still loads, with hash placement.
    old = {k: v for k, v in json.loads(plan.to_json()).items()
           if k not in ("placement", "risky_slices", "risk_threshold")}
    assert Plan.from_dict(old) == plan
    # Placement decides where records go, not what a stage computes from them.
    assert aware.training_fields(6) == Plan(num_slices=4).training_fields(6)


def test_hash_placement_ignores_risky_slices_beyond_num_slices() -> None:
    # risky_slices only has to fit when it is used.
    assert Plan(num_slices=1, risky_slices=3).num_slices == 1
