"""Stand-ins the benchmarks use where real training is not what they measure."""

from __future__ import annotations

import torch

from s3t.training import StageResult, Trainer

TRAINER_FIELDS = ("model", "kind", "registry", "store", "training", "base_digest", "environment", "labels", "epochs",
                  "learning_rate", "batch_size")


class NoCache:
    """A trunk cache that computes nothing (for trainers that never read it)."""

    def fill(self, *args, **kwargs) -> None:
        pass


class RandomWeightsTrainer(Trainer):
    """Registers every stage (real lineage, files and rows) with small random weights instead of training."""

    def train_stage(self, *, stage, lineage, parents, ids, targets, seed=None):
        gen = torch.Generator().manual_seed(int(lineage[:8], 16))
        group = self.model.groups_at(stage)
        shapes = {**self.model.group_state(group), **self.model.head_state()}
        return StageResult({k: 0.05 * torch.randn(v.shape, generator=gen) for k, v in shapes.items()}, [])


def use_random_weights(system) -> None:
    """Make `system.train()` register random-weight stages instead of training (no trunk cache either)."""
    base = system.trainer
    system._trainer = RandomWeightsTrainer(cache=NoCache(), **{f: getattr(base, f) for f in TRAINER_FIELDS})
