"""Pop by hand; SASRec/GRU4Rec learn a sequential pattern, tune on valid, are deterministic; CLI end to end."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from rere import RereError
from rere.baselines import (
    Dataset,
    GRU4Rec,
    HyperParams,
    SequentialConfig,
    fit_grid,
    history_tensor,
    load_dataset,
    load_sequential,
    pop_ranking,
    popularity,
    score_items,
    select_best,
    train_one,
)
from rere.cli import main
from rere.io import read_jsonl, write_catalogue, write_split
from rere.metrics import hr_ndcg, rank_of, select_rows

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_ITEMS = 30
SEQ_LEN = 8


def _row(user, seq, k):
    """D3 row: target seq[k] after the (at most 10) previous items."""
    hist = seq[max(0, k - 10) : k]
    return {
        "user_id": f"u{user}",
        "item_asins": [f"a{i}" for i in hist],
        "item_asin": f"a{seq[k]}",
        "history_item_id": hist,
        "item_id": seq[k],
        "history_item_title": [f"Item {i}" for i in hist],
        "item_title": f"Item {seq[k]}",
        "history_rating": [5.0] * len(hist),
        "rating": 5.0,
        "history_timestamp": [1000 * user + j for j in range(max(0, k - 10), k)],
        "timestamp": 1000 * user + k,
    }


def make_successor_data(folder: Path, users: int = 40, valid_shift: int = 1) -> Path:
    """Item i is always followed by i+1 (mod 30): user u sees 7u, 7u+1, ... (8 items).

    Leave-one-out: the last position is test, the one before valid, the rest train. With
    valid_shift=-1 the valid targets are the *predecessor* instead (a split that disagrees
    with train and test, to check that model choice follows valid).
    """
    splits = {"train": [], "valid": [], "test": []}
    for u in range(users):
        seq = [(7 * u + j) % NUM_ITEMS for j in range(SEQ_LEN)]
        for k in range(1, SEQ_LEN):
            name = "test" if k == SEQ_LEN - 1 else "valid" if k == SEQ_LEN - 2 else "train"
            row = _row(u, seq, k)
            if name == "valid" and valid_shift != 1:
                row["item_id"] = (seq[k - 1] + valid_shift) % NUM_ITEMS
            splits[name].append(row)
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        write_split(folder / f"{name}.csv", rows)
    write_catalogue(folder / "info.txt", {i: f"Item {i}" for i in range(NUM_ITEMS)})
    (folder / "stats.json").write_text(json.dumps({"max_history": 10}))
    return folder


FAST = dict(
    hidden_size=32, num_layers=1, num_heads=2, dropout=0.1, learning_rate=1e-2, batch_size=32, epochs=12, patience=2
)


@pytest.fixture(scope="module")
def succ(tmp_path_factory):
    folder = make_successor_data(tmp_path_factory.mktemp("succ") / "succ")
    return load_dataset(folder, ("train", "valid", "test"))


def _test_hr1(model, data):
    rows = data.splits["test"]
    logits = model(history_tensor([r["history_item_id"] for r in rows], data.max_len))  # (R, N)
    top = logits.argmax(1).tolist()
    return sum(t == r["item_id"] for t, r in zip(top, rows, strict=True)) / len(rows)


# ----------------------------------------------------------------------------- pop


def test_subsample_is_drawn_with_the_seed_the_data_was_built_with(tmp_path, monkeypatch):
    """With `seeds`, each seed's job runs with `--set seed=S` on data built once with `seed`:
    evaluate.max_rows must pick the same rows for every S, the data's (its config.yaml)."""
    data = make_successor_data(tmp_path / "data" / "succ")
    monkeypatch.chdir(tmp_path)
    all_test = load_dataset(data, ("test",)).splits["test"]

    def users(seed: int) -> list:
        out = tmp_path / "results" / f"seed-{seed}"
        sets = ["tracking.mlflow=false", "evaluate.max_rows=10", f"seed={seed}"]
        argv = ["baseline", "--method", "pop", "--data", str(data), "--out", str(out), "-q"]
        assert main(argv + [x for s in sets for x in ("--set", s)]) == 0
        return [p["user_id"] for p in read_jsonl(out / "predictions.jsonl")]

    def picked(seed: int) -> list:
        return [r["user_id"] for r in select_rows(all_test, 10, seed)]

    assert not (data / "config.yaml").exists()  # no record of the data's seed: the job's own
    assert users(7) == picked(7) and users(8) == picked(8) != picked(7)
    (data / "config.yaml").write_text(yaml.safe_dump({"seed": 42}))  # as `rere data` saves it
    assert users(7) == users(8) == picked(42)


