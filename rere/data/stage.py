"""`rere data`: download and preprocess one dataset into D3-format splits.

Writes `train/valid/test.csv` (D3 layout), `info.txt` (catalogue), `items.jsonl`,
`stats.json` and the resolved `config.yaml` into `--out`, all at once: the folder is built
under a temporary name and renamed into place, so a failure leaves nothing behind.

Sources (`datasets.NAME.source`)
--------------------------------
- `recbole` (default): MovieLens-100K as shipped inside the RecBole 1.2.1 wheel on PyPI
  (sha256-pinned). The members `ml-100k.inter` and `ml-100k.item` are read straight from the
  zip, never extracted. RecBole splits "Title (Year)" into title and year; we join them
  back: `f"{title} ({year})"`, or just the title when the year is missing (RecBole writes
  `unkonwn` for item 267, whose title is also `unkonwn`: both are mapped back to GroupLens's
  `unknown`). Item 1412's year is `V` (from GroupLens's "... (1995) (V)"), which the join
  restores exactly.
- `grouplens`: the canonical `ml-100k.zip` (`u.data`, `u.item` latin-1, `|`-separated,
  19 genre flags). Same processing, so both sources give the same splits where the files
  agree. Its sha256 is not pinned: without `sha256` a warning is logged.
- `amazon`: Amazon Review Data 2018, `{base_url}/categoryFiles/{Category}_5.json.gz` and
  `{base_url}/metaFiles2/meta_{Category}.json.gz`, preprocessed as the D3/ReRe reference
  script does:
  1. Titles: an item is dropped when its metadata has no `title`, a title containing
     `<span id`, or, after cleaning, a title of at most 1 character or more than 20
     space-separated words. Cleaning: `&quot;` -> `"`, `&amp;` -> `&`, then strip spaces,
     then strip double quotes (in that order). A later metadata line for the same asin
     overrides the title of an earlier one; an asin dropped by any of its lines stays
     dropped. Reviews of asins with no kept title are dropped.
  2. Time window: a review is kept when `start <= unixReviewTime <= end`, both inclusive,
     where `start` is 00:00 UTC on the first day of `window_start` and `end` is 00:00 UTC on
     the first day of `window_end` (so the default 2017-10..2018-11 keeps 2017-10-01 up to
     and including 2018-11-01). The reference script uses the machine's local time zone;
     we use UTC so the result does not depend on where it runs.
  3. Iterative k-core: each pass counts the surviving reviews per user and per item and
     removes, at once, every user and every item with fewer than `k_core` reviews;
     passes repeat until nothing is removed. Duplicate (user, item) reviews are kept and
     counted, as in the reference.
  4. Back-off: while fewer than `min_items` items survive and the window starts after
     1996, the start moves back one year (same month) and steps 2-3 are redone from the
     full review list. stats.json records the window used.
  5. Ids: items in order of first appearance among the surviving reviews (file order),
     then `random.Random(seed).shuffle` -> ids 0..N-1 (seed 42 reproduces the reference).
  6. Sequences: each user's reviews sorted by time; ties keep file order (a stable sort,
     as the reference). Users are visited in order of first appearance.
  Item text: the cleaned title plus the metadata `category` list (HTML entities unescaped).
  Files are kept in `{download_dir}/amazon/`.
- `d3`: an existing folder (`path`) with train/valid/test.csv and info.txt in the D3
  layout, imported as it is (its item ids, histories and row order are kept). Checks: every
  column, literal lists, equal-length history lists, every item id (target and history) in
  the catalogue, titles equal to the catalogue's, one asin per item id. With
  `missing_train: use_valid`, a folder without train.csv is imported with train = valid
  (logged, and recorded as `train_from: valid` in stats.json). Items never seen in a split
  get `asin: ""` in items.jsonl.

Shared rules
------------
- Per-user order (MovieLens): by (timestamp, numeric raw item id); users are visited in
  numeric id order; items are listed in numeric id order before the seeded shuffle.
  (ML-100K has many same-second ratings; the key makes their order independent of the
  file's row order, so the RecBole and GroupLens copies agree.)
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
- Ratings are floats, timestamps integer seconds.

Bad input raises RereError naming the file and line: a truncated gzip, a non-UTF-8 byte,
a malformed JSON line or a missing field, a malformed MovieLens row, a d3 CSV with a
missing column, or a history item that is not in the catalogue.
"""

