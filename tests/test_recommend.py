"""`rere recommend`: K known items for a history given by titles or ids; unknown items refused."""

from __future__ import annotations

import json

import pytest
from test_sft import make_base

from rere import RereError
from rere.cli import main
from rere.index import ItemIndex
from rere.io import read_catalogue
from rere.recommend import resolve_history


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("rec"))


def recommend(paths, *extra: str) -> int:
    return main(
        [
            "recommend",
            "--model",
            str(paths["base"]),
            "--index",
            str(paths["index"]),
            "--set",
            "tracking.mlflow=false",
            *extra,
        ]
    )


def test_prints_k_known_items_as_a_table(base, capsys):
    assert recommend(base, "--history", "Red Lamp 0", '"Blue Lamp 1"', "--item-ids", "2", "--k", "4") == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["rank", "item_id", "log_prob", "title"]
    titles = read_catalogue(base["data"] / "info.txt")
    rows = [line.split(None, 3) for line in lines[1:]]
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4]
    assert all(titles[int(item_id)] == title for _, item_id, _, title in rows)
    scores = [float(r[2]) for r in rows]
    assert scores == sorted(scores, reverse=True) and len({r[1] for r in rows}) == 4


def test_json_output_and_exclude_history(base, capsys):
    assert recommend(base, "--item-ids", "0", "1", "--k", "10", "--exclude-history", "--json") == 0
    payload = json.loads(capsys.readouterr().out)
    assert [h["item_id"] for h in payload["history"]] == [0, 1]
    recs = payload["recommendations"]
    assert [r["rank"] for r in recs] == list(range(1, 11))
    assert not {0, 1} & {r["item_id"] for r in recs}  # 12 items - 2 seen = the 10 others
    assert {r["item_id"] for r in recs} == set(range(2, 12))


def test_unknown_items_are_refused_or_skipped(base, capsys):
    assert recommend(base, "--history", "Red Lamp 0", "No Such Film", "--item-ids", "99") == 2
    err = capsys.readouterr().err
    assert "'No Such Film'" in err and "id 99" in err and "--skip-unknown" in err

    assert recommend(base, "--history", "Red Lamp 0", "No Such Film", "--skip-unknown", "--k", "3", "--json") == 0
    assert len(json.loads(capsys.readouterr().out)["recommendations"]) == 3

    assert recommend(base, "--history", "No Such Film", "--skip-unknown") == 2
    assert "history is empty" in capsys.readouterr().err
    assert recommend(base, "--item-ids", "0", "--k", "13") == 2
    assert "between 1 and 12" in capsys.readouterr().err


def test_resolve_history_accepts_titles_quoted_or_not_codes_and_ids(base):
    index = ItemIndex.load(base["index"])
    assert resolve_history(index, ["Red Lamp 0", '"Blue Lamp 1"', ' "Green Lamp 2" '], [3]) == [0, 1, 2, 3]
    with pytest.raises(RereError, match="'red lamp 0'"):
        resolve_history(index, ["red lamp 0"], [])  # exact titles only
