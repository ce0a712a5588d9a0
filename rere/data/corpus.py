"""`Corpus`: what every source reader returns (raw interactions and item metadata), before
ids and splits (rere.data.splits)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Corpus:
    """Interactions and item metadata of one source, before ids and splits.

    `events` are (user, item, rating, timestamp) with raw string ids, in file order.
    `item_order` lists the catalogue's raw ids in the order they are shuffled from;
    `user_order` the users in the order samples are generated.
    """

    events: list[tuple[str, str, float, int]]
    titles: dict[str, str]
    words: dict[str, list[str]]  # genres / categories for the item text
    item_order: list[str]
    user_order: list[str]
    notes: dict = field(default_factory=dict)


def num_key(raw: str) -> tuple:
    """Raw ids that are integers sort numerically, others after them as strings."""
    return (0, int(raw), "") if raw.isdigit() else (1, 0, raw)