from __future__ import annotations

import calendar
import copy
import gzip
import html
import json
import logging
import random
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from rere import RereError
from rere.config import dataset_config
from rere.download import download
from rere.io import (
    SPLITS,
    atomic_path,
    read_catalogue,
    read_split,
    save_resolved_config,
    write_catalogue,
    write_jsonl,
    write_split,
)

log = logging.getLogger(__name__)

RECBOLE_URL = (
    "https://files.pythonhosted.org/packages/ab/fe/"
    "7d606cb7cd2b166a36b100cb9435d21014ceee16c192d972deb0976967a8/recbole-1.2.1-py3-none-any.whl"
)
RECBOLE_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
RECBOLE_INTER = "recbole/dataset_example/ml-100k/ml-100k.inter"
RECBOLE_ITEM = "recbole/dataset_example/ml-100k/ml-100k.item"
GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
GROUPLENS_DATA = "ml-100k/u.data"
GROUPLENS_ITEM = "ml-100k/u.item"
# u.item genre flags, in file order.
ML_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
]  # fmt: skip
EARLIEST_YEAR = 1996  # the reference stops moving the Amazon window back at this year
AMAZON_MAX_TITLE_WORDS = 20


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
    tie_by_item: bool  # True: same-time ties ordered by raw item id; False: by file order
    notes: dict = field(default_factory=dict)


def _num_key(raw: str) -> tuple:
    """Raw ids that are integers sort numerically, others after them as strings."""
    return (0, int(raw), "") if raw.isdigit() else (1, 0, raw)


# --------------------------------------------------------------------------- MovieLens


def _zip_lines(archive: Path, member: str, encoding: str) -> Iterator[tuple[int, str]]:
    """Yield (line number, line without newline) of one zip member, decoding strictly."""
    try:
        with zipfile.ZipFile(archive) as z:
            try:
                raw = z.read(member)
            except KeyError:
                raise RereError(f"{archive}: member {member} is missing; is this the right archive?") from None
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise RereError(
            f"{archive}: not a readable zip archive ({exc}); delete it and run again to download it anew."
        ) from None
    where = f"{archive}:{member}"
    for line_no, line in enumerate(raw.split(b"\n"), 1):
        line = line.rstrip(b"\r")
        if not line:
            continue
        try:
            yield line_no, line.decode(encoding)
        except UnicodeDecodeError as exc:
            raise RereError(f"{where}: line {line_no}: byte {exc.start} is not {encoding} ({exc.reason}).") from None


def _ml_title(title: str, year: str) -> str:
    title = "unknown" if title == "unkonwn" else title  # RecBole's typo for GroupLens's "unknown"
    year = "" if year in ("unkonwn", "unknown") else year
    return f"{title} ({year})" if year else title


def _ml_events(lines: Iterator[tuple[int, str]], where: str, sep: str | None) -> list[tuple[str, str, float, int]]:
    events = []
    for line_no, line in lines:
        parts = line.split(sep)
        if len(parts) != 4:
            raise RereError(
                f"{where}: line {line_no}: expected 4 fields (user item rating timestamp), got {len(parts)}."
            )
        user, item, rating, ts = (p.strip() for p in parts)
        try:
            events.append((user, item, float(rating), int(float(ts))))
        except ValueError:
            raise RereError(
                f"{where}: line {line_no}: rating {rating!r} or timestamp {ts!r} is not a number."
            ) from None
    return events


def _ml_corpus(events, titles, words, where_item: str) -> Corpus:
    missing = sorted({e[1] for e in events} - set(titles), key=_num_key)
    if missing:
        raise RereError(f"{where_item}: items {missing[:10]} are rated but have no title line; the archive is damaged.")
    used = {e[1] for e in events}
    items = sorted(used, key=_num_key)
    users = sorted({e[0] for e in events}, key=_num_key)
    return Corpus(events, {i: titles[i] for i in items}, {i: words[i] for i in items}, items, users, tie_by_item=True)


