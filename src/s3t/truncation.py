"""Pure rules for what a deletion does to a shard: truncation, served order, capacity left.

The engine and the capacity simulator both call these, so simulated capacity is the real engine's.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

__all__ = ["truncate", "choose_served", "deletions_to_drop"]


def truncate(order: Sequence[int], depth: int, hit_slices: Collection[int]) -> int:
    """Depth an order keeps after its shard loses data in `hit_slices`.

    Stage j saw slices order[0..j-1], so the model stays exact up to the stage before the first hit slice:
    that truncated model is the stage-(j-1) model, which never saw the deleted data.
    """
    for position, slice_ in enumerate(order[:depth]):
        if slice_ in hit_slices:
            return position
    return depth


def choose_served(depths: Sequence[int]) -> int | None:
    """Index of the order to serve: the deepest live one, lowest index on ties; None when all are dead."""
    best = max(range(len(depths)), key=lambda i: (depths[i], -i), default=None)
    return best if best is not None and depths[best] > 0 else None


def deletions_to_drop(orders: Sequence[Sequence[int]], depths: Sequence[int]) -> int:
    """Fewest single-record deletions that kill every live order of a shard (distinct live first slices)."""
    return len({order[0] for order, depth in zip(orders, depths) if depth > 0})
