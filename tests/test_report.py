"""`rere report`: table with CIs, paired comparisons, RL signal, figures and notes from a hand-made run folder."""

import csv
import doctest
import json
import math
from pathlib import Path

import pytest
import yaml

import rere.report
from rere import RereError
from rere.cli import main
from rere.config import load_config
from rere.io import write_split
from rere.metrics import write_results
from rere.report import build, curve, read_benchmarks, rl_signal

TINY = Path(__file__).parent / "config" / "tiny.yaml"

# tiny.yaml: dataset tiny, ks [1, 5], num_beams 5, variants rere + grpo, baselines pop + sasrec.
# 30 evaluated rows (user i, history [i], target 100 + i); each method's 1-based rank of the
# target per row (0: not in its 5 items), from which write_results computes metrics.json:
RANKS = {
    "sft": [2] * 15 + [0] * 15,  # HR@1 0, HR@5 0.5, NDCG@5 0.5 / log2(3) = 0.3155
    "rere": [1] * 15 + [2] * 15,  # at least as good as SFT on every row: HR@1 0.5, HR@5 1
    # grpo not run: a note, not a crash
    "pop": [2] * 15 + [0] * 15,  # the same ranks as SFT on every row
    "sasrec": [3] * 20 + [0] * 10,  # HR@5 2/3, NDCG@5 (20/30) * 0.5 = 0.3333: the best baseline
}
EXTRA = {
    "sft": {"invalid": 3, "num_beams": 5, "throughput": 12.5},
    "rere": {"invalid": 0, "num_beams": 5, "throughput": 11.0},
    "pop": {"invalid": 0, "throughput": 900.0},
    "sasrec": {"invalid": 0, "throughput": 300.0},
}
ROWS = [{"user_id": i, "history_item_id": [i], "item_id": 100 + i} for i in range(30)]


def ranked(target: int, rank: int) -> list[int]:
    items = [900 + j for j in range(5)]
    if rank:
        items[rank - 1] = target
    return items


def write_method(root: Path, method: str, ranks: list[int], rows=ROWS, seed=None, **extra) -> Path:
    folder = root / "results" / "tiny" / ("" if seed is None else f"seed-{seed}") / method
    lists = [ranked(r["item_id"], k) for r, k in zip(rows, ranks, strict=True)]
    write_results(folder, rows, lists, [[0.0] * 5] * len(rows), [1, 5], {**EXTRA.get(method, {}), **extra})
    return folder