def read_recbole(archive: Path) -> Corpus:
    """ML-100K from the RecBole wheel (tab-separated atomic files with typed headers)."""
    where_inter, where_item = f"{archive}:{RECBOLE_INTER}", f"{archive}:{RECBOLE_ITEM}"
    inter = _zip_lines(archive, RECBOLE_INTER, "utf-8")
    header = next(inter, (1, ""))[1].split("\t")
    if header[:4] != ["user_id:token", "item_id:token", "rating:float", "timestamp:float"]:
        raise RereError(f"{where_inter}: line 1: unexpected header {header}; expected RecBole's ml-100k.inter.")
    events = _ml_events(inter, where_inter, "\t")
    items = _zip_lines(archive, RECBOLE_ITEM, "utf-8")
    header = next(items, (1, ""))[1].split("\t")
    if header != ["item_id:token", "movie_title:token_seq", "release_year:token", "class:token_seq"]:
        raise RereError(f"{where_item}: line 1: unexpected header {header}; expected RecBole's ml-100k.item.")
    titles, words = {}, {}
    for line_no, line in items:
        parts = line.split("\t")
        if len(parts) != 4:
            raise RereError(f"{where_item}: line {line_no}: expected 4 tab-separated fields, got {len(parts)}.")
        item, title, year, genres = parts
        titles[item] = _ml_title(title.strip(), year.strip())
        words[item] = genres.split()
    return _ml_corpus(events, titles, words, where_item)


def read_grouplens(archive: Path) -> Corpus:
    """ML-100K from GroupLens's ml-100k.zip (u.data tab-separated; u.item latin-1, '|')."""
    events = _ml_events(_zip_lines(archive, GROUPLENS_DATA, "utf-8"), f"{archive}:{GROUPLENS_DATA}", "\t")
    where_item = f"{archive}:{GROUPLENS_ITEM}"
    titles, words = {}, {}
    for line_no, line in _zip_lines(archive, GROUPLENS_ITEM, "latin-1"):
        parts = line.split("|")
        if len(parts) != 5 + len(ML_GENRES):
            raise RereError(
                f"{where_item}: line {line_no}: expected {5 + len(ML_GENRES)} '|'-separated fields, got {len(parts)}."
            )
        titles[parts[0]] = parts[1].strip()
        words[parts[0]] = [g for g, flag in zip(ML_GENRES, parts[5:], strict=True) if flag.strip() == "1"]
    return _ml_corpus(events, titles, words, where_item)


# --------------------------------------------------------------------------- Amazon


def _jsonl_gz(path: Path, required: tuple[str, ...]) -> Iterator[tuple[int, dict]]:
    """Yield (line number, record) from a gzip JSON-lines file; errors name file and line."""
    line_no = 0
    try:
        with gzip.open(path, "rb") as f:
            for line_no, raw in enumerate(tqdm(f, desc=path.name, unit=" lines", disable=None, leave=False), 1):
                if not raw.strip():
                    continue
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise RereError(f"{path}: line {line_no}: byte {exc.start} is not UTF-8 ({exc.reason}).") from None
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise RereError(
                        f"{path}: line {line_no}: not valid JSON ({exc.msg} at column {exc.colno})."
                    ) from None
                if not isinstance(record, dict):
                    raise RereError(f"{path}: line {line_no}: expected a JSON object, got {type(record).__name__}.")
                absent = [k for k in required if k not in record]
                if absent:
                    raise RereError(f"{path}: line {line_no}: missing field(s) {absent}.")
                yield line_no, record
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise RereError(
            f"{path}: line {line_no + 1}: the gzip stream is truncated or corrupt ({type(exc).__name__}: {exc}); "
            "delete the file and run again to download it anew."
        ) from None


def clean_amazon_title(title) -> str | None:
    """The reference title filter: the cleaned title, or None when the item is dropped.

    >>> clean_amazon_title(' "Post-it &amp; Notes" ')
    'Post-it & Notes'
    >>> clean_amazon_title('<span id="x">') is None, clean_amazon_title('A') is None
    (True, True)
    """
    if not isinstance(title, str) or "<span id" in title:
        return None
    title = title.replace("&quot;", '"').replace("&amp;", "&").strip(" ").strip('"')
    if len(title) > 1 and len(title.split(" ")) <= AMAZON_MAX_TITLE_WORDS:
        return title
    return None


def month_start_utc(month: str) -> int:
    """'2017-10' -> unix seconds of 2017-10-01 00:00 UTC."""
    year, mon = (int(x) for x in month.split("-"))
    if not 1 <= mon <= 12:
        raise RereError(f"month {month!r}: expected YYYY-MM with MM in 01..12.")
    return calendar.timegm((year, mon, 1, 0, 0, 0))


