"""Import an existing D3-format folder (`source: d3`).

`d3`: an existing folder (`path`) with train/valid/test.csv and info.txt in the D3
layout, imported as it is (its item ids, histories and row order are kept). Checks: every
column, literal lists, equal-length history lists, every item id (target and history) in
the catalogue, titles equal to the catalogue's (after `rere.io.clean_title`: a tab or line
break in a title becomes a space, in info.txt and the CSVs alike), one asin per item id. With
`missing_train: use_valid`, a folder without train.csv is imported with train = valid
(logged, and recorded as `train_from: valid` in stats.json). Items never seen in a split
get `asin: ""` in items.jsonl.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

from rere import RereError
from rere.data.splits import same_time_order, unique_titles
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


def import_d3(ds: dict) -> tuple[dict, list[dict], dict]:
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
        # Same-time events keep the order of the imported rows (`ties` does not apply here).
        "same_time_pairs": order["share"],
        "same_time_order": order,
        "interactions_note": "distinct (user, asin, timestamp) events in targets and histories",
    }
    return splits, items, stats
