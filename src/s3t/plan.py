"""The training plan: every setting of an S3T run, validated once and stored as sorted JSON.

A plan describes *what* to train (shards, slices, LoRA settings, optimiser) and how to serve it
(order selection, aggregation). It knows nothing about the model except what it is told: `blocks_for`
checks the layer-group layout against a model's block count once the backbone is loaded.

    >>> plan = Plan(num_shards=4, epochs=2)
    >>> plan
    Plan(num_shards=4, epochs=2)
    >>> Plan.from_json(plan.to_json()) == plan
    True
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import tomllib
from typing import Any, Literal, Mapping, get_args

from s3t.errors import PlanError

__all__ = ["Plan", "Selection", "Aggregation", "Placement", "Method", "Device", "DType"]

Method = Literal["s3t", "sisa"]
Device = Literal["auto", "cpu", "cuda"]
DType = Literal["float32", "bfloat16"]
Selection = Literal["cyclic", "bms", "random"]
Placement = Literal["hash", "prior_aware"]
Aggregation = Literal["mean_proba", "mean_logits", "vote"]

# Keys written next to the fields by `to_json` and skipped by `from_dict`.
_STAMP_KEYS = ("s3t_version",)


@dataclasses.dataclass(frozen=True, repr=False)
class Plan:
    """Settings of an S3T run: sharding, slicing, LoRA, optimiser, order selection and aggregation.

    Each field is checked on construction; an invalid value raises `PlanError` naming the field,
    the value received, what is allowed and the fix.
    """

    num_shards: int = 2  # m: disjoint shards, one ensemble member each
    num_slices: int = 3  # L: slices per shard, one LoRA layer group per slice
    budget: int | None = None  # B: slice orders trained per shard; None -> num_slices
    blocks_per_slice: int | None = None  # blocks per layer group; None -> num_blocks // num_slices
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] | None = None  # module names; None -> the family's query/value
    epochs: int = 1  # per training stage
    learning_rate: float = 1e-3
    batch_size: int = 16
    max_length: int = 128  # tokens kept per text
    seed: int = 0  # root of every derived seed
    selection: Selection = "cyclic"  # how the B orders of each shard are chosen
    deletion_prior: tuple[float, ...] | None = None  # per-slice deletion weight, used by "bms"
    placement: Placement = "hash"  # "prior_aware": records with risk > risk_threshold go to the risky slices
    risky_slices: int = 1  # prior_aware: the last `risky_slices` slices, trained last in every order
    risk_threshold: float = 0.5  # prior_aware: a record whose risk exceeds this is placed in a risky slice
    aggregation: Aggregation = "mean_proba"  # how shard predictions are combined
    method: Method = "s3t"  # "sisa": the baseline, every stage trains all adapted blocks, continuing the last
    base_model: str | None = None  # local Hugging Face folder; None -> embedded all-MiniLM-L6-v2
    # The task's label space, in predict_proba's column order. Part of the task, not of the data: a label
    # whose records are all deleted keeps its column, so a fresh training on the reduced data (with this
    # plan) has the same head. None -> fixed at create from the data's distinct labels, sorted.
    labels: tuple[str, ...] | None = None
    # Intra-op threads for training and inference. Bits depend on it (reductions split by thread), so it
    # is pinned: None -> fixed at create from torch's default on that machine.
    num_threads: int | None = None
    # Where the model runs: "auto" = CUDA when this process has it, else the CPU. Resolved per process (a run
    # trained on a GPU can be served from a CPU); the device actually used is part of the numeric environment,
    # so stages trained on different devices get different lineages and are never mixed in one order.
    device: Device = "auto"
    # The frozen model's weights and activations ("bfloat16": half the memory; adapters and heads stay float32).
    # Exact within one numeric environment, of which it is part (so a bf16 stage never passes for a float32 one).
    dtype: DType = "float32"

    def __post_init__(self) -> None:
        # Frozen dataclass: normalised values are written with object.__setattr__.
        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        put("num_shards", _int("num_shards", self.num_shards, low=1, fix="Use at least 1 shard."))
        put("num_slices", _int("num_slices", self.num_slices, low=1, fix="Use at least 1 slice."))
        if self.budget is not None:
            put("budget", _budget(self.budget, self.num_slices))
        if self.blocks_per_slice is not None:
            put("blocks_per_slice", _int("blocks_per_slice", self.blocks_per_slice, low=1, or_none=True,
                                         fix="Use None to split the model's blocks evenly."))
        put("lora_rank", _int("lora_rank", self.lora_rank, low=1, fix="Use a rank such as 8."))
        put("lora_alpha", _float("lora_alpha", self.lora_alpha, low=0.0, allowed="a float > 0",
                                 fix="Use a scale such as 16.0 (often 2 x `lora_rank`)."))
        put("lora_dropout", _float("lora_dropout", self.lora_dropout, low=0.0, high=1.0,
                                   low_inclusive=True, allowed="a float in [0, 1)",
                                   fix="Use 0.0 to disable dropout."))
        if self.lora_targets is not None:
            put("lora_targets", _targets(self.lora_targets))
        put("epochs", _int("epochs", self.epochs, low=1, fix="Use at least 1 epoch."))
        put("learning_rate", _float("learning_rate", self.learning_rate, low=0.0,
                                    allowed="a float > 0", fix="Use a value such as 1e-3."))
        put("batch_size", _int("batch_size", self.batch_size, low=1, fix="Use a size such as 16."))
        put("max_length", _int("max_length", self.max_length, low=1,
                               fix="Use the number of tokens to keep per text, such as 128."))
        put("seed", _int("seed", self.seed, low=0, fix="Use a non-negative int such as 0."))
        _choice("selection", self.selection, get_args(Selection))
        _choice("aggregation", self.aggregation, get_args(Aggregation))
        _choice("method", self.method, get_args(Method))
        if self.deletion_prior is not None:
            put("deletion_prior", _prior(self.deletion_prior, self.num_slices))
        _choice("placement", self.placement, get_args(Placement))
        put("risky_slices", _int("risky_slices", self.risky_slices, low=1,
                                 fix="Use 1 (one slice per shard collects the risky records)."))
        put("risk_threshold", _float("risk_threshold", self.risk_threshold, low=0.0, high=1.0,
                                     low_inclusive=True, allowed="a float in [0, 1)",
                                     fix="Use 0.5: records more likely than not to be deleted are risky."))
        if self.placement == "prior_aware":
            _check_prior_aware(self)
        if self.base_model is not None:
            put("base_model", _base_model(self.base_model))
        if self.labels is not None:
            put("labels", _labels(self.labels))
        _choice("device", self.device, get_args(Device))
        _choice("dtype", self.dtype, get_args(DType))
        if self.num_threads is not None:
            put("num_threads", _int("num_threads", self.num_threads, low=1, or_none=True,
                                    fix="Use None to take torch's default on the machine that creates the run."))

    @property
    def resolved_budget(self) -> int:
        """Number of slice orders trained per shard (`budget`, or `num_slices` when unset)."""
        return self.num_slices if self.budget is None else self.budget

    def blocks_for(self, num_blocks: int) -> int:
        """Transformer blocks per layer group for a model with `num_blocks` blocks.

        Raises `PlanError` when the `num_slices` groups do not fit in the model.
        """
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive int; got {num_blocks!r}.")
        if self.num_slices > num_blocks:
            raise PlanError(
                f"`num_slices` = {self.num_slices} needs at least {self.num_slices} transformer blocks "
                f"(one per layer group), but the model has {num_blocks}. "
                f"Lower `num_slices` to at most {num_blocks} or use a deeper model."
            )
        if self.blocks_per_slice is None:
            return max(1, num_blocks // self.num_slices)
        needed = self.num_slices * self.blocks_per_slice
        if needed > num_blocks:
            raise PlanError(
                f"`blocks_per_slice` = {self.blocks_per_slice} with `num_slices` = {self.num_slices} "
                f"needs {needed} transformer blocks, but the model has {num_blocks}. "
                f"Lower `blocks_per_slice` to at most {num_blocks // self.num_slices}, "
                "lower `num_slices`, or set `blocks_per_slice` to None."
            )
        return self.blocks_per_slice

    def training_fields(self, num_blocks: int) -> dict[str, Any]:
        """The settings that change what one training stage computes, as JSON-ready values.

        Sharding, budget, order selection and aggregation only decide *which* stages run, the base model
        enters lineage through its own content digest and the thread count, device and dtype through the
        numeric environment (`s3t.environment`), so they are left out (and lineages of float32 runs on the
        CPU are the ones they were before these settings existed).
        """
        return {
            "method": self.method,
            "num_slices": self.num_slices,
            "blocks_per_slice": self.blocks_for(num_blocks),
            "lora_rank": self.lora_rank,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "lora_targets": None if self.lora_targets is None else list(self.lora_targets),
            "epochs": self.epochs,
            "learning_rate": self.learning_rate,
            "batch_size": self.batch_size,
            "max_length": self.max_length,
            "seed": self.seed,
            "labels": None if self.labels is None else list(self.labels),
        }

    def replace(self, **changes: Any) -> Plan:
        """A validated copy of this plan with `changes` applied."""
        _check_keys(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict, tuples as lists."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in dataclasses.fields(self)
        }

    def to_json(self) -> str:
        """Sorted, indented JSON of the fields, stamped with the s3t version."""
        return json.dumps({**self.to_dict(), "s3t_version": _s3t_version()}, sort_keys=True, indent=2)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        """Build a plan from a mapping of field names; unknown keys raise `PlanError`."""
        if not isinstance(data, Mapping):
            raise PlanError(f"A plan must be a mapping of field names to values; got {type(data).__name__}.")
        fields = {k: v for k, v in data.items() if k not in _STAMP_KEYS}
        _check_keys(fields)
        return cls(**fields)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """Build a plan from the JSON written by `to_json`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"The plan is not valid JSON: {e}. Write it with `Plan.to_json()`.") from e
        if not isinstance(data, dict):
            raise PlanError(f"A plan in JSON must be an object; got {type(data).__name__}.")
        return cls.from_dict(data)

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> Plan:
        """Build a plan from a TOML file, with the fields at top level or in a `[plan]` table."""
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError as e:
            raise PlanError(f"No plan file at {os.fspath(path)!r}. Check the path.") from e
        except OSError as e:
            raise PlanError(f"Cannot read the plan file {os.fspath(path)!r}: {e.strerror}.") from e
        except tomllib.TOMLDecodeError as e:
            raise PlanError(f"The plan file {os.fspath(path)!r} is not valid TOML: {e}.") from e
        if isinstance(data.get("plan"), dict):
            # Other tables may configure other tools; loose keys beside [plan] are a mistake.
            loose = sorted(k for k, v in data.items() if k != "plan" and not isinstance(v, dict))
            if loose:
                raise PlanError(
                    f"The plan file {os.fspath(path)!r} has a [plan] table and also top-level keys "
                    f"{', '.join(f'`{k}`' for k in loose)}. Move them into the [plan] table."
                )
            data = data["plan"]
        return cls.from_dict(data)

    def __repr__(self) -> str:
        changed = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != f.default
        ]
        return f"Plan({', '.join(changed)})"