def k_core(reviews: list[tuple[str, str, float, int]], k: int) -> list[tuple[str, str, float, int]]:
    """Iterative k-core: drop users and items with fewer than k reviews until none remain.

    Each pass removes, simultaneously, every under-k user and under-k item of that pass.
    """
    removed_users: set[str] = set()
    removed_items: set[str] = set()
    while True:
        kept = [r for r in reviews if r[0] not in removed_users and r[1] not in removed_items]
        users = Counter(r[0] for r in kept)
        items = Counter(r[1] for r in kept)
        drop_users = {u for u, c in users.items() if c < k}
        drop_items = {i for i, c in items.items() if c < k}
        if not drop_users and not drop_items:
            return kept
        removed_users |= drop_users
        removed_items |= drop_items


def read_amazon(reviews_path: Path, meta_path: Path, ds: dict) -> Corpus:
    titles: dict[str, str] = {}
    dropped: set[str] = set()
    categories: dict[str, list[str]] = {}
    for _, meta in _jsonl_gz(meta_path, ("asin",)):
        asin = str(meta["asin"])
        title = clean_amazon_title(meta.get("title"))
        if title is None:
            dropped.add(asin)
            continue
        titles[asin] = title
        cats = meta.get("category") or []
        cats = [cats] if isinstance(cats, str) else cats
        categories[asin] = [html.unescape(c).strip() for c in cats if isinstance(c, str) and "<" not in c and c.strip()]
    for asin in dropped:
        titles.pop(asin, None)

    reviews = []
    for line_no, r in _jsonl_gz(reviews_path, ("reviewerID", "asin", "overall", "unixReviewTime")):
        try:
            reviews.append((str(r["reviewerID"]), str(r["asin"]), float(r["overall"]), int(r["unixReviewTime"])))
        except (TypeError, ValueError):
            raise RereError(f"{reviews_path}: line {line_no}: 'overall' or 'unixReviewTime' is not a number.") from None
    titled = [r for r in reviews if r[1] in titles]
    log.info(
        "%s: %d reviews, %d with a kept title; %d items with a kept title",
        reviews_path.name,
        len(reviews),
        len(titled),
        len(titles),
    )

    end = month_start_utc(ds["window_end"])
    start_year, start_month = (int(x) for x in ds["window_start"].split("-"))
    while True:
        start = month_start_utc(f"{start_year}-{start_month:02d}")
        kept = k_core([r for r in titled if start <= r[3] <= end], ds["k_core"])
        n_items = len({r[1] for r in kept})
        log.info(
            "window %d-%02d..%s: %d items, %d reviews after %d-core",
            start_year,
            start_month,
            ds["window_end"],
            n_items,
            len(kept),
            ds["k_core"],
        )
        if n_items >= ds["min_items"] or start_year <= EARLIEST_YEAR:
            break
        start_year -= 1
    if n_items < ds["min_items"]:
        log.warning("only %d items survive even from %d; continuing with them", n_items, start_year)
    if not kept:
        raise RereError(
            f"{reviews_path}: no reviews survive the time window and the {ds['k_core']}-core; check the category and window."
        )
    window = [f"{start_year}-{start_month:02d}", ds["window_end"]]
    items = list(dict.fromkeys(r[1] for r in kept))
    users = list(dict.fromkeys(r[0] for r in kept))
    return Corpus(
        kept,
        {i: titles[i] for i in items},
        {i: categories.get(i, []) for i in items},
        items,
        users,
        tie_by_item=False,
        notes={
            "window": window,
            "window_timestamps": [start, end],
            "k_core": ds["k_core"],
            "min_items": ds["min_items"],
        },
    )


# --------------------------------------------------------------------------- ids, samples, splits


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


def user_sequences(corpus: Corpus) -> dict[str, list[tuple[str, float, int]]]:
    """user -> [(item, rating, timestamp)] in time order (ties: see the module docstring)."""
    seqs: dict[str, list[tuple[str, float, int]]] = {u: [] for u in corpus.user_order}
    for user, item, rating, ts in corpus.events:
        seqs[user].append((item, rating, ts))
    for seq in seqs.values():
        if corpus.tie_by_item:
            seq.sort(key=lambda e: (e[2], _num_key(e[0])))
        else:
            seq.sort(key=lambda e: e[2])  # stable: ties keep file order
    return seqs


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
    titles, renamed = unique_titles(corpus.titles)
    if renamed:
        log.info(
            "%d items share a title with another item; appended their raw id, e.g. %r",
            renamed,
            next(t for t in titles.values() if t.endswith("]")),
        )
    ids = assign_ids(corpus.item_order, seed)
    seqs = user_sequences(corpus)
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
        "tie_order": "(timestamp, raw item id)" if corpus.tie_by_item else "(timestamp, file order)",
        **corpus.notes,
    }
    return splits, items, stats


