"""From a `Corpus` to D3 rows: unique titles, seeded item ids, per-user sequences, samples,
and the two split protocols.

- Per-user order: by timestamp; events with the same timestamp (`datasets.*.ties`) in a
  seeded order (`shuffle`: by sha256 of seed, user and raw item id), by numeric raw item
  id (`item_id`), or in file order (`file`, a stable sort). MovieLens users are visited in
  numeric id order, and items listed in numeric id order before the seeded shuffle.
  ML-100K has many same-second ratings (half of the consecutive pairs of a user); `shuffle`
  and `item_id` make their order independent of the file's row order, so the RecBole and
  GroupLens copies agree, but `item_id` writes the catalogue's id order into every
  same-second run: there the next item always has the larger raw id, which a model can
  learn and which says nothing about the user (stats.json records `same_time_pairs`).
- Samples: one per position i >= 1 of a user's sequence: target = item i, history = the
  previous `max_history` items (fewer at the start).
- `temporal`: all samples sorted by target timestamp (a stable sort over users in the order
  above and positions ascending), then train = [0, int(n*0.8)), valid = [int(n*0.8),
  int(n*0.9)), test = [int(n*0.9), n), exactly the reference's rounding.
- `leave_one_out`: per user with n items, the sample whose target is item n-1 is test,
  item n-2 is valid, items 1..n-3 are train (a user with 2 items has a test sample only).
  Each split is then sorted by target timestamp like `temporal`.
- Unique titles: every item whose title is shared by another item becomes
  `f"{title} [{raw_id}]"` (all of them, not only the second), e.g. `Chasing Amy (1997) [246]`.
  This unique title is used in every file. If a suffixed title still collides, the run fails.
- Titles: a tab or line break inside a title becomes a space (`rere.io.clean_title`) before
  they are made unique.
- Ratings are floats, timestamps integer seconds.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter

from rere import RereError
from rere.data.corpus import Corpus, num_key
from rere.io import SPLITS, clean_title

log = logging.getLogger(__name__)


def unique_titles(titles: dict[str, str]) -> tuple[dict[str, str], int]:
    """Make every title unique: each title shared by several items gets ` [raw_id]` appended.

    Returns (raw id -> unique title, number of items renamed).

    >>> unique_titles({"1": "A", "2": "A", "3": "B"})
    ({'1': 'A [1]', '2': 'A [2]', '3': 'B'}, 2)
    """
    counts = Counter(titles.values())
    out = {raw: (f"{t} [{raw}]" if counts[t] > 1 else t) for raw, t in titles.items()}
    clash = [t for t, c in Counter(out.values()).items() if c > 1]
    if clash:
        raise RereError(
            f"titles {clash[:5]} are still shared after appending raw ids; rename those items in the source data."
        )
    return out, sum(1 for raw in titles if counts[titles[raw]] > 1)


def assign_ids(item_order: list[str], seed: int) -> dict[str, int]:
    """Shuffle `item_order` with `random.Random(seed)` and number the result 0..N-1."""
    order = list(item_order)
    random.Random(seed).shuffle(order)
    return {raw: i for i, raw in enumerate(order)}


TIES = ("shuffle", "item_id", "file")


def tie_key(seed: int, user: str, item: str) -> int:
    """The seeded position of an event among its user's same-time events: the first 8 bytes
    of sha256(seed, user, item). It depends on nothing else (not the file's row order, not
    the item's id), so every copy of the data gives the same order, and another seed another.

    >>> tie_key(42, "1", "10") == tie_key(42, "1", "10"), tie_key(42, "1", "10") == tie_key(43, "1", "10")
    (True, False)
    """
    digest = hashlib.sha256(f"{seed}\0{user}\0{item}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def user_sequences(corpus: Corpus, ties: str = "shuffle", seed: int = 0) -> dict[str, list[tuple[str, float, int]]]:
    """user -> [(item, rating, timestamp)] in time order; same-time events ordered by `ties`
    (shuffle | item_id | file, see the module docstring)."""
    if ties not in TIES:
        raise RereError(f"key 'datasets.*.ties' is {ties!r}; use one of {', '.join(TIES)}.")
    seqs: dict[str, list[tuple[str, float, int]]] = {u: [] for u in corpus.user_order}
    for user, item, rating, ts in corpus.events:
        seqs[user].append((item, rating, ts))
    for user, seq in seqs.items():
        if ties == "shuffle":
            seq.sort(key=lambda e, u=user: (e[2], tie_key(seed, u, e[0])))
        elif ties == "item_id":
            seq.sort(key=lambda e: (e[2], num_key(e[0])))
        else:
            seq.sort(key=lambda e: e[2])  # stable: ties keep file order
    return seqs


def same_time_share(seqs: dict[str, list[tuple[str, float, int]]]) -> float:
    """Share of consecutive events of a user that have the same timestamp (0 if none).

    >>> same_time_share({"u": [("a", 1.0, 5), ("b", 1.0, 5), ("c", 1.0, 9)], "v": [("a", 1.0, 1)]})
    0.5
    """
    pairs = [(a[2], b[2]) for seq in seqs.values() for a, b in zip(seq[:-1], seq[1:], strict=True)]
    return sum(1 for a, b in pairs if a == b) / len(pairs) if pairs else 0.0


def later_id_larger(earlier: str, later: str) -> bool:
    """Whether the later of two raw ids is the larger (`num_key`: integers numerically, other
    ids as text after them): the order `same_time_order` and the report's id split count.

    >>> later_id_larger("9", "10"), later_id_larger("B0", "1593593147"), later_id_larger("7", "7")
    (True, False, False)
    """
    return num_key(later) > num_key(earlier)


def same_time_order(splits: dict[str, list[dict]]) -> dict:
    """How same-time events sit in written rows, over the distinct consecutive pairs of every
    row (its history items, then its target; raw ids from `item_asins`/`item_asin`, pairs with
    an empty raw id skipped): `share`, the pairs with one timestamp among all pairs; `pairs`,
    their number; `later_id_larger`, among them the share whose later item has the larger raw
    id (`num_key`: integers numerically, other ids as text), or None without such pairs. Near
    0.5 when the order of same-time events says nothing about the ids; the published Amazon
    D3 splits, sorted by time from files grouped by product, give about 0.8.

    >>> row = {"user_id": "u", "item_asins": ["9", "10", "2"], "history_timestamp": [5, 5, 5],
    ...        "item_asin": "7", "timestamp": 8}
    >>> same_time_order({"test": [row, dict(row)]})
    {'share': 0.6667, 'pairs': 2, 'later_id_larger': 0.5}
    """
    seen = set()
    for rows in splits.values():
        for r in rows:
            ids = [*r["item_asins"], r["item_asin"]]
            times = [*r["history_timestamp"], r["timestamp"]]
            for a, b, ta, tb in zip(ids[:-1], ids[1:], times[:-1], times[1:], strict=True):
                if a and b:
                    seen.add((r["user_id"], str(a), str(b), int(ta), int(tb)))
    tied = [(a, b) for _, a, b, ta, tb in seen if ta == tb]
    larger = sum(1 for a, b in tied if later_id_larger(a, b))
    return {
        "share": round(len(tied) / len(seen), 4) if seen else 0.0,
        "pairs": len(tied),
        "later_id_larger": round(larger / len(tied), 4) if tied else None,
    }


def make_samples(seqs, ids: dict[str, int], titles: dict[str, str], max_history: int) -> list[tuple[int, int, dict]]:
    """One D3 row per position i >= 1; returns (position, sequence length, row) in user order."""
    out = []
    for user, seq in seqs.items():
        for i in range(1, len(seq)):
            hist = seq[max(0, i - max_history) : i]
            item, rating, ts = seq[i]
            row = {
                "user_id": user,
                "item_asins": [h[0] for h in hist],
                "item_asin": item,
                "history_item_id": [ids[h[0]] for h in hist],
                "item_id": ids[item],
                "history_item_title": [titles[h[0]] for h in hist],
                "item_title": titles[item],
                "history_rating": [h[1] for h in hist],
                "rating": rating,
                "history_timestamp": [h[2] for h in hist],
                "timestamp": ts,
            }
            out.append((i, len(seq), row))
    return out


def split_temporal(samples: list[tuple[int, int, dict]]) -> dict[str, list[dict]]:
    rows = sorted((s[2] for s in samples), key=lambda r: r["timestamp"])  # stable
    n = len(rows)
    a, b = int(n * 0.8), int(n * 0.9)
    return {"train": rows[:a], "valid": rows[a:b], "test": rows[b:]}


def split_leave_one_out(samples: list[tuple[int, int, dict]]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for pos, length, row in samples:
        split = "test" if pos == length - 1 else "valid" if pos == length - 2 else "train"
        out[split].append(row)
    return {s: sorted(rows, key=lambda r: r["timestamp"]) for s, rows in out.items()}


def build_from_corpus(corpus: Corpus, ds: dict, seed: int, source: str) -> tuple[dict, list[dict], dict]:
    """Corpus -> (split rows, items.jsonl records, stats)."""
    cleaned = {raw: clean_title(t) for raw, t in corpus.titles.items()}
    changed = sum(1 for raw, t in corpus.titles.items() if cleaned[raw] != t)
    if changed:
        log.info("%d titles had a tab or line break, now a space (info.txt holds one title per line)", changed)
    titles, renamed = unique_titles(cleaned)
    if renamed:
        log.info(
            "%d items share a title with another item; appended their raw id, e.g. %r",
            renamed,
            next(t for t in titles.values() if t.endswith("]")),
        )
    ids = assign_ids(corpus.item_order, seed)
    ties = ds.get("ties", "shuffle")
    seqs = user_sequences(corpus, ties, seed)
    samples = make_samples(seqs, ids, titles, ds["max_history"])
    splits = split_temporal(samples) if ds["split"] == "temporal" else split_leave_one_out(samples)
    items = sorted(
        (
            {
                "item_id": ids[raw],
                "title": titles[raw],
                "asin": raw,
                "text": titles[raw] + (f". {', '.join(corpus.words[raw])}" if corpus.words.get(raw) else ""),
            }
            for raw in corpus.item_order
        ),
        key=lambda r: r["item_id"],
    )
    times = [e[3] for e in corpus.events]
    stats = {
        "users": len(corpus.user_order),
        "items": len(items),
        "interactions": len(corpus.events),
        "rows": {s: len(splits[s]) for s in SPLITS},
        "time_range": [min(times), max(times)],
        "split": ds["split"],
        "source": source,
        "max_history": ds["max_history"],
        "seed": seed,
        "renamed_duplicate_titles": renamed,
        "ties": ties,
        "same_time_pairs": round(same_time_share(seqs), 4),
        "same_time_order": same_time_order(splits),
        **corpus.notes,
    }
    return splits, items, stats
