"""Import an existing D3-format folder (`source: d3`).

`d3`: an existing folder (`path`) with train/valid/test.csv and info.txt in the D3
layout, imported as it is (its item ids, histories and row order are kept). Checks: every
column, literal lists, equal-length history lists, every item id (target and history) in
the catalogue, titles equal to the catalogue's (after `rere.io.clean_title`: a tab or line
break in a title becomes a space, in info.txt and the CSVs alike), one asin per item id. With
`missing_train: use_valid`, a folder without train.csv is imported with train = valid
(logged, and recorded as `train_from: valid` in stats.json). Items never seen in a split
get `asin: ""` in items.jsonl.

With `d3_ties: shuffle`, a user's events with the same timestamp are put in the seeded order
of `ties: shuffle` (`rere.data.splits.tie_key`) instead of the files' (on the published Office
split, 80% of same-day pairs follow ASIN order: the order of the files the split was sorted
from). Each user's sequence is rebuilt from their rows (train, valid, test, in file order: the
first row's history, then every row's target); every row is written again at its position,
with the target and the items before it in the new order (as many as the longest imported
history holds, D3's 10), so a row keeps its split and its target's timestamp. A user whose
rows do not chain (a history that is not the items before its target) keeps the rows as
imported, counted in stats.json.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

from rere import RereError
from rere.data.splits import same_time_order, tie_key, unique_titles
from rere.io import SPLITS, clean_title, read_catalogue, read_split

log = logging.getLogger(__name__)


def _read_d3_catalogue(path: Path) -> dict[int, str]:
    """info.txt -> {item_id: title}; like rere.io.read_catalogue but duplicate titles are allowed
    (the reference writes them; they are made unique here)."""
    if not path.is_file():
        raise RereError(f"{path} does not exist; a d3 folder needs info.txt (title<TAB>item_id per line).")
    items = read_catalogue(path, unique_titles=False)
    if sorted(items) != list(range(len(items))):
        raise RereError(
            f"{path}: item ids must be 0..N-1 without gaps (found {len(items)} ids, max {max(items, default=-1)})."
        )
    return items


_EVENT = ("item_asins", "history_item_id", "history_item_title", "history_rating", "history_timestamp")
_TARGET = ("item_asin", "item_id", "item_title", "rating", "timestamp")
_TIME = 4  # the timestamp's place in an event of either tuple


def _history(row: dict) -> list[tuple]:
    return [tuple(row[c][j] for c in _EVENT) for j in range(len(row["history_item_id"]))]


def shuffle_same_time(splits: dict[str, list[dict]], seed: int) -> tuple[int, int, int]:
    """Reorder each user's same-timestamp events in place (module docstring, `d3_ties`); a
    history is at most as long as the longest imported one. Returns (users reordered, users
    kept as imported, rows whose target changed).

    >>> rows = [{"user_id": "u", "item_asins": ["a"], "history_item_id": [0], "history_item_title": ["A"],
    ...          "history_rating": [5.0], "history_timestamp": [7], "item_asin": "b", "item_id": 1,
    ...          "item_title": "B", "rating": 4.0, "timestamp": 7}]
    >>> rows.append({**rows[0], "item_asins": ["a", "b"], "history_item_id": [0, 1], "history_item_title": ["A", "B"],
    ...              "history_rating": [5.0, 4.0], "history_timestamp": [7, 7], "item_asin": "c", "item_id": 2,
    ...              "item_title": "C", "timestamp": 9})
    >>> shuffle_same_time({"test": rows}, 0), [(r["history_item_id"], r["item_id"]) for r in rows]
    ((1, 0, 1), [([1], 0), ([1, 0], 2)])
    """
    by_user: dict[str, list[dict]] = {}
    for name in SPLITS:
        for row in splits.get(name, []):
            by_user.setdefault(row["user_id"], []).append(row)
    cap = max((len(r["history_item_id"]) for rows in by_user.values() for r in rows), default=0)
    reordered = kept = moved = 0
    for user, rows in by_user.items():
        seq, positions = _history(rows[0]), []
        for row in rows:
            history = _history(row)
            if history != seq[len(seq) - len(history) :] or (len(history) < cap and len(history) != len(seq)):
                kept += 1  # not one chain: the rows stay as imported
                break
            positions.append(len(seq))
            seq.append(tuple(row[c] for c in _TARGET))
        else:
            seen: dict[str, int] = {}
            keys = []
            for asin, *_ in seq:  # a repeated item gets its own key per occurrence
                n = seen[asin] = seen.get(asin, -1) + 1
                keys.append(tie_key(seed, str(user), asin if n == 0 else f"{asin}#{n}"))
            new, start = [], 0
            for end in range(1, len(seq) + 1):  # runs of equal consecutive timestamps
                if end == len(seq) or seq[end][_TIME] != seq[start][_TIME]:
                    new += [seq[k] for k in sorted(range(start, end), key=keys.__getitem__)]
                    start = end
            for row, p in zip(rows, positions, strict=True):
                history = new[max(0, p - cap) : p]
                for j, c in enumerate(_EVENT):
                    row[c] = [e[j] for e in history]
                moved += new[p] != seq[p]
                row.update(zip(_TARGET, new[p], strict=True))
            reordered += 1
    return reordered, kept, moved


def import_d3(ds: dict, seed: int = 0) -> tuple[dict, list[dict], dict]:
    folder = Path(ds["path"])
    if not folder.is_dir():
        raise RereError(
            f"datasets path {folder} is not a folder; set 'path' to a folder with train/valid/test.csv and info.txt."
        )
    catalogue = _read_d3_catalogue(folder / "info.txt")
    splits: dict[str, list[dict]] = {}
    train_from = "train"
    for split in SPLITS:
        path = folder / f"{split}.csv"
        if split == "train" and not path.is_file():
            if ds["missing_train"] != "use_valid":
                raise RereError(
                    f"{path} does not exist. If the folder only has valid/test (like the public Office split), "
                    "set missing_train: use_valid for this dataset to train on the valid split."
                )
            log.warning(
                "%s is missing: train = valid (missing_train: use_valid); valid rows are also used for training", path
            )
            train_from = "valid"
            continue
        splits[split] = read_split(path)
    if train_from == "valid":
        splits["train"] = copy.deepcopy(splits["valid"])

    asin_of: dict[int, str] = {}
    for split in SPLITS:
        where = folder / (f"{split}.csv" if split != "train" or train_from == "train" else "valid.csv")
        for row in splits[split]:
            line = row.pop("_line", "?")
            hist_lists = [row[c] for c in ("item_asins", "history_item_title", "history_rating", "history_timestamp")]
            if any(len(x) != len(row["history_item_id"]) for x in hist_lists):
                raise RereError(f"{where}: line {line}: the history columns have different lengths.")
            pairs = list(zip(row["history_item_id"], row["item_asins"], row["history_item_title"], strict=True)) + [
                (row["item_id"], row["item_asin"], row["item_title"])
            ]
            for item_id, asin, title in pairs:
                if item_id not in catalogue:
                    raise RereError(
                        f"{where}: line {line}: item id {item_id} ({asin}) is not in {folder / 'info.txt'}."
                    )
                if clean_title(title) != catalogue[item_id]:  # info.txt titles are cleaned when read
                    raise RereError(
                        f"{where}: line {line}: item {item_id} has title {title!r} here but {catalogue[item_id]!r} in info.txt."
                    )
                if asin_of.setdefault(item_id, asin) != asin:
                    raise RereError(
                        f"{where}: line {line}: item {item_id} has asin {asin!r} here but {asin_of[item_id]!r} elsewhere."
                    )

    raw_ids = {i: asin_of.get(i) or f"item {i}" for i in catalogue}
    unique, renamed = unique_titles({raw_ids[i]: t for i, t in catalogue.items()})
    title_of = {i: unique[raw_ids[i]] for i in catalogue}
    for rows in splits.values():
        for row in rows:
            row["history_item_title"] = [title_of[i] for i in row["history_item_id"]]
            row["item_title"] = title_of[row["item_id"]]
    items = [
        {"item_id": i, "title": title_of[i], "asin": asin_of.get(i, ""), "text": title_of[i]} for i in sorted(catalogue)
    ]

    shuffled = None
    if ds["d3_ties"] == "shuffle":
        own = {s: splits[s] for s in SPLITS if s != "train" or train_from == "train"}
        reordered, kept, moved = shuffle_same_time(own, seed)
        if train_from == "valid":
            splits["train"] = copy.deepcopy(splits["valid"])
        shuffled = {"users_reordered": reordered, "users_kept": kept, "rows_with_new_target": moved}
        log.info("d3_ties: shuffle: %s", shuffled)

    events = set()
    for rows in splits.values():
        for r in rows:
            events.add((r["user_id"], r["item_asin"], r["timestamp"]))
            events.update((r["user_id"], a, t) for a, t in zip(r["item_asins"], r["history_timestamp"], strict=True))
    times = [e[2] for e in events]
    order = same_time_order(splits)
    stats = {
        "users": len({r["user_id"] for rows in splits.values() for r in rows}),
        "items": len(items),
        "interactions": len(events),
        "rows": {s: len(splits[s]) for s in SPLITS},
        "time_range": [min(times), max(times)] if times else [None, None],
        "split": "as_imported",
        "source": "d3",
        "max_history": max((len(r["history_item_id"]) for rows in splits.values() for r in rows), default=0),
        "path": str(folder),
        "train_from": train_from,
        "renamed_duplicate_titles": renamed,
        "items_without_asin": sum(1 for i in catalogue if i not in asin_of),
        # Same-time events keep the imported rows' order unless d3_ties: shuffle (`ties` does not apply).
        "d3_ties": ds["d3_ties"],
        **({"d3_ties_shuffle": shuffled} if shuffled else {}),
        "same_time_pairs": order["share"],
        "same_time_order": order,
        "interactions_note": "distinct (user, asin, timestamp) events in targets and histories",
    }
    return splits, items, stats