def test_popularity_counts_distinct_train_interactions_by_hand():
    rows = [
        # user a interacts with 0, 1, 2, 3; the history items repeat across rows but count once
        {"user_id": "a", "history_item_id": [0, 1], "history_timestamp": [1, 2], "item_id": 2, "timestamp": 3},
        {"user_id": "a", "history_item_id": [0, 1, 2], "history_timestamp": [1, 2, 3], "item_id": 3, "timestamp": 4},
        # user b interacts with 2 then 1
        {"user_id": "b", "history_item_id": [2], "history_timestamp": [5], "item_id": 1, "timestamp": 6},
    ]
    counts = popularity(rows, num_items=5)
    assert counts == [1, 2, 2, 1, 0]
    ids, scores = pop_ranking(counts, k=5)
    assert ids == [1, 2, 0, 3, 4]  # ties by smaller id; unseen item 4 last
    assert scores == [2.0, 2.0, 1.0, 1.0, 0.0]
    assert pop_ranking(counts, k=2) == ([1, 2], [2.0, 2.0])


def test_pop_cli_same_list_for_everyone_history_not_excluded(tmp_path, monkeypatch):
    data = make_successor_data(tmp_path / "data" / "succ")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "results" / "pop"
    assert (
        main(
            [
                "baseline",
                "--method",
                "pop",
                "--data",
                str(data),
                "--out",
                str(out),
                "--set",
                "tracking.mlflow=false",
                "-q",
            ]
        )
        == 0
    )
    preds = read_jsonl(out / "predictions.jsonl")
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(preds) == 40 and metrics["rows"] == 40 and metrics["method"] == "pop" and metrics["split"] == "test"
    assert all(p["ranked"] == preds[0]["ranked"] and len(p["ranked"]) == 20 for p in preds)
    loaded = load_dataset(data, ("train",))
    assert preds[0]["ranked"] == pop_ranking(popularity(loaded.splits["train"], NUM_ITEMS), 20)[0]
    # history items are not removed: some row's ranked list contains its own history
    assert any(set(p["history"]) & set(p["ranked"]) for p in preds)
    expected = hr_ndcg([rank_of(p["ranked"], p["target"]) for p in preds], [1, 3, 5, 10, 20])
    assert {k: metrics[k] for k in expected} == pytest.approx(expected)
    assert (out / "config.yaml").is_file() and not (out / "model.pt").exists()


# ----------------------------------------------------------------------------- models


def test_history_tensor_left_pads_and_shifts_ids():
    t = history_tensor([[4, 5], [0, 1, 2, 3]], max_len=3)
    assert t.tolist() == [[0, 5, 6], [2, 3, 4]]  # ids + 1, 0 = padding, most recent last


def test_gru_on_left_padded_input_equals_the_unpadded_sequence():
    torch.manual_seed(0)
    model = GRU4Rec(num_items=10, max_len=6, hidden_size=8, num_layers=2, dropout=0.0).eval()
    padded = model.encode(history_tensor([[3, 1, 4], [2]], 6))  # (2, 8)
    alone = model.encode(history_tensor([[3, 1, 4]], 3))  # no padding at all
    assert torch.allclose(padded[0], alone[0], atol=1e-6)
    assert torch.allclose(padded[1], model.encode(history_tensor([[2]], 1))[0], atol=1e-6)


def test_sasrec_uses_the_whole_history_and_survives_one_item_histories(succ):
    hp = HyperParams(**FAST)
    from rere.baselines import build_model

    torch.manual_seed(0)
    model = build_model("sasrec", NUM_ITEMS, 10, hp).eval()
    out = model(history_tensor([[5], [1, 2, 5], [9, 2, 5]], 10))  # (3, N)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out[1], out[2])  # an earlier item changes the prediction


