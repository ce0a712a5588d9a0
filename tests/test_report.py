"""`rere report`: table, gains, figures and notes from a hand-made run folder."""

import csv
import doctest
import json
from pathlib import Path

import pytest

import rere.report
from rere import RereError
from rere.cli import main
from rere.config import load_config
from rere.report import build, curve, gains, read_benchmarks

TINY = Path(__file__).parent / "config" / "tiny.yaml"

# tiny.yaml: dataset tiny, ks [1, 5], num_beams 5, variants rere + grpo, baselines pop + sasrec.
METRICS = {
    "sft": {
        "hr@1": 0.10,
        "hr@5": 0.30,
        "ndcg@1": 0.10,
        "ndcg@5": 0.20,
        "rows": 30,
        "invalid": 3,
        "num_beams": 5,
        "throughput": 12.5,
    },
    "rere": {
        "hr@1": 0.15,
        "hr@5": 0.36,
        "ndcg@1": 0.15,
        "ndcg@5": 0.25,
        "rows": 30,
        "invalid": 0,
        "num_beams": 5,
        "throughput": 11.0,
    },
    # grpo not run: a note, not a crash
    "pop": {"hr@1": 0.05, "hr@5": 0.40, "ndcg@1": 0.05, "ndcg@5": 0.16, "rows": 30, "invalid": 0, "throughput": 900.0},
    "sasrec": {
        "hr@1": 0.12,
        "hr@5": 0.24,
        "ndcg@1": 0.12,
        "ndcg@5": 0.14,
        "rows": 30,
        "invalid": 0,
        "throughput": 300.0,
    },
}


def make_run(root: Path, with_rl_log=True, with_bench=True) -> None:
    for method, m in METRICS.items():
        folder = root / "results" / "tiny" / method
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps(m))
    if with_rl_log:
        log = root / "models" / "tiny" / "rere" / "trainer_log.jsonl"
        log.parent.mkdir(parents=True)
        lines = [
            {"step": 2, "rewards/rule/mean": 0.5, "rewards/ranking/mean": -0.1, "kl": 0.02, "loss": 0.1},
            {"step": 1, "rewards/rule/mean": 0.25, "rewards/ranking/mean": -0.2, "kl": 0.01, "loss": 0.2},
            {"train_runtime": 3.0},  # end-of-training summary: no step, ignored
        ]
        log.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    if with_bench:
        bench = root / "benchmarks"
        (bench / "sft").mkdir(parents=True)
        header = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
        (bench / "sft" / "tiny.tsv").write_text(header + "12.5\t0:00:12\t812.3\t1\t1\t1\t0\t0\t90\t20\n")
        (bench / "report.tsv").write_text(header + "2.0\t0:00:02\t-\t-\t-\t-\t-\t-\t-\t-\n")


def test_table_gains_figures_and_notes(tmp_path):
    make_run(tmp_path)
    config = load_config([TINY])
    out = tmp_path / "results"
    found = build(config, out, tmp_path / "models", tmp_path / "benchmarks", out)

    with open(out / "table.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["method"] for r in table] == ["sft", "rere", "pop", "sasrec"]  # config order, grpo missing
    assert list(table[0]) == [
        "dataset",
        "method",
        "kind",
        "hr@1",
        "hr@5",
        "ndcg@1",
        "ndcg@5",
        "invalid_rate",
        "throughput",
        "rows",
    ]
    assert table[0]["kind"] == "sft" and table[1]["kind"] == "rl" and table[2]["kind"] == "baseline"
    assert float(table[0]["invalid_rate"]) == pytest.approx(3 / (30 * 5))  # 3 bad beams of 150
    assert float(table[1]["ndcg@5"]) == pytest.approx(0.25)
    assert table[3]["rows"] == "30"

    by_metric = {g["metric"]: g for g in found["gains"]}
    # ndcg@5: ReRe 0.25 vs SFT 0.20 -> +25%; best baseline pop 0.16 -> (0.25-0.16)/0.16 = +56.25%
    assert by_metric["ndcg@5"]["gain_vs_sft"] == pytest.approx(0.25)
    assert by_metric["ndcg@5"]["best_baseline"] == "pop"
    assert by_metric["ndcg@5"]["gain_vs_baseline"] == pytest.approx(0.5625)
    # hr@5: best baseline is pop (0.40), so ReRe (0.36) loses 10%
    assert by_metric["hr@5"]["gain_vs_baseline"] == pytest.approx(-0.1)
    # hr@1: best baseline is sasrec (0.12): +25%
    assert by_metric["hr@1"]["best_baseline"] == "sasrec"
    assert by_metric["hr@1"]["gain_vs_baseline"] == pytest.approx(0.25)

    md = (out / "report.md").read_text()
    assert "+56.2%" in md and "-10.0%" in md
    assert "tiny/grpo: no" in md  # missing evaluation noted
    assert "no RL curve" in md  # grpo has no trainer log
    for name in ("ndcg_tiny.png", "rl_tiny.png", "stages.png"):
        png = out / "figures" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"figures/{name}" in md
    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<td>56.25</td>" not in page and "+56.2%" in page
    assert '<img src="figures/rl_tiny.png"' in page
    assert "| sft/tiny | 12.5 | 812 |" in md  # per-stage time and memory from the TSV
    assert "| report | 2.0 | n/a |" in md


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


def test_gain_with_zero_reference_and_no_rere():
    rows = [
        {"dataset": "d", "method": "sft", "kind": "sft", "ndcg@5": 0.0},
        {"dataset": "d", "method": "rere", "kind": "rl", "ndcg@5": 0.1},
        {"dataset": "e", "method": "sft", "kind": "sft", "ndcg@5": 0.3},
    ]
    (g,) = gains(rows, ["ndcg@5"])  # dataset e has no rere row: no gain line
    assert g["gain_vs_sft"] is None and g["best_baseline"] is None and g["gain_vs_baseline"] is None


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