def _check_keys(keys: Mapping[str, Any]) -> None:
    valid = [f.name for f in dataclasses.fields(Plan)]
    unknown = sorted(str(k) for k in keys if k not in valid)
    if unknown:
        raise PlanError(
            f"Unknown plan field(s): {', '.join(f'`{k}`' for k in unknown)}. "
            f"Valid fields are: {', '.join(valid)}. Check the spelling, or upgrade s3t if the plan "
            "was written by a newer version."
        )


def _s3t_version() -> str:
    # Imported here: s3t/__init__ may import this module, and the version may not be set yet.
    try:
        from s3t import __version__

        return str(__version__)
    except ImportError:
        pass
    from importlib import metadata

    try:
        return metadata.version("s3t")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _got(value: object) -> str:
    """`value` as shown after "got", with its type when the type is the problem."""
    if isinstance(value, (bool, str)) or not isinstance(value, numbers.Real):
        return f"{value!r} ({type(value).__name__})"
    return repr(value)


def _int(name: str, value: object, *, low: int, fix: str, or_none: bool = False) -> int:
    allowed = f"an int >= {low}" + (" or None" if or_none else "")
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        result = int(value)
    elif isinstance(value, float) and value.is_integer():
        result = int(value)  # 4.0 from a config file means 4
    else:
        raise PlanError(f"`{name}` must be {allowed}; got {_got(value)}. {fix}")
    if result < low:
        raise PlanError(f"`{name}` must be {allowed}; got {result}. {fix}")
    return result