def make_run(root: Path, with_rl_log=True, with_bench=True) -> None:
    for method, ranks in RANKS.items():
        write_method(root, method, ranks)
    if with_rl_log:
        folder = root / "models" / "tiny" / "rere"
        folder.mkdir(parents=True)
        lines = [
            {"step": 2, "rewards/rule/mean": 0.5, "rewards/ranking/mean": -0.1, "kl": 0.02, "loss": 0.1,
             "frac_reward_zero_std": 0.5, "rollout/decoded_prompts": 4},
            {"step": 1, "rewards/rule/mean": 0.25, "rewards/ranking/mean": -0.2, "kl": 0.01, "loss": 0.2,
             "frac_reward_zero_std": 1.0, "rollout/decoded_prompts": 2},
            {"train_runtime": 3.0},  # end-of-training summary: no step, ignored
        ]  # fmt: skip
        (folder / "trainer_log.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
        # rollouts.jsonl: one line per trained group, its step taken before the optimizer step
        groups = [{"step": s, "row": r, "advantages": [0.0] * 4} for s in (0, 1) for r in (0, 1)]
        (folder / "rollouts.jsonl").write_text("".join(json.dumps(g) + "\n" for g in groups))
    if with_bench:
        bench = root / "benchmarks"
        (bench / "sft").mkdir(parents=True)
        header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
        (bench / "sft" / "tiny.tsv").write_text(header + "12.5\t0:00:12\t812.3\t1\t1\t1\t0\t0\t90\t20\n")
        (bench / "report.tsv").write_text(header + "2.0\t0:00:02\t-\t-\t-\t-\t-\t-\t-\t-\n")


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_table_comparisons_figures_and_notes(tmp_path):
    make_run(tmp_path)
    config = load_config([TINY])
    out = tmp_path / "results"
    found = build(config, out, tmp_path / "models", tmp_path / "benchmarks", out)

    table = read_csv(out / "table.csv")
    assert [r["method"] for r in table] == ["sft", "rere", "pop", "sasrec"]  # config order, grpo missing
    assert list(table[0]) == [
        "dataset", "method", "kind",
        "hr@1", "hr@1_lo", "hr@1_hi", "hr@5", "hr@5_lo", "hr@5_hi",
        "ndcg@1", "ndcg@1_lo", "ndcg@1_hi", "ndcg@5", "ndcg@5_lo", "ndcg@5_hi",
        "invalid_rate", "repeat", "throughput", "rows",
    ]  # fmt: skip
    sft, rere, _, sasrec = table
    assert sft["kind"] == "sft" and rere["kind"] == "rl" and table[2]["kind"] == "baseline"
    assert float(sft["invalid_rate"]) == pytest.approx(3 / (30 * 5))  # 3 bad beams of 150
    assert float(sft["ndcg@5"]) == pytest.approx(0.5 / math.log2(3))
    assert float(sasrec["ndcg@5"]) == pytest.approx(1 / 3) and sasrec["rows"] == "30"
    assert sft["repeat"] == "0.000000"  # items 900.. never meet the histories [i]
    # SFT's HR@5 is 15 hits of 30: the interval is around 0.5; its HR@1 is 0 on every row.
    assert float(sft["hr@5_lo"]) < 0.5 < float(sft["hr@5_hi"])
    assert 0.25 < float(sft["hr@5_lo"]) and float(sft["hr@5_hi"]) < 0.75
    assert sft["hr@1_lo"] == sft["hr@1_hi"] == "0.000000"
    assert rere["hr@5_lo"] == rere["hr@5_hi"] == "1.000000"  # a hit on every row

    # best baseline: sasrec (NDCG@5 0.333 > pop's 0.315), chosen on the test split.
    assert found["best_baseline"] == {"tiny": ("sasrec", "best by NDCG@5 on the evaluated split")}
    by = {(c["method"], c["reference"], c["metric"]): c for c in found["comparisons"]}
    # every non-SFT method against SFT, every method but sasrec against sasrec; 4 metrics each
    assert len(found["comparisons"]) == 4 * (3 + 3)
    assert ("sasrec", "sasrec", "ndcg@5") not in by and ("sft", "sft", "ndcg@5") not in by
    c = by[("rere", "sft", "hr@5")]  # rere hits where sft misses on rows 15-29, ties elsewhere
    assert c["diff"] == pytest.approx(0.5) and 0 < c["lo"] < 0.5 < c["hi"] <= 1
    assert c["p"] == pytest.approx(1 / 2001) and c["verdict"] == "higher"
    assert c["relative"] == pytest.approx(1.0)
    # d = 0 on 15 rows, 1 on 15: sd (ddof 1) 0.5 * sqrt(30 / 29), mde = (z_.975 + z_.8) * sd / sqrt(30)
    assert c["mde"] == pytest.approx((1.959964 + 0.841621) * 0.5 / math.sqrt(29), abs=1e-6)
    same = by[("pop", "sft", "ndcg@5")]  # identical ranks on every row
    assert (same["diff"], same["lo"], same["hi"], same["p"], same["verdict"]) == (0, 0, 0, 1.0, "no difference")
    assert same["mde"] is None  # no spread to estimate it from
    # SFT vs sasrec on NDCG@5: +0.131 on 15 rows, -0.5 on 5 rows, 0 on 10: mean -0.018, CI around 0
    c = by[("sft", "sasrec", "ndcg@5")]
    assert c["diff"] == pytest.approx((15 * (1 / math.log2(3) - 0.5) - 5 * 0.5) / 30)
    assert c["lo"] < 0 < c["hi"] and c["verdict"] == "no difference"
    csv_rows = read_csv(out / "comparisons.csv")
    assert len(csv_rows) == len(found["comparisons"])
    row = next(r for r in csv_rows if (r["method"], r["reference"], r["metric"]) == ("rere", "sft", "hr@5"))
    assert float(row["mde"]) == pytest.approx(by[("rere", "sft", "hr@5")]["mde"], abs=1e-6)

    md = (out / "report.md").read_text()
    assert "| tiny | rere | sft | HR@5 | 1.0000 | 0.5000 | +0.5000 [" in md and "| +100.0% |" in md
    assert "higher *" in md and "no difference" in md and "Marked *: significant at 5%" in md
    assert "| verdict | detectable |" in md and "| higher * | ±0.2601 |" in md  # 2.801585 * 0.5 / sqrt(29)
    assert "tiny: rere - sft on NDCG@5 = +0.5000 [" in md  # the headline sentence
    assert "no difference (a true difference of 0." in md and "either way would be found 4 times in 5" in md
    assert "best baseline is sasrec (best by NDCG@5 on the evaluated split)" in md
    assert "| sft | 0.0000 [0.0000, 0.0000] | 0.5000 [0." in md  # values with their CI
    assert "tiny/grpo: no" in md  # missing evaluation noted
    assert "no RL curve" in md  # grpo has no trainer log
    # RL signal: step 1 none of 2 groups, step 2 one of 2 (frac 0.5): 1 group with signal of 4
    assert "| tiny | rere | 2 | 4 | 1 | 0.250 | 6 | counted per step in rollouts.jsonl |" in md
    assert "Warning" not in md  # tiny's data folder has no stats.json and tiny.yaml has no use_valid
    for name in ("ndcg_tiny.png", "rl_tiny.png", "signal_tiny.png", "stages.png"):
        png = out / "figures" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"figures/{name}" in md
    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "+100.0%" in page
    assert '<img src="figures/rl_tiny.png"' in page
    assert "| sft/tiny | 12.5 | 812 |" in md  # per-stage time and memory from the TSV
    assert "| report | 2.0 | n/a |" in md


def test_rl_variants_are_compared_with_each_other(tmp_path):
    make_run(tmp_path)
    write_method(tmp_path, "grpo", [1] * 15 + [0] * 15)  # rere hits every row, grpo half of them
    out = tmp_path / "results"
    found = build(load_config([TINY]), out, tmp_path / "models", tmp_path / "benchmarks", out)
    # 4 metrics x (4 methods vs sft + 4 vs sasrec + grpo vs rere, the variant before it)
    assert len(found["comparisons"]) == 4 * (4 + 4 + 1)
    by = {(c["method"], c["reference"], c["metric"]): c for c in found["comparisons"]}
    assert ("rere", "grpo", "hr@5") not in by  # each pair once, against the earlier variant
    c = by[("grpo", "rere", "hr@5")]
    assert c["role"] == "variant" and c["diff"] == pytest.approx(-0.5)  # 15 misses of 30, no gains
    assert c["lo"] < c["hi"] < 0 and c["verdict"] == "lower"
    assert by[("grpo", "rere", "hr@1")]["diff"] == pytest.approx(0.0)  # both hit rows 0-14 at rank 1
    md = (out / "report.md").read_text()
    assert "tiny: grpo - rere on NDCG@5 = -" in md
    assert "| tiny | grpo | rere | HR@5 | 0.5000 | 1.0000 | -0.5000 [" in md  # not marked as a baseline


def test_best_baseline_is_chosen_on_validation_when_recorded(tmp_path):
    make_run(tmp_path, with_rl_log=False, with_bench=False)
    write_method(tmp_path, "pop", RANKS["pop"], **{"valid_ndcg@5": 0.2})
    write_method(tmp_path, "sasrec", RANKS["sasrec"], **{"best_valid_ndcg@5": 0.1})
    found = build(load_config([TINY]), tmp_path / "results", tmp_path / "m", tmp_path / "b", tmp_path / "out")
    assert found["best_baseline"]["tiny"] == ("pop", "best by validation NDCG@5")  # not sasrec, the test winner
    assert "picked on the validation split" in (tmp_path / "out" / "report.md").read_text()


def test_without_predictions_there_is_no_ci_but_still_a_difference(tmp_path):
    make_run(tmp_path, with_rl_log=False, with_bench=False)
    (tmp_path / "results" / "tiny" / "sasrec" / "predictions.jsonl").unlink()
    found = build(load_config([TINY]), tmp_path / "results", tmp_path / "m", tmp_path / "b", tmp_path / "out")
    sasrec = read_csv(tmp_path / "out" / "table.csv")[3]
    assert sasrec["method"] == "sasrec" and sasrec["ndcg@5_lo"] == "" and sasrec["ndcg@5"] != ""
    c = next(
        c for c in found["comparisons"] if (c["method"], c["reference"], c["metric"]) == ("sft", "sasrec", "ndcg@5")
    )
    assert c["diff"] == pytest.approx(0.5 / math.log2(3) - 1 / 3) and c["lo"] is None and c["verdict"] is None
    md = (tmp_path / "out" / "report.md").read_text()
    assert "tiny/sasrec: no predictions.jsonl" in md and "n/a (no predictions)" in md


def test_rows_that_differ_between_methods_are_an_error(tmp_path):
    make_run(tmp_path, with_rl_log=False, with_bench=False)
    write_method(tmp_path, "pop", RANKS["pop"][::-1], rows=ROWS[::-1])  # the same rows, another order
    with pytest.raises(RereError, match="tiny/sft and tiny/pop were not evaluated on the same rows: row 0"):
        build(load_config([TINY]), tmp_path / "results", tmp_path / "m", tmp_path / "b", tmp_path / "out")


def test_predictions_that_disagree_with_metrics_are_an_error(tmp_path):
    make_run(tmp_path, with_rl_log=False, with_bench=False)
    path = tmp_path / "results" / "tiny" / "rere" / "metrics.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "hr@5": 0.9}))
    with pytest.raises(RereError, match=r"rows give hr@5 = 1.000000 but metrics.json says 0.900000"):
        build(load_config([TINY]), tmp_path / "results", tmp_path / "m", tmp_path / "b", tmp_path / "out")


def test_header_says_when_train_was_copied_from_valid(tmp_path):
    make_run(tmp_path, with_rl_log=False, with_bench=False)
    stats_json = tmp_path / "data" / "tiny" / "stats.json"
    stats_json.parent.mkdir(parents=True)
    stats_json.write_text(json.dumps({"train_from": "valid", "source": "d3"}))
    config = load_config([TINY])
    build(config, tmp_path / "results", tmp_path / "m", tmp_path / "b", tmp_path / "out")  # data: results/../data
    md = (tmp_path / "out" / "report.md").read_text()
    header = md[: md.index("## Results")]
    assert "Warning (tiny): train.csv is a copy of valid.csv (missing_train: use_valid" in header
    assert "early stopping" in header and "grid search ran on data the model trained on" in header
    stats_json.write_text(json.dumps({"train_from": "train"}))
    build(config, tmp_path / "results", tmp_path / "m", tmp_path / "b", tmp_path / "out")
    assert "Warning" not in (tmp_path / "out" / "report.md").read_text()
    # no stats.json, but the config allows use_valid: the header says it cannot tell
    stats_json.unlink()
    config = load_config([TINY], ["datasets.tiny.missing_train=use_valid"])
    build(config, tmp_path / "results", tmp_path / "m", tmp_path / "b", tmp_path / "out")
    assert "Warning (tiny): the config allows missing_train: use_valid" in (tmp_path / "out" / "report.md").read_text()


def test_header_says_how_same_time_events_were_ordered(tmp_path):
    make_run(tmp_path, with_rl_log=False, with_bench=False)
    stats_json = tmp_path / "data" / "tiny" / "stats.json"
    stats_json.parent.mkdir(parents=True)
    config = load_config([TINY])

    def header(stats):
        stats_json.write_text(json.dumps(stats))
        build(config, tmp_path / "results", tmp_path / "m", tmp_path / "b", tmp_path / "out")
        md = (tmp_path / "out" / "report.md").read_text()
        return md[: md.index("## Results")]

    text = header({"ties": "item_id", "same_time_pairs": 0.5104})
    assert (
        "Warning (tiny): 51% of a user's consecutive events share their timestamp and are ordered by raw item id"
        in text
    )
    assert "rebuild the data with ties: shuffle" in text
    text = header({"ties": "shuffle", "same_time_pairs": 0.5104})
    assert "Warning" not in text
    assert "Note (tiny): 51% of a user's consecutive events share their timestamp; they are in a seeded order" in text
    assert "in the source file's order (ties: file)" in header({"ties": "file", "same_time_pairs": 0.02})
    assert "Note (tiny)" not in header({"ties": "item_id", "same_time_pairs": 0.0})  # no ties, nothing to say
    assert "Warning" not in header({"ties": "item_id", "same_time_pairs": 0.0})

    # Measured order (stats.json's same_time_order): a D3 import (no `ties`) whose same-time
    # pairs are 80% in raw id order, like the published Amazon splits.
    text = header(
        {"same_time_pairs": 0.55, "same_time_order": {"share": 0.55, "pairs": 5505, "later_id_larger": 0.809}}
    )
    assert (
        "Warning (tiny): 55% of a user's consecutive events share their timestamp, and in 81% of those 5,505 "
        "pairs the later item has the larger raw item id (as the imported rows have them" in text
    )
    assert "read this dataset's figures with that in mind" in text and "Note (tiny)" not in text
    text = header({"ties": "file", "same_time_pairs": 0.55, "same_time_order": {"pairs": 5505, "later_id_larger": 0.2}})
    assert "in 20% of those 5,505 pairs" in text and "(ties: file, the source file's order" in text
    assert "rebuild the data with ties: shuffle" in text
    # Near half: no warning, and a D3 import gets the note.
    text = header({"same_time_pairs": 0.55, "same_time_order": {"pairs": 5505, "later_id_larger": 0.52}})
    assert "Warning" not in text
    assert (
        "Note (tiny): 55% of a user's consecutive events share their timestamp; they are as the imported rows" in text
    )
    # A D3 import reordered with d3_ties: shuffle says so.
    text = header(
        {"d3_ties": "shuffle", "same_time_pairs": 0.55, "same_time_order": {"pairs": 5505, "later_id_larger": 0.46}}
    )
    assert "share their timestamp; they are in a seeded order (d3_ties: shuffle)." in text and "Warning" not in text
    # Too few pairs to tell (120 at 65%: 3.3 standard errors from half).
    assert "Warning" not in header({"same_time_pairs": 0.1, "same_time_order": {"pairs": 120, "later_id_larger": 0.65}})


def _split_rows(same_time: set[int], history_asin: dict[int, str] | None = None) -> list[dict]:
    """ROWS as a D3 test split: row i's target at time 50 + i, its history item at 50 + i
    when i is in `same_time`, else at 10. Raw ids: the target's 100 + i, the history item's i
    (smaller) unless `history_asin` names it."""
    history_asin = history_asin or {}
    return [
        {"user_id": r["user_id"], "item_asins": [history_asin.get(i, str(r["user_id"]))], "item_asin": str(r["item_id"]),
         "history_item_id": r["history_item_id"], "item_id": r["item_id"], "history_item_title": ["h"],
         "item_title": "t", "history_rating": [5.0], "rating": 5.0,
         "history_timestamp": [50 + i if i in same_time else 10], "timestamp": 50 + i}
        for i, r in enumerate(ROWS)
    ]  # fmt: skip


def test_methods_against_sft_on_same_time_rows_and_the_others(tmp_path):
    make_run(tmp_path, with_rl_log=False, with_bench=False)
    split = tmp_path / "data" / "tiny" / "test.csv"
    split.parent.mkdir(parents=True)
    write_split(split, _split_rows(set(range(10))))  # rows 0-9: the target shares the history item's time
    config = load_config([TINY])

    def run():
        found = build(config, tmp_path / "results", tmp_path / "m", tmp_path / "b", tmp_path / "out")
        return {c["method"]: c for c in found["same_time"]}, (tmp_path / "out" / "report.md").read_text()

    by, md = run()
    assert sorted(by) == ["pop", "rere", "sasrec"]  # every method with predictions, against SFT
    r = by["rere"]
    # NDCG@5 (the selection metric). Rows 0-9: rere rank 1 (1.0), sft rank 2 (1/log2(3) = 0.63093).
    assert r["same_time"]["rows"] == 10 and r["other"]["rows"] == 20
    assert r["same_time"]["value"] == pytest.approx(1.0)
    assert r["same_time"]["reference_value"] == pytest.approx(1 / math.log2(3))
    assert r["same_time"]["diff"] == pytest.approx(1 - 1 / math.log2(3))
    assert r["same_time"]["p"] == pytest.approx(2 / 2**10) and r["same_time"]["verdict"] == "higher"
    # Rows 10-29: rere 5 x 1.0 + 15 x 0.63093, sft 5 x 0.63093 + 15 x 0.
    assert r["other"]["value"] == pytest.approx((5 + 15 / math.log2(3)) / 20)
    assert r["other"]["reference_value"] == pytest.approx(5 / math.log2(3) / 20)
    # sasrec: rank 3 (0.5) on rows 0-19, below SFT on every same-time row
    assert by["sasrec"]["same_time"]["diff"] == pytest.approx(0.5 - 1 / math.log2(3))
    assert by["sasrec"]["same_time"]["verdict"] == "lower"
    assert by["pop"]["same_time"]["diff"] == 0 and by["pop"]["other"]["verdict"] == "no difference"
    assert "tiny: 10 of 30 test rows (33%) have a target with the timestamp of the row's last history item" in md
    assert "| tiny | rere | sft | 1.0000 vs 0.6309 | +0.3691 [+0.3691, +0.3691] | higher * | 0.7232 vs 0.1577 |" in md
    # every same-time target has the larger raw id (100 + i > i): no split by id order
    assert "id_larger" not in r and "by raw item id order" not in md

    # Same-time rows 0-1 after a history item with the larger raw id 999 (numeric, as stats.json
    # counts it: 999 > 100, 101), row 2 after its own target's id 102 (not larger), rows 3-9 after
    # the smaller i; row 20 (not same-time) after 999 too.
    write_split(split, _split_rows(set(range(10)), {0: "999", 1: "999", 2: "102", 20: "999"}))
    by, md = run()
    r = by["rere"]
    assert (r["id_larger"]["rows"], r["id_not_larger"]["rows"]) == (7, 3)
    assert r["same_time"]["rows"] == 10 and r["other"]["rows"] == 20  # the first split is unchanged
    # rere 1.0 vs sft 1/log2(3) on every same-time row: the same difference on both parts, but 3 rows
    # cannot reach p < 0.05 (exact sign flips: 2 / 2^3; the CI alone excludes 0) and 7 can (2 / 2^7)
    for part, n, verdict in (("id_larger", 7, "higher"), ("id_not_larger", 3, "borderline")):
        assert r[part]["diff"] == pytest.approx(1 - 1 / math.log2(3))
        assert r[part]["p"] == pytest.approx(2 / 2**n) and r[part]["verdict"] == verdict
    # sasrec: rank 3 on rows 0-19, 0.5 - 0.6309 on both parts
    assert by["sasrec"]["id_not_larger"]["value"] == pytest.approx(0.5)
    assert "### Same-time rows by raw item id order" in md
    assert "of those same-time test rows, 7 (70%) have a target whose raw item id is larger" in md
    assert "| tiny | rere | sft | 1.0000 vs 0.6309 | +0.3691 [+0.3691, +0.3691] | higher * | 1.0000 vs 0.6309 |" in md
    write_split(split, _split_rows(set(range(10)), {4: ""}))  # a same-time row without a raw id
    by, md = run()
    assert by["rere"]["same_time"]["rows"] == 10 and "id_larger" not in by["rere"]
    assert "by raw item id order" not in md

    write_split(split, _split_rows(set(range(30))))  # every row same-time: nothing to split
    by, md = run()
    assert by == {} and "Rows whose target shares" not in md
    write_split(split, _split_rows(set()))  # no row same-time
    assert run()[0] == {}
    write_split(split, _split_rows({1})[1:])  # row 0 missing from the split: a note, no table
    by, md = run()
    assert by == {} and f"tiny: no {split} matching the evaluated rows, no same-time split." in md
    split.unlink()
    assert run()[0] == {}


def test_groups_per_step_from_rollouts_else_the_runs_config(tmp_path):
    config = load_config([TINY])
    log = [{"step": 1, "frac_reward_zero_std": 2 / 3}, {"step": 2, "frac_reward_zero_std": 1 / 3}]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"rl": {"batch_prompts": 3}}))
    sig = rl_signal(tmp_path, log, config)  # 3 x 1/3 + 3 x 2/3 = 1 + 2 groups with signal of 6
    assert (sig["groups"], sig["with_signal"], sig["groups_per_step"]) == (6, 3, 3)
    assert sig["source"] == "rl.batch_prompts of the run's config.yaml (one process)"
    # a rollouts.jsonl with another number of steps than the log is not used
    (tmp_path / "rollouts.jsonl").write_text(json.dumps({"step": 0}) + "\n")
    assert rl_signal(tmp_path, log, config)["source"].startswith("rl.batch_prompts of the run's")
    # with one line per group for both steps it is, step by step
    (tmp_path / "rollouts.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (0, 0, 0, 1, 1, 1)))
    assert rl_signal(tmp_path, log, config)["source"] == "counted per step in rollouts.jsonl"
    (tmp_path / "config.yaml").unlink()
    (tmp_path / "rollouts.jsonl").unlink()
    with pytest.raises(RereError, match="not a whole number of groups"):
        rl_signal(tmp_path, log, config)  # tiny.yaml's batch_prompts 2: 2 x 1/3 is no count of groups
    assert rl_signal(tmp_path, [{"step": 1, "loss": 0.3}], config) is None


def test_missing_rl_and_benchmarks_are_notes(tmp_path):
    make_run(tmp_path, with_rl_log=False, with_bench=False)
    config = load_config([TINY])
    out = tmp_path / "results"
    assert main(["report", "--config", str(TINY), "--results", str(out), "--models", str(tmp_path / "models"),
                 "--benchmarks", str(tmp_path / "benchmarks"), "--out", str(out), "-q"]) == 0  # fmt: skip
    md = (out / "report.md").read_text()
    assert "No benchmark files" in md
    assert not (out / "figures" / "rl_tiny.png").exists()
    assert (out / "figures" / "ndcg_tiny.png").is_file()
    assert len(config["rl"]["variants"]) == md.count("no RL curve")


def test_no_metrics_is_a_clear_error(tmp_path, capsys):
    assert main(["report", "--config", str(TINY), "--results", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no metrics.json under" in capsys.readouterr().err
    assert not (tmp_path / "o" / "table.csv").exists()


def test_metrics_without_configured_k_names_the_file(tmp_path):
    make_run(tmp_path)
    config = load_config([TINY], ["evaluate.ks=[1, 3]"])
    with pytest.raises(RereError, match=r"sft/metrics.json: no 'hr@3'"):
        build(config, tmp_path / "results", tmp_path / "models", tmp_path / "b", tmp_path / "out")


def test_reward_curve_prefers_total_reward_and_skips_nan():
    records = [{"step": 1, "reward": 0.7, "rewards/rule/mean": 0.1}, {"step": 2, "reward": float("nan")}]
    assert curve(records, "reward") == ([1.0], [0.7])


def test_benchmark_repeats_and_bad_files(tmp_path):
    (tmp_path / "rl" / "d").mkdir(parents=True)
    header = "s\th:m:s\tmax_rss\n"
    (tmp_path / "rl" / "d" / "v.tsv").write_text(header + "10\t0:00:10\t100\n20\t0:00:20\t300\n")
    (tmp_path / "junk.tsv").write_text("a\tb\n1\t2\n")
    assert read_benchmarks(tmp_path) == [{"job": "rl/d/v", "stage": "rl", "seconds": 15.0, "max_rss_mb": 300.0}]
    assert read_benchmarks(tmp_path / "absent") == []


def test_doctests():
    assert doctest.testmod(rere.report).failed == 0


# seeds: [1, 2]. Each list is 30 ranks: `[1] * n` hits at rank 1 on n rows, so HR@1 = HR@5 =
# NDCG@5 = n / 30; rank 2 on every row gives HR@1 0, HR@5 1 and NDCG@5 1 / log2(3).
SEEDED = {
    1: {"sft": [1] * 6 + [0] * 24, "rere": [1] * 30, "pop": [1] * 3 + [0] * 27, "sasrec": [1] * 9 + [0] * 21},
    2: {"sft": [1] * 12 + [0] * 18, "rere": [2] * 30, "pop": [1] * 3 + [0] * 27},  # sasrec not run for seed 2
}


def make_seeded_run(root: Path, rows=None) -> None:
    for seed, ranks in SEEDED.items():
        for method, r in ranks.items():
            write_method(root, method, r, rows=(rows or {}).get(seed, ROWS), seed=seed)
    write_method(root, "sft", [0] * 30)  # the unseeded folder of an earlier run: not read
    folder = root / "models" / "tiny" / "seed-2" / "rere"
    folder.mkdir(parents=True)
    (folder / "trainer_log.jsonl").write_text(
        json.dumps({"step": 1, "reward": 0.3, "kl": 0.1, "frac_reward_zero_std": 0.5}) + "\n"
    )


def test_seeds_give_a_row_per_seed_comparisons_within_seeds_and_mean_and_spread(tmp_path):
    make_seeded_run(tmp_path)
    split = tmp_path / "data" / "tiny" / "test.csv"
    split.parent.mkdir(parents=True)
    write_split(split, _split_rows(set(range(10))))
    config = load_config([TINY], ["seeds=[1, 2]"])
    out = tmp_path / "out"
    found = build(config, tmp_path / "results", tmp_path / "models", tmp_path / "b", out)

    table = read_csv(out / "table.csv")
    assert list(table[0])[:4] == ["dataset", "seed", "method", "kind"] and "ndcg@5_lo" in table[0]
    assert [(r["seed"], r["method"]) for r in table] == [
        ("1", "sft"), ("1", "rere"), ("1", "pop"), ("1", "sasrec"), ("2", "sft"), ("2", "rere"), ("2", "pop"),
    ]  # fmt: skip
    assert [float(r["ndcg@5"]) for r in table if r["method"] == "sft"] == [0.2, 0.4]  # not the unseeded 0

    spread = {(r["method"], r["metric"]): r for r in read_csv(out / "seeds.csv")}
    assert list(next(iter(spread.values()))) == [
        "dataset", "method", "kind", "metric", "n_seeds", "mean", "std", "min", "max"
    ]  # fmt: skip
    # sft NDCG@5 0.2 and 0.4: mean 0.3, std sqrt((0.1^2 + 0.1^2) / (2 - 1)) = 0.141421
    sft = spread[("sft", "ndcg@5")]
    assert (sft["n_seeds"], sft["mean"], sft["std"], sft["min"], sft["max"]) == (
        "2", "0.300000", "0.141421", "0.200000", "0.400000"
    )  # fmt: skip
    # rere HR@1 1 and 0: mean 0.5, std 1 / sqrt(2); NDCG@5 1 and 1 / log2(3) = 0.630930
    assert (spread[("rere", "hr@1")]["mean"], spread[("rere", "hr@1")]["std"]) == ("0.500000", "0.707107")
    assert float(spread[("rere", "ndcg@5")]["mean"]) == pytest.approx((1 + 1 / math.log2(3)) / 2, abs=1e-6)
    assert float(spread[("rere", "ndcg@5")]["std"]) == pytest.approx((1 - 1 / math.log2(3)) / math.sqrt(2), abs=1e-6)
    assert spread[("pop", "hr@5")]["std"] == "0.000000"  # the same 0.1 for both seeds
    assert (spread[("sasrec", "ndcg@5")]["n_seeds"], spread[("sasrec", "ndcg@5")]["std"]) == ("1", "")
    assert len(spread) == len(found["seeds"]) == 4 * 4  # 4 methods x 4 metrics; grpo has no seed at all

    # each seed's methods against that seed's SFT and best baseline (seed 2 has only pop)
    assert found["best_baseline"] == {
        "tiny/seed-1": ("sasrec", "best by NDCG@5 on the evaluated split"),
        "tiny/seed-2": ("pop", "best by NDCG@5 on the evaluated split"),
        "tiny/pooled": ("pop", "best by NDCG@5 on the evaluated split"),
    }
    tested = read_csv(out / "comparisons.csv")
    assert list(tested[0])[:3] == ["dataset", "seed", "method"]
    by = {(c["seed"], c["method"], c["reference"], c["metric"]): c for c in tested}
    assert float(by[("2", "rere", "sft", "hr@5")]["diff"]) == pytest.approx(1.0 - 0.4)  # seed 2's SFT
    assert float(by[("1", "rere", "sft", "hr@5")]["diff"]) == pytest.approx(1.0 - 0.2)  # seed 1's SFT
    assert float(by[("1", "sft", "sasrec", "ndcg@5")]["diff"]) == pytest.approx(0.2 - 0.3)
    assert float(by[("2", "sft", "pop", "ndcg@5")]["diff"]) == pytest.approx(0.4 - 0.1)
    # seeds pooled: sft, rere and pop have both seeds (sasrec one: not pooled, so pop is the best baseline)
    assert "tiny/pooled/sasrec: per-row results for 1 of 2 seeds, not pooled." in found["notes"]
    # HR@1 per row averaged over the seeds: sft 1 on rows 0-5, 0.5 on rows 6-11, 0 after (mean 0.3);
    # rere 0.5 on every row (rank 1 in seed 1, rank 2 in seed 2). Seed 1 says rere is higher (+0.8),
    # seed 2 lower (-0.4); pooled, rere - sft = 0.2, per-row differences -0.5 x 6, 0 x 6, +0.5 x 18
    # (sd 0.4, standard error 0.4 / sqrt(30) = 0.073), an interval well above 0.
    pooled = by[("pooled", "rere", "sft", "hr@1")]
    assert (float(pooled["value"]), float(pooled["reference_value"])) == pytest.approx((0.5, 0.3))
    assert float(pooled["diff"]) == pytest.approx(0.2) and 0.03 < float(pooled["lo"]) < 0.2 < float(pooled["hi"])
    assert pooled["verdict"] == "higher"
    assert (by[("1", "rere", "sft", "hr@1")]["verdict"], by[("2", "rere", "sft", "hr@1")]["verdict"]) == (
        "higher", "lower"
    )  # fmt: skip
    # pooled NDCG@5: sft 0.3 (its hits are at rank 1), rere (1 + 1 / log2(3)) / 2
    assert float(by[("pooled", "rere", "sft", "ndcg@5")]["diff"]) == pytest.approx((1 + 1 / math.log2(3)) / 2 - 0.3)
    assert float(by[("pooled", "sft", "pop", "ndcg@5")]["diff"]) == pytest.approx(0.3 - 0.1)
    # seed 1 as unseeded; seed 2: rere, pop vs sft; sft, rere vs pop; pooled: the same four pairs as seed 2
    assert len(tested) == 4 * ((3 + 3) + (2 + 2) + (2 + 2))

    md = (out / "report.md").read_text()
    assert "seeds: 1, 2 (data and index built with seed 42)" in md
    assert "| dataset | seed | method | HR@1 |" in md and "| tiny | 2 | sft | 0.4000 [" in md
    across = md[md.index("## Across seeds") : md.index("## Relative gain")]
    assert "| dataset | method | seeds | HR@5 | NDCG@5 |" in across
    assert "| tiny | sft | 2 | 0.3000 ± 0.1414 | 0.3000 ± 0.1414 |" in across
    assert "| tiny | sasrec | 1 | 0.3000 (one seed) | 0.3000 (one seed) |" in across
    assert "tiny/seed-2: the best baseline is pop" in md and "tiny/seed-1: rere - sft on NDCG@5 = +0.8000 [" in md
    assert "tiny/pooled: rere - sft on NDCG@5 = +0.5155 [" in md and "| tiny | pooled | rere | sft | HR@5 |" in md
    assert "| tiny | 2 | rere | 1 | 2 | 1 | 0.500 |" in md  # seed 2's RL log (2 groups per step), in its folder
    assert "tiny/seed-1/rere: no " in md and "tiny/seed-2/sasrec: no " in md  # missing pieces, per seed
    assert "evaluated on other rows than" not in md  # every seed evaluated the same rows
    # Same-time rows (0-9) vs the others: each seed's methods, and the pooled seeds (methods with
    # every seed). NDCG@5, rere - sft: seed 1, same time 1 - 0.6 (sft's hits are rows 0-5), other
    # rows 1 - 0; seed 2, rere at rank 2 everywhere (1 / log2(3)), sft 1 on rows 0-9 and 0.1 on the
    # others (rows 10 and 11 of 20), so lower on the same-time rows and higher on the others;
    # pooled, same time: sft 1 on rows 0-5 and 0.5 on 6-9 (0.8), rere (1 + 1 / log2(3)) / 2.
    assert [(c["seed"], c["method"]) for c in found["same_time"]] == [
        (1, "rere"), (1, "pop"), (1, "sasrec"), (2, "rere"), (2, "pop"), ("pooled", "rere"), ("pooled", "pop")
    ]  # fmt: skip
    rere_by_seed = {c["seed"]: c for c in found["same_time"] if c["method"] == "rere"}
    one, two, pooled_same = rere_by_seed[1], rere_by_seed[2], rere_by_seed["pooled"]["same_time"]
    assert (one["same_time"]["diff"], one["other"]["diff"]) == pytest.approx((0.4, 1.0))
    assert (two["same_time"]["diff"], two["other"]["diff"]) == pytest.approx(
        (1 / math.log2(3) - 1, 1 / math.log2(3) - 0.1)
    )
    assert (two["same_time"]["verdict"], two["other"]["verdict"]) == ("lower", "higher")
    assert pooled_same["reference_value"] == pytest.approx(0.8)
    assert pooled_same["value"] == pytest.approx((1 + 1 / math.log2(3)) / 2)
    assert "tiny/seed-1, tiny/seed-2, tiny/pooled: 10 of 30 test rows (33%) have a target" in md
    assert "| tiny | 2 | rere | sft | 0.6309 vs 1.0000 |" in md
    assert (out / "figures" / "ndcg_tiny.png").read_bytes()[:4] == b"\x89PNG"
    assert "(mean, min-max bars)" in md


def test_seeds_evaluated_on_other_rows_are_noted(tmp_path):
    make_seeded_run(tmp_path, rows={2: ROWS[::-1]})  # seed 2: the same rows in another order
    config = load_config([TINY], ["seeds=[1, 2]"])
    found = build(config, tmp_path / "results", tmp_path / "models", tmp_path / "b", tmp_path / "out")
    assert [n for n in found["notes"] if "other rows" in n] == [
        "tiny/seed-2/sft was evaluated on other rows than tiny/seed-1: the spread across seeds also holds the "
        "choice of rows."
    ]
    assert "tiny/pooled: the seeds were evaluated on different rows, so no seed-pooled comparison." in found["notes"]
    assert not [c for c in found["comparisons"] if c["seed"] == "pooled"]


def test_seeds_without_seed_folders_say_where_they_were_looked_for(tmp_path):
    make_run(tmp_path, with_rl_log=False, with_bench=False)  # an unseeded run, as `dvc repro` writes it
    config = load_config([TINY], ["seeds=[1, 2]"])
    with pytest.raises(RereError, match=r"no metrics.json under .*/<dataset>/seed-<S>/.*`dvc repro` runs `seed` only"):
        build(config, tmp_path / "results", tmp_path / "m", tmp_path / "b", tmp_path / "out")


def test_rl_settings_of_each_run_and_a_warning_when_budgets_differ(tmp_path):
    """The report lists each RL run's settings from its own config.yaml and says whether the
    variants shared one prompt budget and selection rule."""
    make_run(tmp_path)
    config = load_config([TINY])
    models = tmp_path / "models" / "tiny"
    for variant in ("rere", "grpo"):
        (models / variant).mkdir(parents=True, exist_ok=True)
        (models / variant / "config.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "results"
    args = ["report", "--config", str(TINY), "--results", str(out), "--models", str(tmp_path / "models"),
            "--benchmarks", str(tmp_path / "benchmarks"), "--out", str(out), "-q"]  # fmt: skip
    assert main(args) == 0
    md = (out / "report.md").read_text()
    rl = config["rl"]
    assert f"| tiny | grpo | sample | rule | grpo | {rl['num_generations']} | {rl['max_steps']} |" in md
    assert "tiny: every RL variant had the same prompt budget" in md and "WARNING" not in md
    longer = load_config([TINY], ["rl.max_steps=7", "rl.prompt_pool=latest"])
    (models / "grpo" / "config.yaml").write_text(yaml.safe_dump(longer))
    assert main(args) == 0
    md = (out / "report.md").read_text()
    assert "| tiny | grpo | sample | rule | grpo | " in md and "| 7 |" in md and "| latest |" in md
    assert "tiny: WARNING: the RL variants differ in max_steps, prompt_pool" in md
    assert "every RL variant had the same" not in md


def test_header_names_the_machines_and_which_run_used_which(tmp_path):
    amd = {
        "cpu": "AMD EPYC",
        "python": "3.11.7",
        "torch": "2.13.0+cpu",
        "cpu_capability": "AVX2",
        "accelerator": "none",
    }
    intel = {**amd, "cpu": "Intel Xeon", "cpu_capability": "AVX512"}
    make_run(tmp_path, with_rl_log=False, with_bench=False)
    for method, ranks in RANKS.items():  # every method trained on the AMD machine, sft evaluated on Intel
        write_method(tmp_path, method, ranks, trained_on=amd, machine=intel if method == "sft" else amd)
    config = load_config([TINY])
    build(config, tmp_path / "results", tmp_path / "m", tmp_path / "b", tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    line = next(x for x in md[: md.index("## Results")].splitlines() if x.startswith("Machines:"))
    assert line.startswith("Machines: trained on AMD EPYC, torch 2.13.0+cpu (AVX2 CPU kernels), no GPU; evaluated on ")
    evaluated = line.split("evaluated on ", 1)[1]
    assert "Intel Xeon, torch 2.13.0+cpu (AVX512 CPU kernels), no GPU (tiny/sft)" in evaluated
    assert "AMD EPYC, torch 2.13.0+cpu (AVX2 CPU kernels), no GPU (tiny/rere, tiny/pop, tiny/sasrec)" in evaluated


def test_machine_description(tmp_path, monkeypatch):
    import platform

    import torch

    import rere.machine

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu\n")
    monkeypatch.setattr(rere.machine, "CPUINFO", str(cpuinfo))
    described = rere.machine.describe()
    assert described == {
        "cpu": "AMD EPYC 7B13",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "accelerator": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }
    # metrics.json says where it was evaluated
    m = write_results(tmp_path / "out", ROWS[:1], [[100, 1]], [[0.0, 0.0]], [1], {"trained_on": {"cpu": "X"}})
    assert m["machine"] == described and m["trained_on"] == {"cpu": "X"}
    monkeypatch.setattr(rere.machine, "CPUINFO", str(tmp_path / "missing"))  # not Linux: platform's answer
    assert rere.machine.cpu_name() == (platform.processor() or platform.machine() or "unknown")
    assert doctest.testmod(rere.machine).failed == 0


def test_repeat_column_is_the_share_of_the_top_k_found_in_the_history(tmp_path):
    # every history [900, 901]: SFT's rank-2 row ranks [900, target, 902, 903, 904] (1 of its top 5
    # in the history), a missed row [900, ..., 904] (2 of 5): (15 * 1/5 + 15 * 2/5) / 30 = 0.3;
    # rere (ranks 1 and 2): (15 * 1/5 + 15 * 1/5) / 30 = 0.2
    rows = [{**r, "history_item_id": [900, 901]} for r in ROWS]
    for method, ranks in RANKS.items():
        write_method(tmp_path, method, ranks, rows=rows)
    out = tmp_path / "results"
    build(load_config([TINY]), out, tmp_path / "models", tmp_path / "benchmarks", out)
    table = {r["method"]: r for r in read_csv(out / "table.csv")}
    assert float(table["sft"]["repeat"]) == pytest.approx(0.3)
    assert float(table["rere"]["repeat"]) == pytest.approx(0.2)
    report = (out / "report.md").read_text()
    assert "in history@5" in report and "| 0.3000 |" in report


def test_seed_bars_of_a_method_equal_in_every_seed(tmp_path):
    """pop gives the same value for every seed; numpy's mean of three copies of this value is one
    ulp below it, so the bar's lower error (mean - min) was negative and matplotlib refused to
    draw (the three-seed report failed). The bar is drawn with no error below it."""
    v = 0.05112747213686085
    config = {"datasets": {"d": {}}, "rl": {"variants": {}}, "baselines": {"methods": []}, "evaluate": {"ks": [10]}}
    rows = [{"dataset": "d", "method": "sft", "kind": "sft", "hr@10": 0.1, "ndcg@10": v} for _ in range(3)]
    spread = rere.report.across_seeds(rows, config)
    bars = rere.report.mean_rows(spread, ["ndcg@10"])
    assert bars[0]["ndcg@10"] < bars[0]["ndcg@10_lo"] == v  # the rounding that made the error negative
    path = tmp_path / "bars.png"
    rere.report.plot_metric_bars(bars, ["ndcg@10"], "d", path, bars="bars: min-max over seeds")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
