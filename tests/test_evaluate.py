"""`rere evaluate` on a tiny scratch model: valid items only, metrics from the predictions,
bad requests refused before any decoding."""

from __future__ import annotations

import json
import math

import pytest
from test_sft import make_base, sets, write_tiny_data

import rere.decoding
from rere import RereError
from rere.cli import main
from rere.config import load_config
from rere.index import ItemIndex
from rere.io import read_jsonl, read_split


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("eval"))


def evaluate(paths, out, *extra: str) -> int:
    args = ["evaluate", "--data", str(paths["data"]), "--index", str(paths["index"]), "--model", str(paths["base"])]
    return main([*args, "--out", str(out), *sets(*extra), "-q"])


def test_evaluate_writes_valid_items_and_metrics_of_its_predictions(base, tmp_path):
    out = tmp_path / "results" / "base"
    assert evaluate(base, out) == 0

    catalogue = set(ItemIndex.load(base["index"]).item_ids)
    test_rows = read_split(base["data"] / "test.csv")
    preds = read_jsonl(out / "predictions.jsonl")
    assert len(preds) == len(test_rows) == 16
    for p, row in zip(preds, test_rows, strict=True):
        assert p["target"] == row["item_id"] and p["history"] == row["history_item_id"]
        assert len(p["ranked"]) == 5 == len(set(p["ranked"]))  # num_beams distinct items
        assert set(p["ranked"]) <= catalogue
        assert p["scores"] == sorted(p["scores"], reverse=True) and all(s <= 0 for s in p["scores"])

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["invalid"] == 0 and metrics["rows"] == 16 and metrics["num_beams"] == 5
    assert metrics["method"] == "base" and metrics["dataset"] == "tiny" and metrics["split"] == "test"
    assert metrics["throughput"] > 0
    from rere.machine import describe

    # where the model was trained (its rere.json, written by `rere model`) and where it was evaluated
    trained = json.loads((base["base"] / "rere.json").read_text())["machine"]
    assert metrics["trained_on"] == trained and set(trained) >= {"cpu", "torch", "cpu_capability"}
    assert metrics["machine"] == describe()
    for k in (1, 3, 5):
        ranks = [p["ranked"].index(p["target"]) + 1 for p in preds if p["target"] in p["ranked"][:k]]
        assert metrics[f"hr@{k}"] == pytest.approx(len(ranks) / 16)
        assert metrics[f"ndcg@{k}"] == pytest.approx(sum(1 / math.log2(r + 1) for r in ranks) / 16)
        assert 0 <= metrics[f"ndcg@{k}"] <= metrics[f"hr@{k}"] <= 1
    assert (out / "config.yaml").is_file()


def test_subsample_valid_split_and_method_name(base, tmp_path):
    out = tmp_path / "r"
    args = ["evaluate", "--data", str(base["data"]), "--index", str(base["index"]), "--model", str(base["base"])]
    assert (
        main([*args, "--out", str(out), "--method", "mine", *sets("evaluate.split=valid", "evaluate.max_rows=6"), "-q"])
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rows"] == 6 and metrics["split"] == "valid" and metrics["method"] == "mine"
    valid_users = {r["user_id"] for r in read_split(base["data"] / "valid.csv")}
    assert {p["user_id"] for p in read_jsonl(out / "predictions.jsonl")} <= valid_users


def test_evaluate_model_matches_the_cli(base, tmp_path):
    """The function the RL stage calls gives the CLI's ranking (same prompts, same trie)."""
    from rere.evaluate import evaluate_model
    from rere.model import load_model

    out = tmp_path / "r"
    assert evaluate(base, out, "evaluate.max_rows=4") == 0
    config = load_config(overrides=[s for s in sets("evaluate.max_rows=4") if s != "--set"])
    index = ItemIndex.load(base["index"])
    model, tok, meta = load_model(base["base"], index=index)
    from rere.metrics import select_rows

    rows = select_rows(read_split(base["data"] / "test.csv"), 4, config["seed"])
    ranked, scores, metrics = evaluate_model(
        model, tok, index, rows, config, style=meta["prompt_style"], progress=False
    )
    assert ranked == [p["ranked"] for p in read_jsonl(out / "predictions.jsonl")]
    assert metrics["invalid"] == 0 and metrics["rows"] == 4


@pytest.fixture
def no_decoding(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("decoding started before the request was checked")

    monkeypatch.setattr(rere.decoding, "beam_search", refuse)


def test_bad_requests_fail_before_decoding(base, tmp_path, no_decoding, capsys):
    from rere.evaluate import evaluate_model
    from rere.model import load_model

    index = ItemIndex.load(base["index"])
    model, tok, meta = load_model(base["base"], index=index)
    rows = read_split(base["data"] / "test.csv")
    config = load_config(overrides=["evaluate.num_beams=5", "evaluate.ks=[1,5]"])
    with pytest.raises(RereError, match="no rows"):
        evaluate_model(model, tok, index, [], config, style="compact")
    config["evaluate"]["ks"] = [1, 10]  # K > B (the config loader refuses it too)
    with pytest.raises(RereError, match=r"\[10\] larger than evaluate.num_beams=5"):
        evaluate_model(model, tok, index, rows, config, style="compact")
    config["evaluate"].update(ks=[1], num_beams=13)
    with pytest.raises(RereError, match="only 12 items"):
        evaluate_model(model, tok, index, rows, config, style="compact")
    config["evaluate"].update(num_beams=5)
    ghost = [rows[0], {**rows[1], "history_item_id": [*rows[1]["history_item_id"], 99]}]
    with pytest.raises(RereError, match=r"line \d+: item id\(s\) \[99\] are not in the index; the data and the index"):
        evaluate_model(model, tok, index, ghost, config, style="compact")

    # From the CLI: K > B, an empty split, a model built for another index.
    out = tmp_path / "r"
    assert evaluate(base, out, "evaluate.ks=[1,10]") == 2
    assert "larger than evaluate.num_beams" in capsys.readouterr().err
    empty = tmp_path / "data" / "tiny"
    empty.mkdir(parents=True)
    (empty / "test.csv").write_text((base["data"] / "test.csv").read_text().splitlines()[0] + "\n")
    (empty / "info.txt").write_text((base["data"] / "info.txt").read_text())  # the same catalogue
    assert evaluate({**base, "data": empty}, out) == 2
    assert "has no rows" in capsys.readouterr().err
    other = tmp_path / "other_index"  # the index of a 13-item catalogue
    assert (
        main(["index", "--data", str(write_tiny_data(tmp_path / "other", n_items=13)), "--out", str(other), "-q"]) == 0
    )
    assert evaluate({**base, "index": other, "data": tmp_path / "other"}, out) == 2  # data and index agree
    assert "does not match the index" in capsys.readouterr().err
    assert not out.exists()
