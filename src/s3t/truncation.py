"""Pure rules for what a deletion does to a shard: truncation, served order, capacity left.

The engine and the capacity simulator both call these, so simulated capacity is the real engine's.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

__all__ = ["truncate", "attainable_depth", "choose_served", "deletions_to_drop"]


def truncate(order: Sequence[int], depth: int, hit_slices: Collection[int]) -> int:
    """Depth an order keeps after its shard loses data in `hit_slices`.

    Stage j saw slices order[0..j-1], so the model stays exact up to the stage before the first hit slice:
    that truncated model is the stage-(j-1) model, which never saw the deleted data.
    """
    for position, slice_ in enumerate(order[:depth]):
        if slice_ in hit_slices:
            return position
    return depth


def attainable_depth(order: Sequence[int], live_slices: Collection[int]) -> int:
    """Depth that training on the current data gives an order: all of it, or 0 if its first slice is empty.

    The rule for empty data, the same in create, train, restore, status and the capacity maths: stage i
    trains on slices order[0..i-1], so a stage's data is empty only if the order's first slice is, and a
    stage trained on nothing (an untrained head) would dilute every prediction. Such an order is never
    trained and never served; its shard serves another order, or drops out while all its orders start
    with an empty slice. An empty slice further along is harmless: its stage trains on the slices before.
    """
    return len(order) if order and order[0] in live_slices else 0


def choose_served(depths: Sequence[int]) -> int | None:
    """Index of the order to serve: the deepest live one, lowest index on ties; None when all are dead."""
    best = max(range(len(depths)), key=lambda i: (depths[i], -i), default=None)
    return best if best is not None and depths[best] > 0 else None


def deletions_to_drop(orders: Sequence[Sequence[int]], depths: Sequence[int]) -> int:
    """Fewest single-record deletions that kill every live order of a shard (distinct live first slices)."""
    return len({order[0] for order, depth in zip(orders, depths) if depth > 0})
