"""File formats and safe writes shared by every stage.

- Atomic outputs: every file or folder is written under a temporary name next to its
  destination and renamed into place only when complete, so a failed stage leaves nothing
  half-written behind.
- The D3 split layout (train/valid/test.csv; list columns as Python-literal strings) and
  the catalogue (info.txt: `title<TAB>item_id`, one line per item). List columns are read
  by a literal parser, never executed: lists of plain numbers and of plain quoted strings
  (what pandas and `write_split` write) by a regular expression, anything else (escapes,
  a bare value) by `ast.literal_eval`.
- Titles are one line without tabs (`clean_title`): every reader turns a tab, newline or
  carriage return inside a title into a space, and the writer refuses one that still has it.
- A file that is not UTF-8 is reported with the line and column of its first bad byte.
"""

from __future__ import annotations

import ast
import contextlib
import csv
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from rere import RereError

D3_COLUMNS = [
    "user_id",
    "item_asins",
    "item_asin",
    "history_item_id",
    "item_id",
    "history_item_title",
    "item_title",
    "history_rating",
    "rating",
    "history_timestamp",
    "timestamp",
]
D3_LIST_COLUMNS = ["item_asins", "history_item_id", "history_item_title", "history_rating", "history_timestamp"]
SPLITS = ("train", "valid", "test")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; on success rename it onto `path` (file or folder).

    On an exception the temporary is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def not_utf8(path: str | Path) -> RereError:
    """The error for a file that is not UTF-8, with the line and column of its first bad byte.

    (A UnicodeDecodeError's offset is within the chunk the decoder was given, not the file.)
    """
    path = Path(path)
    for line_no, line in enumerate(path.read_bytes().split(b"\n"), 1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as exc:
            return RereError(
                f"{path}: line {line_no}: byte {exc.start + 1} of the line ({line[exc.start : exc.start + 1]!r}) "
                f"is not UTF-8 ({exc.reason}); re-encode the file as UTF-8."
            )
    return RereError(f"{path}: not UTF-8 (cut short inside a character at the end); re-encode the file as UTF-8.")


# Characters a catalogue title cannot hold: info.txt is one `title<TAB>item_id` per line.
_TITLE_BREAKS = str.maketrans({"\t": " ", "\n": " ", "\r": " "})


def clean_title(title: str) -> str:
    r"""The title rule shared by every reader and the writer: each tab, newline or carriage
    return inside a title becomes one space (nothing else changes).

    >>> clean_title("Pens\tand\r\nPaper")
    'Pens and  Paper'
    """
    return title.translate(_TITLE_BREAKS)


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise RereError(f"{path} does not exist; run the stage that produces it first.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RereError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg}).") from None
    except UnicodeDecodeError:
        raise not_utf8(path) from None


def save_resolved_config(folder: str | Path, config: dict, name: str = "config.yaml") -> None:
    """Write the resolved config next to an artifact (determinism: what produced this?)."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    with open(Path(folder) / name, "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f, sort_keys=True, allow_unicode=True)


def read_resolved_config(folder: str | Path, name: str = "config.yaml") -> dict | None:
    """The config `save_resolved_config` wrote next to an artifact; None without one."""
    path = Path(folder) / name
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def data_seed(data: str | Path, default: int) -> int:
    """The `seed` that `rere data` built the folder `data` with (its resolved config.yaml),
    else `default`. The evaluation subsample (evaluate.max_rows) is drawn with it, so every
    training seed of `seeds` is evaluated on the same rows of the same data."""
    seed = (read_resolved_config(data) or {}).get("seed")
    return seed if isinstance(seed, int) else default


# A list of plain numbers, and a list of quoted strings without a backslash: the forms a D3
# CSV's list columns take. Either is read without ast.literal_eval, which was 21 s of the 22 s
# that reading ML-100K's train.csv (97,171 rows) took; everything else still goes through it.
_NUMBER_LIST = re.compile(r"\[(?:[-+.\deE]+(?:, [-+.\deE]+)*)?\]")
_PLAIN_STR = r"'[^'\\]*'|\"[^\"\\]*\""
_STR_LIST = re.compile(rf"\[(?:(?:{_PLAIN_STR})(?:, (?:{_PLAIN_STR}))*)?\]")
_STR_ITEM = re.compile(_PLAIN_STR)


def parse_literal(value: str) -> Any:
    """A Python literal as ast.literal_eval reads it (ValueError or SyntaxError if it is not one),
    with a fast path for lists of plain numbers or plain quoted strings.

    >>> parse_literal("[754, 1674]"), parse_literal("[4.0, -1e3]"), parse_literal("[]")
    ([754, 1674], [4.0, -1000.0], [])
    >>> parse_literal('''["My Best Friend's Wedding (1997)", 'Face/Off (1997)']''')
    ["My Best Friend's Wedding (1997)", 'Face/Off (1997)']
    >>> parse_literal(r"['a\\tb', 7]"), parse_literal("'255'")  # an escape, a bare value: ast
    (['a\\tb', 7], '255')
    """
    if _NUMBER_LIST.fullmatch(value):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            pass  # e.g. "[1.]" or "[+1]": Python's grammar, not JSON's
    elif _STR_LIST.fullmatch(value):
        return [m[1:-1] for m in _STR_ITEM.findall(value)]
    return ast.literal_eval(value)


def _literal(value: str, path: Path, line: int, column: str) -> Any:
    try:
        return parse_literal(value)
    except (ValueError, SyntaxError):
        raise RereError(f"{path}: line {line}: column '{column}' is not a literal list: {value[:80]!r}") from None


def check_row_items(rows: list[dict], known, source: str, where: str, fix: str) -> None:
    """RereError at the first row whose history or target holds an item id not in `known`,
    naming `source`, the row's line, the ids, `where` they were looked up and `fix`."""
    for row in rows:
        missing = [x for x in [*row["history_item_id"], row["item_id"]] if x not in known]
        if missing:
            raise RereError(
                f"{source}: line {row.get('_line', '?')}: item id(s) {missing[:5]} are not in {where}; {fix}"
            )


def read_split(path: str | Path) -> list[dict]:
    """Read a D3-format CSV into a list of row dicts with list columns parsed.

    Errors name the file and line: a missing column, a malformed list, a non-UTF-8 byte,
    a history whose parallel lists disagree in length, an empty history.
    """
    path = Path(path)
    if not path.is_file():
        raise RereError(f"{path} does not exist; run `rere data` first.")
    rows = []
    csv.field_size_limit(sys.maxsize)
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in D3_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise RereError(f"{path}: line 1: missing column(s) {missing}; expected the D3 layout {D3_COLUMNS}.")
            for row in reader:
                line = reader.line_num
                if None in row or any(row[c] is None for c in D3_COLUMNS):
                    raise RereError(f"{path}: line {line}: wrong number of fields.")
                for c in D3_LIST_COLUMNS:
                    row[c] = _literal(row[c], path, line, c)
                    if not isinstance(row[c], list):
                        row[c] = [row[c]]  # D3 writes a 1-element list as a bare value in places
                try:
                    row["item_id"] = int(row["item_id"])
                    row["history_item_id"] = [int(x) for x in row["history_item_id"]]
                    row["rating"] = float(row["rating"]) if row["rating"] != "" else None
                    row["timestamp"] = int(float(row["timestamp"]))
                    row["history_timestamp"] = [int(float(x)) for x in row["history_timestamp"]]
                except (TypeError, ValueError) as exc:
                    raise RereError(f"{path}: line {line}: bad number ({exc}).") from None
                if not row["history_item_id"]:
                    raise RereError(
                        f"{path}: line {line}: empty history; every sample needs at least one previous item."
                    )
                if len(row["history_item_id"]) != len(row["history_item_title"]):
                    raise RereError(f"{path}: line {line}: history_item_id and history_item_title differ in length.")
                row["_line"] = line
                rows.append(row)
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    return rows


def write_split(path: str | Path, rows: list[dict]) -> None:
    """Write rows in the D3 layout (list columns as Python-literal strings, like pandas does)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(D3_COLUMNS)
        for r in rows:
            writer.writerow([repr(r[c]) if c in D3_LIST_COLUMNS else r[c] for c in D3_COLUMNS])


def read_catalogue(path: str | Path, unique_titles: bool = True) -> dict[int, str]:
    """info.txt -> {item_id: title}. Errors name the line; titles must be unique unless
    `unique_titles` is False (a foreign D3 folder may repeat titles; `rere data` renames them).

    The item id is the text after the line's last tab; a tab left in the title before it
    becomes a space (`clean_title`), so whatever this reader returns the writer can write.
    """
    path = Path(path)
    if not path.is_file():
        raise RereError(f"{path} does not exist; run `rere data` first.")
    items: dict[int, str] = {}
    seen: dict[str, int] = {}
    try:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                line = line.rstrip("\n")
                if not line:
                    continue
                title, sep, raw_id = line.rpartition("\t")
                title = clean_title(title)
                if not sep:
                    raise RereError(f"{path}: line {line_no}: expected 'title<TAB>item_id'.")
                try:
                    item_id = int(raw_id)
                except ValueError:
                    raise RereError(f"{path}: line {line_no}: item id {raw_id!r} is not an integer.") from None
                if item_id in items:
                    raise RereError(f"{path}: line {line_no}: item id {item_id} appears twice.")
                if unique_titles and title in seen:
                    raise RereError(
                        f"{path}: line {line_no}: title {title!r} is also item {seen[title]}; "
                        "titles are generation targets and must be unique."
                    )
                items[item_id] = title
                seen[title] = item_id
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    if not items:
        raise RereError(f"{path}: the catalogue is empty.")
    return items


def write_catalogue(path: str | Path, items: dict[int, str]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for item_id in sorted(items):
            title = items[item_id]
            if clean_title(title) != title:  # the readers clean titles first; this is a bug, not bad input
                raise RereError(
                    f"item {item_id}: title {title!r} has a tab or line break; pass it through clean_title."
                )
            f.write(f"{title}\t{item_id}\n")


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise RereError(f"{path} does not exist; run the stage that produces it first.")
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise RereError(f"{path}: line {line_no}: not valid JSON ({exc.msg}).") from None
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    return out