def test_sasrec_learns_the_successor_pattern_and_beats_pop(succ):
    model, best = train_one("sasrec", succ, HyperParams(**FAST), seed=0)
    assert best["valid_ndcg@10"] > 0.8
    assert _test_hr1(model, succ) >= 0.9
    top, _ = pop_ranking(popularity(succ.splits["train"], NUM_ITEMS), 1)
    pop_hr1 = sum(r["item_id"] == top[0] for r in succ.splits["test"]) / len(succ.splits["test"])
    assert pop_hr1 < 0.1


def test_gru4rec_learns_the_successor_pattern(succ):
    model, _ = train_one("gru4rec", succ, HyperParams(**FAST), seed=0)
    assert _test_hr1(model, succ) >= 0.9


def test_training_is_deterministic(succ):
    hp = HyperParams(**{**FAST, "epochs": 3, "patience": 3})
    a, best_a = train_one("sasrec", succ, hp, seed=7)
    b, best_b = train_one("sasrec", succ, hp, seed=7)
    assert best_a == best_b
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_select_best_takes_the_first_maximum():
    assert select_best([{"valid_ndcg@10": 0.2}, {"valid_ndcg@10": 0.5}, {"valid_ndcg@10": 0.5}]) == 1
    assert select_best([{"valid_ndcg@10": 0.0}]) == 0


def test_grid_is_the_product_of_list_values_and_checks_heads():
    cfg = SequentialConfig(**{**FAST, "dropout": [0.1, 0.3], "learning_rate": [1e-3, 1e-2, 1e-1]})
    assert len(cfg.grid) == 6
    assert [(hp.dropout, hp.learning_rate) for hp in cfg.grid[:3]] == [(0.1, 1e-3), (0.1, 1e-2), (0.1, 1e-1)]
    with pytest.raises(RereError, match="num_heads"):
        SequentialConfig(**{**FAST, "hidden_size": [32, 33]})
    with pytest.raises(RereError, match="empty list"):
        SequentialConfig(**{**FAST, "dropout": []})


def test_grid_choice_uses_train_and_valid_only(tmp_path):
    """lr 1e-2 learns the successor rule, a barely-moving lr does not: valid NDCG@10 picks the
    learner. The test split is not even given to fit_grid, so it cannot play a part."""
    cfg = SequentialConfig(**{**FAST, "epochs": 6, "learning_rate": [1e-9, 1e-2]})
    full = load_dataset(make_successor_data(tmp_path / "a"), ("train", "valid", "test"))
    no_test = Dataset({k: full.splits[k] for k in ("train", "valid")}, full.num_items, full.max_len)
    model, hp, results = fit_grid("sasrec", no_test, cfg, seed=0)
    assert [r["hyperparameters"]["learning_rate"] for r in results] == [1e-9, 1e-2]
    assert results[1]["valid_ndcg@10"] > results[0]["valid_ndcg@10"] + 0.3
    assert hp.learning_rate == 1e-2
    assert _test_hr1(model, full) >= 0.9


# ----------------------------------------------------------------------------- CLI + saved model


