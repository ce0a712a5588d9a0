"""Amazon Review Data 2018 (`source: amazon`): reader and the D3/ReRe preprocessing.

`amazon`: Amazon Review Data 2018, `{base_url}/categoryFiles/{Category}_5.json.gz` and
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
6. Sequences: each user's reviews sorted by time; ties keep file order with `ties: file`
   (a stable sort, as the reference; config/amazon.yaml sets it), or follow
   `datasets.*.ties`. Users are visited in order of first appearance.
Item text: the cleaned title plus the metadata `category` list (HTML entities unescaped).
Files are kept in `{download_dir}/amazon/`.
"""

from __future__ import annotations

import calendar
import gzip
import html
import json
import logging
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from rere import RereError
from rere.data.corpus import Corpus

log = logging.getLogger(__name__)

EARLIEST_YEAR = 1996  # the reference stops moving the Amazon window back at this year
AMAZON_MAX_TITLE_WORDS = 20


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
        notes={
            "window": window,
            "window_timestamps": [start, end],
            "k_core": ds["k_core"],
            "min_items": ds["min_items"],
        },
    )
