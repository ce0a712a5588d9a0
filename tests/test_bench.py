"""`rere bench decode` and `rere bench rl` run for real on tiny shapes: every row and every
part is produced, beams are identical across rows, options are honoured. No timing
assertions: these machines are shared."""

import argparse
import json

import pytest
import torch

from rere.bench import PRESETS, apply_preset
from rere.bench.decode import VARIANTS
from rere.cli import main
from rere.synthetic import build_setup

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning"),
]

TINY = ["--items", "60", "--prompts", "3", "--beams", "3", "--history", "2", "--batch-size", "2"]
TINY += ["--hidden-size", "32", "--layers", "1", "--vocab-size", "700", "-q"]


def test_bench_decode_gives_every_row_with_identical_beams(tmp_path, capsys):
    out = tmp_path / "decode.json"
    assert main(["bench", "decode", *TINY, "--repeats", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "identical beams (items, every row vs row 1): yes" in printed
    figures = json.loads(out.read_text())
    assert [row["variant"] for row in figures["rows"]] == [v.key for v in VARIANTS]
    assert figures["repeats"] == 2 and figures["device"] == "cpu" and figures["vocab"] == 700
    for row in figures["rows"]:
        assert row["label"] in printed
        assert row["identical_prompts_vs_row1"] == 3, row["variant"]
        for key in ("s_per_prompt", "speedup_vs_row1", "step_ms", "constraint_ms_per_step", "peak_mib"):
            spread = row[key]
            assert spread["min"] <= spread["median"] <= spread["max"], (row["variant"], key)
        assert row["peak_mib"]["median"] >= 0  # from the variant's own child process
        assert 0 <= row["constraint_share_of_step"]["median"] <= 1
    ours = [row for row in figures["rows"] if not row["variant"].startswith("stock")]
    assert all(row["max_score_diff_vs_rere"] < 1e-4 for row in ours)
    assert all(row["max_score_diff_vs_rere"] != row["max_score_diff_vs_rere"] for row in figures["rows"][:2])  # NaN
    assert 0 < figures["rows"][-1]["scored_beam_share"]["median"] <= 1


def test_bench_decode_spreads_the_vocabulary_and_refuses_bad_sizes(tmp_path, capsys):
    out = tmp_path / "decode.json"
    argv = ["bench", "decode", *TINY, "--repeats", "1", "--model-vocab", "5000", "--out", str(out)]
    assert main(argv) == 0
    figures = json.loads(out.read_text())
    assert figures["vocab"] == 5000 and figures["bpe_vocab"] == 700
    assert all(row["identical_prompts_vs_row1"] == 3 for row in figures["rows"])
    capsys.readouterr()
    assert main(["bench", "decode", "--items", "2", "--beams", "3", "-q"]) == 2  # RereError, no traceback
    assert "larger than --items" in capsys.readouterr().err
    assert main(["bench", "decode", *TINY, "--model-vocab", "500"]) == 2
    assert "smaller than --vocab-size" in capsys.readouterr().err
    assert main(["bench", "rl", "--preset", "paper", "-q"]) == 2
    assert "no preset 'paper'" in capsys.readouterr().err
    assert main(["bench", "decode", *TINY, "--memory-of", "nothing"]) == 2
    assert "--memory-of must be one of" in capsys.readouterr().err


def test_paper_preset_fills_only_what_is_left_out():
    args = argparse.Namespace(which="decode", preset="paper", **{k: None for k in PRESETS["decode"]["paper"]})
    args.beams = 7
    apply_preset(args)
    assert (args.model_vocab, args.beams, args.items, args.hidden_size) == (151_936, 7, 11_000, 64)


def test_spread_vocabulary_keeps_the_trie_shape():
    sizes = {"items": 50, "prompts": 2, "history": 2, "vocab_size": 700, "hidden_size": 32, "layers": 1}
    own = build_setup(argparse.Namespace(**sizes, model_vocab=0), seed=3)
    wide = build_setup(argparse.Namespace(**sizes, model_vocab=151_936), seed=3)
    assert wide["trie"].vocab_size == wide["model"].config.vocab_size == 151_936
    assert wide["trie"].num_nodes == own["trie"].num_nodes and wide["trie"].max_depth == own["trie"].max_depth
    assert [len(s) for s in wide["seqs"]] == [len(s) for s in own["seqs"]]
    assert max(max(s) for s in wide["seqs"]) > 700  # ids really spread
    assert (wide["pad_id"], wide["eos_id"]) == (own["pad_id"], own["eos_id"])


def test_bench_rl_runs_a_real_trainer_step_and_honours_threads(tmp_path, capsys):
    out = tmp_path / "rl.json"
    argv = ["bench", "rl", *TINY, "--beams", "4", "--repeats", "2", "--threads", "2", "--out", str(out)]
    try:
        assert main(argv) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    printed = capsys.readouterr().out
    figures = json.loads(out.read_text())
    assert figures["torch_threads"] == 2 and figures["G"] == 4
    rollout = figures["rollout"]
    for key in ("s_beam", "s_trl_sampling", "s_constrained_sampling", "beam_over_trl_sampling"):
        assert rollout[key]["min"] > 0, key
    step = figures["rl_step"]
    assert step["steps_timed"] == 2 and step["completions_per_step"] == 2 * 4 and step["beta"] > 0
    parts = ("rollout", "reference_forward", "policy_forward_backward", "optimiser")
    for part in parts:
        assert step[f"s_{part}"]["min"] > 0, part  # each piece of a real step was timed
        assert part.replace("_", " ") in printed
    assert sum(step[f"share_{p}"] for p in (*parts, "other")) == pytest.approx(1, abs=0.05)
    assert "valid" not in json.dumps(figures) and "distinct" not in json.dumps(figures)