def _float(name: str, value: object, *, low: float, high: float = math.inf, low_inclusive: bool = False,
           allowed: str, fix: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise PlanError(f"`{name}` must be {allowed}; got {_got(value)}. {fix}")
    result = float(value)
    above = result >= low if low_inclusive else result > low
    if not (above and result < high and math.isfinite(result)):
        raise PlanError(f"`{name}` must be {allowed}; got {value!r}. {fix}")
    return result


def _budget(value: object, num_slices: int) -> int:
    result = _int("budget", value, low=1, or_none=True,
                  fix="Use None to train `num_slices` orders per shard.")
    # L! grows fast; stop multiplying once it exceeds the budget, the only question asked of it.
    orders = 1
    for k in range(2, num_slices + 1):
        orders *= k
        if orders > result:
            return result
    if result > orders:
        raise PlanError(
            f"`budget` must be an int in [1, {orders}] (at most num_slices! = {orders} distinct orders "
            f"of {num_slices} slices); got {result}. Lower `budget` or raise `num_slices`."
        )
    return result


def _choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise PlanError(f"`{name}` must be one of {options}; got {value!r}. Pick one of those.")


def _targets(value: object) -> tuple[str, ...]:
    fix = "Pass module names such as ['query', 'value'], or None for the model family's default."
    if isinstance(value, str):
        raise PlanError(f"`lora_targets` must be a list of module names; got the string {value!r}. "
                        f"Wrap it in a list: [{value!r}].")
    if not isinstance(value, (list, tuple)) or not value:
        raise PlanError(f"`lora_targets` must be a non-empty list of module names or None; "
                        f"got {value!r}. {fix}")
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise PlanError(f"`lora_targets` must hold non-empty strings; got {item!r} in {list(value)!r}. "
                            f"{fix}")
    repeated = sorted({t for t in value if value.count(t) > 1})
    if repeated:
        raise PlanError(f"`lora_targets` names {', '.join(map(repr, repeated))} more than once; "
                        f"got {list(value)!r}. List each module once.")
    return tuple(value)


def _prior(value: object, num_slices: int) -> tuple[float, ...]:
    fix = f"Give one non-negative weight per slice, e.g. {[1.0] * num_slices}."
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise PlanError(f"`deletion_prior` must be a list of {num_slices} numbers or None; "
                        f"got {_got(value)}. {fix}")
    if len(value) != num_slices:
        raise PlanError(f"`deletion_prior` must have one weight per slice ({num_slices} = `num_slices`); "
                        f"got {len(value)}: {list(value)!r}. {fix}")
    weights = []
    for w in value:
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w) or w < 0:
            raise PlanError(f"`deletion_prior` weights must be finite numbers >= 0; got {w!r} in "
                            f"{list(value)!r}. {fix}")
        weights.append(float(w))
    if sum(weights) <= 0:
        raise PlanError(f"`deletion_prior` must have a positive sum; got {list(value)!r}. {fix}")
    return tuple(weights)


