"""The numeric environment: what a trained artifact's bits depend on besides its lineage.

The same lineage trains to the same bits only on the same numeric stack. Some of it s3t can pin: the
intra-op thread count (reductions are split by thread, so a head gradient summed by 1 or by 2 threads
differs in its last bits) is fixed per run and set around every training and inference call. The rest it
can only record: the torch/transformers/peft versions, the device (on CUDA with the GPU's name and compute
capability), the dtype and the CPU's vector instruction set (AVX2 and AVX512 kernels round differently). The
environment's fingerprint is part of every stage's lineage hash, so a stage trained elsewhere never matches,
and a restore on another machine retrains an order from its first stage instead of splicing stages from two
environments into one model.

On CUDA, training and prediction run under `torch.use_deterministic_algorithms(True)` (inside `pinned`), with
cuBLAS told to use fixed workspaces (`CUBLAS_WORKSPACE_CONFIG=:4096:8`, which cuBLAS reads once, when it first
starts in a process: `s3t.models` sets it on import unless it is already set, so import s3t before any other
CUDA work, or export it yourself). Models load with eager attention there (`LayeredModel.load_kwargs`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import cache

__all__ = ["NumericEnvironment", "current", "pinned", "resolve_device"]


@dataclass(frozen=True)
class NumericEnvironment:
    """The numeric stack a stage is trained on; `fingerprint` names it inside lineage hashes."""

    torch: str
    transformers: str
    peft: str
    device: str            # "cpu", or "cuda" with the GPU's name and compute capability
    cpu_capability: str    # the vector instruction set torch's CPU kernels were dispatched to
    dtype: str
    threads: int           # intra-op threads, pinned while training and predicting

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return asdict(self)

    def differences(self, other: "NumericEnvironment") -> list[str]:
        """Human-readable `field: this -> other` for every field that differs."""
        mine, theirs = asdict(self), asdict(other)
        return [f"{k}: {mine[k]} -> {theirs[k]}" for k in mine if mine[k] != theirs[k]]


@cache
def _stack() -> tuple[str, str, str, str]:
    from importlib.metadata import version

    import torch

    return torch.__version__, version("transformers"), version("peft"), torch.backends.cpu.get_cpu_capability()


def resolve_device(requested: str) -> str:
    """The torch device a plan's `device` setting means in this process: "cpu" or "cuda"."""
    import torch

    if requested == "cpu":
        return "cpu"
    if torch.cuda.is_available():   # counts devices without starting cuBLAS (see the module docstring)
        return "cuda"
    if requested == "cuda":
        from .errors import PlanError

        raise PlanError("`device` = 'cuda', but this process sees no CUDA device (torch.cuda.is_available() is "
                        "False); use device = 'auto' (CUDA when present, else the CPU) or 'cpu'")
    return "cpu"


@cache
def _device_name(device: str) -> str:
    """"cpu", or "cuda <GPU name> sm_<major><minor>": which kernels the device runs (not its index)."""
    if device == "cpu":
        return "cpu"
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return f"cuda {torch.cuda.get_device_name(device)} sm_{major}{minor}"


def current(*, threads: int, device: str = "cpu", dtype: str = "float32") -> NumericEnvironment:
    """The environment this process trains in on `device` ("cpu" or "cuda") in `dtype`, with `threads`
    intra-op threads."""
    torch_version, transformers_version, peft_version, capability = _stack()
    return NumericEnvironment(torch=torch_version, transformers=transformers_version, peft=peft_version,
                              device=_device_name(device), cpu_capability=capability, dtype=dtype, threads=threads)


@contextmanager
def pinned(environment: NumericEnvironment) -> Iterator[None]:
    """Run with the environment's thread count (and, on CUDA, deterministic algorithms only), then give the
    process its own settings back."""
    import torch

    before = torch.get_num_threads()
    if before != environment.threads:
        torch.set_num_threads(environment.threads)
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())
    if environment.device.startswith("cuda"):
        torch.use_deterministic_algorithms(True)   # an op with no deterministic kernel raises instead of drifting
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
        if (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled()) != deterministic:
            torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
