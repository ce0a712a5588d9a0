"""Rollout statistics and selection over one group of G completions (pure functions)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def sample_ranks(item_ids: Sequence[int], logps: Sequence[float]) -> list[int]:
    """Ranks of sampled completions: 1 + the number of distinct items of the group with a
    higher log-prob. Duplicates share a rank; for distinct beams in beam order it is 1..G.

    >>> sample_ranks([4, 7, 4, 2], [-1.0, -0.5, -1.0, -3.0])
    [2, 1, 2, 3]
    """
    best: dict[int, float] = {}
    for item, lp in zip(item_ids, logps, strict=True):
        best[item] = max(lp, best.get(item, -math.inf))
    return [1 + sum(1 for other, lp in best.items() if other != item and lp > best[item]) for item in item_ids]


def distinct_first(samples: Sequence[tuple[int, float]], g: int) -> list[tuple[int, float]]:
    """`dynamic` sampling: keep G of the over-sampled completions, each distinct item's first
    draw first (in draw order), then repeats in draw order if fewer than G items are distinct.

    >>> distinct_first([(4, -1.0), (4, -1.0), (7, -2.0), (4, -1.0), (9, -3.0)], 3)
    [(4, -1.0), (7, -2.0), (9, -3.0)]
    >>> distinct_first([(4, -1.0), (4, -1.0), (7, -2.0)], 3)
    [(4, -1.0), (7, -2.0), (4, -1.0)]
    """
    seen: set[int] = set()
    first, repeats = [], []
    for s in samples:
        (repeats if s[0] in seen else first).append(s)
        seen.add(s[0])
    return (first + repeats)[:g]


def group_stats(items: Sequence[Sequence[int]], targets: Sequence[int]) -> dict[str, float]:
    """Share of groups whose completions contain the target, mean distinct items per group,
    and the mean 1-based rank of the target in the groups that contain it (0 if none).

    >>> group_stats([[1, 2, 3], [4, 4, 5]], [2, 9])
    {'rollout/target_in_group': 0.5, 'rollout/distinct_items': 2.5, 'rollout/target_rank': 2.0}
    """
    hits = [list(g).index(t) + 1 for g, t in zip(items, targets, strict=True) if t in g]
    return {
        "rollout/target_in_group": len(hits) / len(items),
        "rollout/distinct_items": sum(len(set(g)) for g in items) / len(items),
        "rollout/target_rank": sum(hits) / len(hits) if hits else 0.0,
    }
