"""Top-K ranking metrics and the result files every evaluator writes.

One relevant item per row (the held-out next item), so with `rank` its 1-based position in
the model's ranked list (None when it is absent):

    HR@K   = mean over rows of [rank <= K]
    NDCG@K = mean over rows of [rank <= K] / log2(rank + 1)

The ideal DCG of a single relevant item is 1/log2(2) = 1, so no normalisation is needed.
Rows whose target is missing from the list (or ranked below K) count 0: the mean is over
ALL evaluated rows, never only over hits.

    repeat@K = mean over rows of |top-K list ∩ the row's history| / K

is not a quality metric but a diagnostic: the share of the first K recommendations that the
user already interacted with (in the history the model saw). No item is excluded from the
ranking, so on a dataset where users never repeat an item (MovieLens) every such slot is a
certain miss.

The LLM evaluation (`rere evaluate`) and the classic baselines (`rere baseline`) both call
`write_results`, so their ranked lists and metrics go through the same code.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rere.io import write_json, write_jsonl
from rere.machine import describe


def rank_of(ranked: Sequence[int], target: int) -> int | None:
    """1-based position of `target` in `ranked` (its first occurrence), None if absent.

    >>> rank_of([7, 3, 9], 3)
    2
    >>> rank_of([7, 3, 9], 5) is None
    True
    """
    for position, item in enumerate(ranked, 1):
        if item == target:
            return position
    return None


def hr_ndcg(ranks: Sequence[int | None], ks: Sequence[int]) -> dict[str, float]:
    """HR@K and NDCG@K for each K, averaged over all rows (misses count 0).

    HR@K = (1/n) * sum_i [r_i <= K];  NDCG@K = (1/n) * sum_i [r_i <= K] / log2(r_i + 1),
    where r_i is row i's 1-based rank of its single relevant item (None: not ranked).

    >>> m = hr_ndcg([1, 3, None, 11], ks=[1, 10])
    >>> m["hr@1"], m["hr@10"]
    (0.25, 0.5)
    >>> round(m["ndcg@10"], 6)  # (1/log2(2) + 1/log2(4)) / 4 = (1 + 0.5) / 4
    0.375
    """
    if not ranks:
        raise ValueError("no rows: HR/NDCG are undefined for an empty evaluation")
    bad = [k for k in ks if not isinstance(k, int) or k < 1]
    if bad:
        raise ValueError(f"cut-offs must be positive integers, got {bad}")
    for r in ranks:
        if r is not None and (not isinstance(r, int) or r < 1):
            raise ValueError(f"ranks are 1-based integers or None, got {r!r}")
    n = len(ranks)
    out: dict[str, float] = {}
    for k in sorted(set(ks)):
        hits = [r for r in ranks if r is not None and r <= k]
        out[f"hr@{k}"] = len(hits) / n
        out[f"ndcg@{k}"] = sum(1.0 / math.log2(r + 1) for r in hits) / n
    return out


def repeat_share(
    ranked: Sequence[Sequence[int]], histories: Sequence[Sequence[int]], ks: Sequence[int]
) -> dict[str, float]:
    """repeat@K for each K: the mean share of a row's first K ranked items found in its history.

    A list shorter than K counts its missing slots as not repeated (the denominator stays K).

    >>> m = repeat_share([[4, 1, 9, 2], [7, 8, 6, 5]], [[1, 2, 3], [5]], ks=[2, 4])
    >>> m["repeat@2"], m["repeat@4"]  # row 0: {1} of 2, {1, 2} of 4; row 1: none of 2, {5} of 4
    (0.25, 0.375)
    """
    if len(ranked) != len(histories):
        raise ValueError(f"{len(ranked)} ranked lists but {len(histories)} histories")
    if not ranked:
        raise ValueError("no rows: repeat@K is undefined for an empty evaluation")
    seen = [set(map(int, h)) for h in histories]
    return {
        f"repeat@{k}": sum(sum(int(i) in s for i in items[:k]) / k for items, s in zip(ranked, seen, strict=True))
        / len(ranked)
        for k in sorted(set(ks))
    }


def select_rows(rows: Sequence[Any], max_rows: int | None, seed: int) -> list[Any]:
    """The deterministic evaluation subsample: `max_rows` rows drawn without replacement by
    `random.Random(seed)`, returned in their original order. None (or max_rows >= len(rows))
    keeps every row. Same rows for the same (len(rows), max_rows, seed), whatever the caller.

    >>> select_rows(list("abcdef"), None, seed=0)
    ['a', 'b', 'c', 'd', 'e', 'f']
    >>> picked = select_rows(list("abcdef"), 3, seed=0)
    >>> len(picked), picked == sorted(picked)
    (3, True)
    """
    if max_rows is None or max_rows >= len(rows):
        return list(rows)
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1 or None, got {max_rows}")
    keep = sorted(random.Random(seed).sample(range(len(rows)), max_rows))
    return [rows[i] for i in keep]


def write_results(
    out_dir: str | Path,
    rows: Sequence[dict],
    ranked: Sequence[Sequence[int]],
    scores: Sequence[Sequence[float]],
    ks: Sequence[int],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write `predictions.jsonl` and `metrics.json` (DESIGN.md formats) atomically; return the metrics.

    rows: D3 row dicts (`user_id`, `history_item_id`, `item_id`) in evaluation order;
    ranked[i] / scores[i]: row i's recommended item ids, best first, and their scores.
    `extra` is merged into metrics.json (method, dataset, split, num_beams, invalid,
    throughput ...). `"row"` in predictions.jsonl is the position in `rows`.
    metrics.json is written last, so its presence means both files are complete.
    """
    if not (len(rows) == len(ranked) == len(scores)):
        raise ValueError(f"rows ({len(rows)}), ranked ({len(ranked)}) and scores ({len(scores)}) differ in length")
    out_dir = Path(out_dir)
    records = []
    ranks = []
    for i, (row, items, item_scores) in enumerate(zip(rows, ranked, scores, strict=True)):
        if len(items) != len(item_scores):
            raise ValueError(f"row {i}: {len(items)} ranked items but {len(item_scores)} scores")
        target = int(row["item_id"])
        ranks.append(rank_of(items, target))
        records.append(
            {
                "row": i,
                "user_id": row["user_id"],
                "history": [int(x) for x in row["history_item_id"]],
                "target": target,
                "ranked": [int(x) for x in items],
                "scores": [float(s) for s in item_scores],
            }
        )
    metrics: dict[str, Any] = dict(hr_ndcg(ranks, ks))
    metrics.update(repeat_share(ranked, [r["history"] for r in records], ks))
    metrics["rows"] = len(rows)
    metrics["machine"] = describe()  # where it was evaluated (rere.machine); `extra` may add trained_on
    metrics.update(extra or {})
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "predictions.jsonl", records)
    write_json(out_dir / "metrics.json", metrics)
    return metrics