def _check_prior_aware(plan: Plan) -> None:
    if plan.num_slices < 2:
        raise PlanError(f"`placement` = 'prior_aware' needs `num_slices` >= 2 (at least one slice for risky "
                        f"records and one for the rest); got {plan.num_slices}. Raise `num_slices` or use "
                        "placement = 'hash'.")
    if plan.risky_slices >= plan.num_slices:
        raise PlanError(f"`risky_slices` must be below `num_slices` = {plan.num_slices} so that orders can "
                        f"start with a safe slice; got {plan.risky_slices}. Use at most {plan.num_slices - 1} "
                        "(1 is usually best).")
    if plan.selection != "cyclic":
        raise PlanError(f"`placement` = 'prior_aware' chooses the orders itself (safe slices rotated, risky "
                        f"slices last), so `selection` must be 'cyclic'; got {plan.selection!r}. Leave "
                        "`selection` at 'cyclic', or use placement = 'hash' for 'bms' and 'random'.")


def _labels(value: object) -> tuple[str, ...]:
    fix = "Give the task's label names, e.g. ['business', 'sport'], or None to take them from the data."
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
        raise PlanError(f"`labels` must be a non-empty list of label names or None; got {_got(value)}. {fix}")
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise PlanError(f"`labels` must hold non-blank strings; got {item!r} in {list(value)!r}. {fix}")
    repeated = sorted({label for label in value if value.count(label) > 1})
    if repeated:
        raise PlanError(f"`labels` names {', '.join(map(repr, repeated))} more than once; got {list(value)!r}. "
                        "List each label once.")
    return tuple(value)


def _base_model(value: object) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)  # stored as text so the plan stays JSON
    if not isinstance(value, str) or not value.strip():
        raise PlanError(f"`base_model` must be the path of a local Hugging Face model folder or None; "
                        f"got {value!r}. Use None for the embedded all-MiniLM-L6-v2.")
    return value
