"""D3 CSV and catalogue round trips, bad-input errors, atomic writes."""

import pytest

from rere import RereError
from rere.io import atomic_path, read_catalogue, read_split, write_catalogue, write_split


def _row(**kw):
    row = {
        "user_id": "u1",
        "item_asins": ["a", "b"],
        "item_asin": "c",
        "history_item_id": [0, 1],
        "item_id": 2,
        "history_item_title": ['Toy "Story"', "Heat, the movie"],
        "item_title": "Up",
        "history_rating": [5.0, 4.0],
        "rating": 3.0,
        "history_timestamp": [10, 20],
        "timestamp": 30,
    }
    row.update(kw)
    return row


def test_split_round_trip(tmp_path):
    path = tmp_path / "train.csv"
    write_split(path, [_row(), _row(user_id="u2", item_id=0, history_item_id=[2], history_item_title=["Up"])])
    rows = read_split(path)
    assert rows[0]["history_item_title"] == ['Toy "Story"', "Heat, the movie"]
    assert rows[0]["history_item_id"] == [0, 1] and rows[0]["item_id"] == 2
    assert rows[1]["history_item_id"] == [2] and rows[1]["_line"] == 3
    assert rows[0]["timestamp"] == 30 and rows[0]["history_timestamp"] == [10, 20]


def test_split_errors_name_file_and_line(tmp_path):
    path = tmp_path / "test.csv"
    write_split(path, [_row(), _row(history_item_id=[], history_item_title=[])])
    with pytest.raises(RereError, match=r"test\.csv: line 3: empty history"):
        read_split(path)
    text = path.read_text().splitlines()
    path.write_text("\n".join([text[0], text[1].replace("[0, 1]", "__import__('os')")]) + "\n")
    with pytest.raises(RereError, match=r"line 2: column 'history_item_id' is not a literal list"):
        read_split(path)
    path.write_text("user_id,item_id\nu,1\n")
    with pytest.raises(RereError, match=r"line 1: missing column"):
        read_split(path)
    path.write_bytes(b"user_id\n\xff\xfe\n")
    with pytest.raises(RereError, match="not UTF-8"):
        read_split(path)


def test_catalogue_round_trip_and_errors(tmp_path):
    path = tmp_path / "info.txt"
    write_catalogue(path, {1: "B", 0: "A (1995)"})
    assert path.read_text() == "A (1995)\t0\nB\t1\n"
    assert read_catalogue(path) == {0: "A (1995)", 1: "B"}
    path.write_text("A\t0\nA\t1\n")
    with pytest.raises(RereError, match="line 2: title 'A' is also item 0"):
        read_catalogue(path)
    path.write_text("A\tx\n")
    with pytest.raises(RereError, match="line 1: item id 'x'"):
        read_catalogue(path)


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "half.csv").write_text("x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "full.csv").write_text("y")
    assert (out / "full.csv").read_text() == "y"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize(
    "value",
    [
        "[754, 1674]",
        "[4.0, -1e3, 2E-2]",
        "[]",
        "[874724710]",
        "[1.]",  # Python's grammar, not JSON's: falls back to ast
        "[+1, 2]",
        "[1,2]",  # no space after the comma: ast
        "['255', '286']",
        """["My Best Friend's Wedding (1997)", 'Face/Off (1997)']""",
        """['Say "Hi", then go', "it's"]""",
        r"['It\'s \"x\"', 'a\\b', '\x41\u00e9']",  # escapes: ast
        r"['a\\b', 'C:\\temp']",  # only backslash escapes, no quote inside: still ast
        "['Amélie (2001)', '']",
        "'255'",  # a bare value (D3 writes some 1-element lists so)
        "7",
        "[1, 'a']",
    ],
)
def test_parse_literal_reads_what_ast_reads(value):
    import ast

    from rere.io import parse_literal

    got, want = parse_literal(value), ast.literal_eval(value)
    assert got == want
    assert type(got) is type(want)
    if isinstance(want, list):
        assert [type(x) for x in got] == [type(x) for x in want]


@pytest.mark.parametrize("value", ["__import__('os')", "[e]", "[1e]", "['a', b]", "[1, 2"])
def test_parse_literal_refuses_what_ast_refuses(value):
    from rere.io import parse_literal

    with pytest.raises((ValueError, SyntaxError)):
        parse_literal(value)
