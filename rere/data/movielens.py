"""MovieLens-100K readers (`source: recbole` and `source: grouplens`).

`recbole` (default): MovieLens-100K as shipped inside the RecBole 1.2.1 wheel on PyPI
(sha256-pinned). The members `ml-100k.inter` and `ml-100k.item` are read straight from the
zip, never extracted. RecBole splits "Title (Year)" into title and year; we join them
back: `f"{title} ({year})"`, or just the title when the year is missing (RecBole writes
`unkonwn` for item 267, whose title is also `unkonwn`: both are mapped back to GroupLens's
`unknown`). Item 1412's year is `V` (from GroupLens's "... (1995) (V)"), which the join
restores exactly.
`grouplens`: the canonical `ml-100k.zip` (`u.data`, `u.item` latin-1, `|`-separated,
19 genre flags). Same processing, so both sources give the same splits where the files
agree. Its sha256 is not pinned: without `sha256` a warning is logged.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

from rere import RereError
from rere.data.corpus import Corpus, num_key

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
    missing = sorted({e[1] for e in events} - set(titles), key=num_key)
    if missing:
        raise RereError(f"{where_item}: items {missing[:10]} are rated but have no title line; the archive is damaged.")
    used = {e[1] for e in events}
    items = sorted(used, key=num_key)
    users = sorted({e[0] for e in events}, key=num_key)
    return Corpus(events, {i: titles[i] for i in items}, {i: words[i] for i in items}, items, users)


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
