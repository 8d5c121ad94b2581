"""What every model family shares: a frozen pretrained transformer cut into top-down LoRA layer groups.

Group 1 is the top group (the blocks nearest the output); a depth-d model runs the frozen trunk up to the
bottom of group d, then groups d..1 with their adapters, then the family's output (a classification head,
or the frozen LM head). Adapters are injected once with peft, selected by block index (never by name
substring), one per (slot, group): slot 0 is the one training uses, and serving m shards at once loads each
shard's stages into a slot of its own, so switching between shards is switching adapters, not copying
weights. Stage artifacts name tensors as slot 0 does, so an artifact loads into any slot.

A family subclass says how to load the model, how to turn inputs into a fixed-shape batch, how to embed it,
how to call a range of blocks, and what comes after the last block.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import nn

from ..errors import PlanError

__all__ = ["LayeredModel", "Batch", "Task"]

Batch = dict[str, torch.Tensor]   # a family's fixed-shape model inputs, one row per record
Task = Literal["classify", "generate"]

HEAD_PREFIX = "head."

# Default LoRA targets, looked up among the leaf projections of block 0 (first pair or name found wins):
# separate query/value projections under either naming, else a fused qkv projection.
_QUERY_VALUE = (("q_proj", "v_proj"), ("query", "value"))
_FUSED_QKV = ("c_attn", "query_key_value", "qkv_proj", "qkv", "Wqkv")


def quiet_transformers() -> None:
    from transformers import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("peft").setLevel(logging.ERROR)


class LayeredModel(nn.Module):
    """A frozen model with named LoRA adapters per (slot, layer group) and, for classification, a head per slot.

    Subclasses set `task`, load `self.model` in `load`, and implement `prepare`, `embed`, `run_blocks`,
    `output`, `loss` and `aux` (the batch fields the trunk cache keeps next to each hidden state).
    """

    task: ClassVar[Task]
    kind: ClassVar[str]   # the record kind it trains on (records.KINDS): "text", "prompt", ...

    def __init__(self, path: Path, *, num_groups: int, blocks_per_group: int, max_length: int, lora_rank: int,
                 lora_alpha: float, lora_dropout: float, lora_targets: Sequence[str] | None,
                 num_labels: int | None = None, slots: int = 1, device: str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        quiet_transformers()
        self.max_length = max_length
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = self.load(Path(path))
        self.model.eval()   # the frozen model's own dropout stays off
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.blocks_path, self.blocks = find_blocks(self.model)
        self.layers_pattern = self.blocks_path.rpartition(".")[2]
        n = len(self.blocks)
        if num_groups * blocks_per_group > n:
            raise PlanError(f"{num_groups} layer groups of {blocks_per_group} blocks need {num_groups * blocks_per_group} "
                            f"blocks; the model has {n}. Lower `num_slices` or `blocks_per_slice`.")
        self.num_groups, self.slots = num_groups, slots
        # group g (1 = top) covers blocks [start(g), start(g) + blocks_per_group)
        self.group_blocks = {g: list(range(n - g * blocks_per_group, n - (g - 1) * blocks_per_group))
                             for g in range(1, num_groups + 1)}
        self.lora_targets = tuple(lora_targets or default_lora_targets(self.blocks[0]))
        self._inject(lora_rank, lora_alpha, lora_dropout)
        hidden = self.model.config.hidden_size
        self.heads = nn.ModuleList(nn.Linear(hidden, num_labels) for _ in range(slots)) \
            if self.task == "classify" else nn.ModuleList()
        self.model.to(self.device)
        self.heads.to(self.device)
        self._dropout_on = False
        self.slot_contents: dict[int, tuple[str, ...]] = {}   # serving slot -> the stages loaded into it
        self.set_active(0)

    # -- what a family provides --------------------------------------------------------------------
    def load(self, path: Path) -> nn.Module:
        raise NotImplementedError

    def prepare(self, items: Sequence) -> Batch:
        """Fixed-shape model inputs for training records (or, at inference, inputs), one row each."""
        raise NotImplementedError

    def embed(self, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def load_kwargs(self) -> dict:
        """`from_pretrained` settings every family loads with: the dtype and, on CUDA, eager attention (its kernels
        are matmuls and softmaxes, deterministic under `torch.use_deterministic_algorithms`; whether a fused
        attention kernel's backward is deterministic depends on the backend torch picks)."""
        return {"dtype": self.dtype, **({"attn_implementation": "eager"} if self.device.type == "cuda" else {})}

    def run_blocks(self, hidden: torch.Tensor, batch: Batch, start: int, stop: int) -> torch.Tensor:
        """Blocks start..stop-1 on hidden states (B, T, H), with the currently active adapters."""
        raise NotImplementedError

    def output(self, hidden: torch.Tensor, batch: Batch, *, slot: int = 0) -> torch.Tensor:
        """What follows the last block: class logits (B, labels), or token logits (B, T, vocab)."""
        raise NotImplementedError

    def loss(self, outputs: torch.Tensor, batch: Batch, targets: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    aux_fields: ClassVar[tuple[str, ...]] = ()   # batch fields the trunk cache keeps per record

    # -- structure ---------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_outputs(self) -> int:
        return self.heads[0].out_features if self.task == "classify" else self.model.config.vocab_size

    @staticmethod
    def adapter_name(group: int, slot: int = 0) -> str:
        return f"g{group}" if slot == 0 else f"s{slot}g{group}"

    def groups_at(self, depth: int) -> int:
        """Layer groups active in a depth-`depth` model: `depth` for S3T; for SISA (one group spanning every
        adapted block, retrained at each stage) the one group from stage 1 on."""
        return min(depth, self.num_groups)

    def group_start(self, group: int) -> int:
        """Index of the lowest block of `group`: where a depth-`group` model leaves the frozen trunk."""
        return self.group_blocks[group][0] if group > 0 else self.num_blocks

    def _inject(self, rank: int, alpha: float, dropout: float) -> None:
        import peft
        from peft.tuners.lora import LoraLayer
        from transformers.pytorch_utils import Conv1D

        conv1d = any(isinstance(m, Conv1D) for name, m in self.blocks[0].named_modules()
                     if name.rsplit(".", 1)[-1] in self.lora_targets)
        for slot in range(self.slots):
            for g, block_ids in self.group_blocks.items():
                config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                                         target_modules=list(self.lora_targets), fan_in_fan_out=conv1d,
                                         layers_to_transform=block_ids, layers_pattern=self.layers_pattern)
                with warnings.catch_warnings():   # one adapter per (slot, group) is the point, not an accident
                    warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                    peft.inject_adapter_in_model(config, self.model, adapter_name=self.adapter_name(g, slot))
        self._lora_layers = [m for m in self.model.modules() if isinstance(m, LoraLayer)]
        if not self._lora_layers:
            raise PlanError(f"`lora_targets` {list(self.lora_targets)} match no module of the model's blocks; "
                            f"its projections are {projections(self.blocks[0])}")
        # Trained weights stay float32 under a bfloat16 model (as peft's `autocast_adapter_dtype` keeps them):
        # AdamW steps of 1e-3 vanish in bfloat16's 8-bit mantissa. peft runs each adapter in its own dtype and
        # casts its output back to the frozen layer's.
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if "lora_" in name and p.dtype != torch.float32:
                    p.data = p.data.float()

    # -- adapters ----------------------------------------------------------------------------------
    def set_active(self, depth: int, *, slot: int = 0, train_group: int | None = None) -> None:
        """Activate groups 1..depth of `slot` (deeper groups become absent); only `train_group` (of slot 0)
        and the slot-0 head get gradients, and LoRA dropout runs only in the group being trained."""
        active = [self.adapter_name(g, slot) for g in range(1, depth + 1)]
        for layer in self._lora_layers:
            layer.set_adapter(active, inference_mode=True)   # also turns every adapter's requires_grad off
        for p in self.heads.parameters():
            p.requires_grad_(False)
        # Walking every module for eval() is costly when generation switches shards per token: do it only
        # when entering or leaving training.
        if self._dropout_on or train_group is not None:
            self.eval()
            self._dropout_on = False
        if train_group is not None:
            for p in self.trainable_parameters(train_group):
                p.requires_grad_(True)
            tag = f"lora_dropout.{self.adapter_name(train_group)}"
            for name, m in self.model.named_modules():
                if name.endswith(tag):
                    m.train()
                    self._dropout_on = True

    def trainable_parameters(self, group: int | None) -> list[nn.Parameter]:
        """Group `group`'s LoRA parameters (slot 0) and, for classification, the slot-0 head."""
        if group is None:
            return []
        tag = f".{self.adapter_name(group)}."
        lora = [p for n, p in self.model.named_parameters() if "lora_" in n and tag in n]
        return lora + (list(self.heads[0].parameters()) if self.heads else [])

    def group_state(self, group: int, *, slot: int = 0) -> dict[str, torch.Tensor]:
        """One group's LoRA tensors, on the CPU, keyed by their slot-0 names (an artifact loads into any slot)."""
        tag, plain = f".{self.adapter_name(group, slot)}.", f".{self.adapter_name(group)}."
        return {n.replace(tag, plain): p.detach().to("cpu", copy=True)
                for n, p in self.model.named_parameters() if "lora_" in n and tag in n}

    def head_state(self, *, slot: int = 0) -> dict[str, torch.Tensor]:
        """The classification head of `slot` (nothing for generation: the LM head stays frozen)."""
        if not self.heads:
            return {}
        return {HEAD_PREFIX + n: p.detach().to("cpu", copy=True) for n, p in self.heads[slot].named_parameters()}

    def load_state(self, tensors: dict[str, torch.Tensor], *, slot: int = 0) -> None:
        """Load group and/or head tensors produced by `group_state` / `head_state` into `slot`."""
        params = dict(self.model.named_parameters())
        head = dict(self.heads[slot].named_parameters()) if self.heads else {}
        with torch.no_grad():
            for name, value in tensors.items():
                if name.startswith(HEAD_PREFIX):
                    target = head[name[len(HEAD_PREFIX):]]
                else:
                    target = params[_in_slot(name, slot)]
                target.copy_(value)

    def reset_group(self, group: int) -> None:
        """Fresh LoRA init for one group of slot 0 (draws from the global RNG: call under a seeded fork)."""
        name = self.adapter_name(group)
        for layer in self._lora_layers:
            if name in layer.lora_A:
                layer.reset_lora_parameters(name, init_lora_weights=True)

    def reset_head(self) -> None:
        if self.heads:
            self.heads[0].reset_parameters()

    def top(self, hidden: torch.Tensor, batch: Batch, start: int, *, slot: int = 0) -> torch.Tensor:
        """Blocks from `start` to the top with the active adapters, then the output of `slot`."""
        return self.output(self.run_blocks(hidden, batch, start, self.num_blocks), batch, slot=slot)

    def to_device(self, batch: Batch) -> Batch:
        return {k: v.to(self.device) for k, v in batch.items()}


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's list of transformer blocks: the one ModuleList with `num_hidden_layers` entries."""
    n = model.config.num_hidden_layers
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if len(found) != 1:
        raise PlanError(f"cannot tell the transformer blocks of this {model.config.model_type} model apart: "
                        f"{len(found)} module lists of {n} entries ({[name for name, _ in found]})")
    return found[0]


def projections(block: nn.Module) -> list[str]:
    """The leaf names of a block's linear projections (what `lora_targets` may name)."""
    from transformers.pytorch_utils import Conv1D

    return sorted({name.rsplit(".", 1)[-1] for name, m in block.named_modules() if isinstance(m, (nn.Linear, Conv1D))})


def default_lora_targets(block: nn.Module) -> tuple[str, ...]:
    """The attention query and value projections of a block (or its fused qkv projection), found by name
    among the projections the loaded block really has (as the paper adapts query and value)."""
    leaves = set(projections(block))
    for pair in _QUERY_VALUE:
        if set(pair) <= leaves:
            return pair
    for fused in _FUSED_QKV:
        if fused in leaves:
            return (fused,)
    raise PlanError(f"no query/value projection found in the model's blocks (projections: {sorted(leaves)}); "
                    "set `lora_targets` in the plan")


def _in_slot(name: str, slot: int) -> str:
    """A slot-0 parameter name (`....lora_A.g2.weight`) as it is called in `slot`."""
    if slot == 0:
        return name
    head, _, tail = name.rpartition(".lora_")
    kind, group, rest = tail.split(".", 2)
    return f"{head}.lora_{kind}.s{slot}{group}.{rest}"