# --------------------------------------------------------------------------- d3 import


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
                if title != catalogue[item_id]:
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
        "interactions_note": "distinct (user, asin, timestamp) events in targets and histories",
    }
    return splits, items, stats


# --------------------------------------------------------------------------- fetching and the CLI


def _fetch(url: str, download_dir: Path, sha256: str | None) -> Path:
    return download(url, download_dir / url.rstrip("/").rsplit("/", 1)[-1], sha256=sha256)


def _amazon_sha(ds: dict, name: str) -> str | None:
    sha = ds.get("sha256")
    if isinstance(sha, dict):
        return sha.get(name)
    if sha:
        raise RereError(
            "key 'sha256' for an amazon dataset must be a mapping {file name: sha256} (two files are downloaded)."
        )
    return None


def build(name: str, config: dict, download_dir: Path) -> tuple[dict, list[dict], dict]:
    """Fetch and preprocess dataset `name` -> (split rows, item records, stats)."""
    ds = dataset_config(config, name)
    source = ds["source"]
    if source == "d3":
        return import_d3(ds)
    if source == "amazon":
        base = ds["base_url"].rstrip("/")
        cat = ds["category"]
        urls = [f"{base}/categoryFiles/{cat}_5.json.gz", f"{base}/metaFiles2/meta_{cat}.json.gz"]
        paths = [
            download(u, download_dir / "amazon" / u.rsplit("/", 1)[-1], sha256=_amazon_sha(ds, u.rsplit("/", 1)[-1]))
            for u in urls
        ]
        corpus = read_amazon(paths[0], paths[1], ds)
        corpus.notes["category"] = cat
    elif source == "recbole":
        url = ds["url"] or RECBOLE_URL
        sha = ds["sha256"] or (RECBOLE_SHA256 if url == RECBOLE_URL else None)
        corpus = read_recbole(_fetch(url, download_dir, sha))
    else:  # grouplens
        corpus = read_grouplens(_fetch(ds["url"] or GROUPLENS_URL, download_dir, ds["sha256"]))
    if not corpus.events:
        raise RereError(f"dataset {name}: the source has no interactions.")
    return build_from_corpus(corpus, ds, config["seed"], source)


def write_dataset(out: Path, splits: dict, items: list[dict], stats: dict, config: dict) -> None:
    """Write the whole output folder at once (nothing is left behind on failure)."""
    with atomic_path(out) as tmp:
        tmp.mkdir()
        for split in SPLITS:
            write_split(tmp / f"{split}.csv", splits[split])
        write_catalogue(tmp / "info.txt", {r["item_id"]: r["title"] for r in items})
        write_jsonl(tmp / "items.jsonl", items)
        (tmp / "stats.json").write_text(
            json.dumps(stats, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        save_resolved_config(tmp, config)


def add_arguments(parser) -> None:
    parser.add_argument("--dataset", required=True, help="dataset name, a key of the config's 'datasets'")
    parser.add_argument("--out", required=True, type=Path, help="output folder, e.g. data/ml100k")
    parser.add_argument(
        "--download-dir", type=Path, default=Path("downloads"), help="where raw downloads are kept (default: downloads)"
    )


def run(args, config: dict) -> int:
    splits, items, stats = build(args.dataset, config, args.download_dir)
    stats["dataset"] = args.dataset
    write_dataset(args.out, splits, items, stats, config)
    log.info("wrote %s: %s", args.out, json.dumps({k: stats[k] for k in ("users", "items", "interactions", "rows")}))
    return 0


__all__ = [
    "Corpus",
    "add_arguments",
    "assign_ids",
    "build",
    "build_from_corpus",
    "clean_amazon_title",
    "import_d3",
    "k_core",
    "make_samples",
    "read_amazon",
    "read_grouplens",
    "read_recbole",
    "run",
    "split_leave_one_out",
    "split_temporal",
    "unique_titles",
    "user_sequences",
    "write_dataset",
]
