"""HR/NDCG against hand-computed values, the subsample rule, and the shared result files."""

import doctest
import json

import pytest

import rere.metrics
from rere.metrics import hr_ndcg, rank_of, repeat_share, select_rows, write_results


def test_doctests_pass():
    failures, tried = doctest.testmod(rere.metrics)
    assert tried > 0 and failures == 0


def test_rank_of_is_one_based_first_occurrence():
    assert rank_of([4, 8, 15, 16], 4) == 1
    assert rank_of([4, 8, 15, 16], 16) == 4
    assert rank_of([4, 8, 8], 8) == 2
    assert rank_of([4, 8, 15], 23) is None
    assert rank_of([], 1) is None


def test_hr_ndcg_by_hand_several_ranks_misses_and_cutoffs():
    # five rows: hits at ranks 1, 2, 5, 20 and one miss
    m = hr_ndcg([1, 2, 5, None, 20], ks=[1, 3, 5, 10, 20])
    # 1/log2(2) = 1, 1/log2(3) = 0.6309297536, 1/log2(6) = 0.3868528072, 1/log2(21) = 0.2276702487
    assert m["hr@1"] == pytest.approx(1 / 5)
    assert m["ndcg@1"] == pytest.approx(1 / 5)
    assert m["hr@3"] == pytest.approx(2 / 5)
    assert m["ndcg@3"] == pytest.approx(0.3261859507)
    assert m["hr@5"] == pytest.approx(3 / 5)
    assert m["ndcg@5"] == pytest.approx(0.4035565122)
    assert m["hr@10"] == pytest.approx(3 / 5)  # nothing between ranks 6 and 10
    assert m["ndcg@10"] == pytest.approx(0.4035565122)
    assert m["hr@20"] == pytest.approx(4 / 5)
    assert m["ndcg@20"] == pytest.approx(0.4490905619)
    assert sorted(m) == sorted(f"{name}@{k}" for name in ("hr", "ndcg") for k in (1, 3, 5, 10, 20))


def test_misses_count_zero_in_the_mean():
    assert hr_ndcg([None, None, None, 1], ks=[1]) == {"hr@1": 0.25, "ndcg@1": 0.25}
    assert hr_ndcg([2], ks=[1]) == {"hr@1": 0.0, "ndcg@1": 0.0}
    assert hr_ndcg([3], ks=[3])["ndcg@3"] == pytest.approx(0.5)  # 1/log2(4)


def test_hr_ndcg_rejects_nonsense():
    with pytest.raises(ValueError, match="empty"):
        hr_ndcg([], ks=[1])
    with pytest.raises(ValueError, match="positive"):
        hr_ndcg([1], ks=[0])
    with pytest.raises(ValueError, match="1-based"):
        hr_ndcg([0], ks=[1])


def test_select_rows_is_deterministic_ordered_and_seeded():
    rows = list(range(100))
    a = select_rows(rows, 10, seed=42)
    assert a == select_rows(rows, 10, seed=42)
    assert a == sorted(a) and len(set(a)) == 10
    assert a != select_rows(rows, 10, seed=43)
    assert select_rows(rows, None, seed=1) == rows
    assert select_rows(rows, 1000, seed=1) == rows
    with pytest.raises(ValueError):
        select_rows(rows, 0, seed=1)


def test_write_results_files_match_the_design(tmp_path):
    rows = [
        {"user_id": "u1", "history_item_id": [1, 2], "item_id": 3},
        {"user_id": "u2", "history_item_id": [5], "item_id": 9},
    ]
    ranked = [[7, 3, 1], [0, 1, 2]]
    scores = [[0.9, 0.5, 0.1], [3.0, 2.0, 1.0]]
    m = write_results(tmp_path / "out", rows, ranked, scores, ks=[1, 2], extra={"method": "x", "invalid": 0})
    assert m["hr@1"] == 0.0 and m["hr@2"] == 0.5
    assert m["ndcg@2"] == pytest.approx(0.5 * (1 / 1.584962500721156))  # one hit at rank 2 of 2 rows
    # history items in the list: row 1 has item 1 at rank 3, row 2 nothing of [5]
    assert m["repeat@1"] == 0.0 and m["repeat@2"] == 0.0
    on_disk = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert on_disk == m and on_disk["rows"] == 2 and on_disk["method"] == "x"
    lines = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert lines[0] == {
        "row": 0,
        "user_id": "u1",
        "history": [1, 2],
        "target": 3,
        "ranked": [7, 3, 1],
        "scores": [0.9, 0.5, 0.1],
    }
    assert lines[1]["row"] == 1 and lines[1]["target"] == 9
    # no temporary leftovers next to the outputs
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["metrics.json", "predictions.jsonl"]


def test_write_results_refuses_mismatched_lengths(tmp_path):
    with pytest.raises(ValueError, match="differ in length"):
        write_results(tmp_path, [{"user_id": 1, "history_item_id": [1], "item_id": 1}], [], [], ks=[1])
    with pytest.raises(ValueError, match="scores"):
        write_results(tmp_path, [{"user_id": 1, "history_item_id": [1], "item_id": 1}], [[1, 2]], [[0.1]], ks=[1])
    assert not (tmp_path / "metrics.json").exists()


def test_repeat_share_counts_history_items_in_the_first_k():
    ranked = [[3, 1, 2], [5, 6], [7, 8, 9]]
    histories = [[1, 2], [5], []]
    m = repeat_share(ranked, histories, ks=[1, 3])
    # K=1: row 1's first item 5 is in its history: 1/3. K=3: (2/3 + 1/3 + 0) / 3 = 1/3 as well,
    # row 2's list of 2 counts its missing third slot as not repeated.
    assert m == {"repeat@1": pytest.approx(1 / 3), "repeat@3": pytest.approx(1 / 3)}
    assert repeat_share([[1, 2]], [[2]], ks=[1, 2]) == {"repeat@1": 0.0, "repeat@2": 0.5}
    with pytest.raises(ValueError, match="histories"):
        repeat_share([[1]], [], ks=[1])
