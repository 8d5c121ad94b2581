"""ViT-like image encoders for classification: patch embeddings, a stack of encoder blocks, a final layernorm,
then the class token into a linear head per stage.

One shape covers the image encoders of transformers 5.24 named vit, deit, vit_msn, dinov2,
dinov2_with_registers, ijepa and pixio: `model.embeddings(pixel_values)` -> a `ModuleList` of blocks called
as `block(hidden, None)` -> `model.layernorm`. (vit_mae masks patches at random in its embeddings, beit and
data2vec-vision pass relative position biases between blocks, dinov3_vit rotary embeddings: not this shape.)
transformers 5 names ViT's projections `attention.q_proj/k_proj/v_proj/o_proj` and `mlp.fc1/fc2`; LoRA
targets are found among the loaded modules (`base.default_lora_targets`), as for every family.

Pooling: the class token after the final layernorm (the mean of the class tokens for pixio, which has
several), as each model's own `...ForImageClassification` head reads it; models without a class token
(ijepa) use the mean of all tokens, as IJepaForImageClassification does. So a pretrained checkpoint's
classification features are the ones fine-tuned, and a head trained on them transfers.

Preprocessing is the model folder's image processor (`preprocessor_config.json`) with Pillow's backend (pure
numpy: no torchvision kernel, whose bits could differ), or ViT's defaults (resize to the config's
`image_size`, scale to [0, 1], normalise with mean = std = 0.5) when the folder has none. Each image is
processed on its own, so a record's pixel values never depend on its batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ..errors import PlanError
from .base import Batch, LayeredModel

__all__ = ["ImageEncoder", "MODEL_TYPES"]

MODEL_TYPES = ("deit", "dinov2", "dinov2_with_registers", "ijepa", "pixio", "vit", "vit_msn")
_MODES = {3: "RGB", 1: "L"}   # config.num_channels -> the PIL mode images are converted to


class ImageEncoder(LayeredModel):
    """A frozen ViT-like encoder classifying images (given as PNG/JPEG bytes, see `s3t.images`)."""

    task = "classify"
    kind = "image"
    aux_fields: ClassVar[tuple[str, ...]] = ()   # every image has the same number of tokens: no mask to keep

    def load(self, path: Path) -> nn.Module:
        from transformers import AutoModel

        from .encoder import _has_pooler

        kwargs = {"add_pooling_layer": False} if _has_pooler(path) else {}
        model = AutoModel.from_pretrained(path, **self.load_kwargs(), **kwargs)
        config = model.config
        if config.num_channels not in _MODES:
            raise PlanError(f"the base model takes images of {config.num_channels} channels; s3t feeds RGB (3) or "
                            "grey (1) images")
        self.mode = _MODES[config.num_channels]
        self.processor = _image_processor(path, config)
        embeddings = model.embeddings
        # Class tokens at the front of the sequence: pixio has `n_cls_tokens`, the others one or none.
        self.class_tokens = int(getattr(embeddings, "n_cls_tokens", 1 if hasattr(embeddings, "cls_token") else 0))
        return model

    def prepare(self, images: Sequence[bytes]) -> Batch:
        """Pixel values (B, C, H, W) of encoded images, each processed alone (its values never depend on its batch)."""
        from ..images import decode

        pixels = [self.processor(images=[decode(image, self.mode)], return_tensors="pt")["pixel_values"]
                  for image in images]
        return self.to_device({"pixel_values": torch.cat(pixels).to(self.dtype)})

    def embed(self, batch: Batch) -> torch.Tensor:
        return self.model.embeddings(batch["pixel_values"])

    def run_blocks(self, hidden: torch.Tensor, batch: Batch, start: int, stop: int) -> torch.Tensor:
        for block in self.blocks[start:stop]:
            hidden = block(hidden, None)   # every token attends to every other: no attention mask
        return hidden

    def output(self, hidden: torch.Tensor, batch: Batch, *, slot: int = 0) -> torch.Tensor:
        """Final layernorm, the class token (or the mean token), then the head of `slot`: logits (B, labels)."""
        hidden = self.model.layernorm(hidden)
        pooled = hidden[:, :self.class_tokens].mean(1) if self.class_tokens else hidden.mean(1)
        head = self.heads[slot]
        return head(pooled.to(head.weight.dtype))

    def loss(self, outputs: torch.Tensor, batch: Batch, targets: torch.Tensor | None) -> torch.Tensor:
        return nn.functional.cross_entropy(outputs, targets)


def _image_processor(path: Path, config):
    """The folder's image processor on Pillow's backend, or ViT's defaults at the config's image size."""
    from transformers import AutoImageProcessor

    if (path / "preprocessor_config.json").is_file():
        return AutoImageProcessor.from_pretrained(path, backend="pil")
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    channels = config.num_channels
    return ViTImageProcessorPil(size={"height": size, "width": size}, image_mean=[0.5] * channels,
                                image_std=[0.5] * channels)