def test_sasrec_cli_end_to_end_with_mlflow(tmp_path, monkeypatch):
    data = make_successor_data(tmp_path / "data" / "succ")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "results" / "succ" / "sasrec"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sets = [f"baselines.sasrec.{k}={v}" for k, v in FAST.items()] + [
        "baselines.sasrec.dropout=[0.0, 0.1]",
        "baselines.sasrec.epochs=6",
        "evaluate.max_rows=25",
        f"tracking.tracking_uri={uri}",
    ]
    argv = ["baseline", "--method", "sasrec", "--data", str(data), "--out", str(out), "-q"]
    assert main(argv + [x for s in sets for x in ("--set", s)]) == 0

    assert sorted(p.name for p in out.iterdir()) == [
        "config.yaml",
        "metrics.json",
        "model.pt",
        "predictions.jsonl",
        "sasrec.json",
    ]
    metrics = json.loads((out / "metrics.json").read_text())
    preds = read_jsonl(out / "predictions.jsonl")
    # the evaluate.max_rows subsample is the one the LLM evaluation draws
    all_test = load_dataset(data, ("test",)).splits["test"]
    picked = select_rows(all_test, 25, seed=42)
    assert [p["user_id"] for p in preds] == [r["user_id"] for r in picked] and metrics["rows"] == 25
    expected = hr_ndcg([rank_of(p["ranked"], p["target"]) for p in preds], [1, 3, 5, 10, 20])
    assert {k: metrics[k] for k in expected} == pytest.approx(expected)
    assert metrics["hr@1"] >= 0.9
    meta = json.loads((out / "sasrec.json").read_text())
    assert meta["num_items"] == NUM_ITEMS and meta["max_len"] == 10 and len(meta["grid"]) == 2
    assert meta["chosen"] == select_best(meta["grid"])
    assert meta["best_valid_ndcg@10"] == meta["grid"][meta["chosen"]]["valid_ndcg@10"]

    # the saved model reloads and scores like the trained one
    model = load_sequential(out)
    hist = [p["history"] for p in preds[:5]]
    top = [p["ranked"][0] for p in preds[:5]]
    scores = score_items(model, hist, top)
    assert scores.shape == (5,)
    assert scores.tolist() == pytest.approx([p["scores"][0] for p in preds[:5]], abs=1e-4)
    successor = score_items(model, [[3, 4]] * 2, [5, 20])
    assert successor[0] > successor[1]

    client = MlflowClient(uri)
    (logged,) = client.search_runs([client.get_experiment_by_name("rere").experiment_id])
    assert logged.info.run_name == "succ/sasrec/baseline" and logged.info.status == "FINISHED"
    assert logged.data.metrics["hr_at_1"] == pytest.approx(metrics["hr@1"])
    assert logged.data.params["baselines.sasrec.dropout"] == "[0.0, 0.1]"
    history = client.get_metric_history(logged.info.run_id, "grid1/valid_ndcg_at_10")
    assert [m.step for m in sorted(history, key=lambda m: m.step)][:2] == [1, 2]
    assert sorted(a.path for a in client.list_artifacts(logged.info.run_id)) == ["metrics.json", "sasrec.json"]


def test_bad_inputs_are_clear_errors(tmp_path, capsys):
    data = make_successor_data(tmp_path / "d")
    out = str(tmp_path / "o")
    base = ["baseline", "--method", "pop", "--data", str(data), "--out", out, "--set", "tracking.mlflow=false"]
    assert main(base + ["--set", "evaluate.ks=[1, 40]", "--set", "evaluate.num_beams=40"]) == 2
    assert "only 30 items" in capsys.readouterr().err
    assert main(["baseline", "--method", "pop", "--data", str(tmp_path / "nope"), "--out", out]) == 2
    assert "is not a folder" in capsys.readouterr().err
    # an item id that is not in the catalogue names the file and line
    rows = load_dataset(data, ("valid",)).splits["valid"]
    rows[1]["item_id"] = 99
    write_split(data / "valid.csv", rows)
    assert main(base) == 2
    assert "valid.csv: line 3: item id(s) [99] are not in info.txt" in capsys.readouterr().err
    # an empty split is refused before training
    write_split(data / "valid.csv", [])
    assert main(base) == 2
    assert "valid.csv has no rows" in capsys.readouterr().err
    with pytest.raises(RereError, match="no model.pt"):
        load_sequential(tmp_path)
    assert not Path(out).exists()


def test_score_items_rejects_unknown_items(succ):
    model = GRU4Rec(num_items=NUM_ITEMS, max_len=10, hidden_size=8, num_layers=1, dropout=0.0)
    with pytest.raises(ValueError, match="outside"):
        score_items(model, [[1, 2]], [NUM_ITEMS])
    with pytest.raises(ValueError, match="histories"):
        score_items(model, [[1, 2]], [1, 2])


def test_dataset_without_stats_uses_the_longest_history(tmp_path):
    folder = make_successor_data(tmp_path / "x")
    (folder / "stats.json").unlink()
    assert load_dataset(folder, ("train", "valid", "test")).max_len == SEQ_LEN - 1


def test_dataset_class_is_the_public_container(succ):
    assert isinstance(succ, Dataset) and succ.num_items == NUM_ITEMS and succ.max_len == 10
