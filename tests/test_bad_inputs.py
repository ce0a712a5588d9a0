"""Bad inputs a new user can hand the CLI (issue 12): each one gets `rere <stage>: error: ...`
on stderr, exit status 2, no traceback, and leaves no output behind.

docs/BAD_INPUTS.md lists these cases together with the ones covered in the other test files.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_sft import make_base, sets

from rere.cli import main

ROOT = Path(__file__).resolve().parent.parent
TINY_CONFIG = ROOT / "tests" / "config" / "tiny.yaml"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("bad"))


def leftovers(out: Path) -> list[str]:
    """What a stage left at or next to `out` (the output, its temporaries, a training folder)."""
    if not out.parent.is_dir():
        return []
    return sorted(
        p.name
        for p in out.parent.iterdir()
        if p.name == out.name or p.name.startswith((f".{out.name}.", f"{out.name}."))
    )


def refused(capsys, argv: list[str], *needles: str, out: Path | None = None) -> str:
    """Run `rere argv`; assert a clear refusal (exit 2, one error line naming the needles, no
    traceback) and that nothing was written at `out`. Returns stderr."""
    capsys.readouterr()
    assert main([*argv, "-q"]) == 2
    err = capsys.readouterr().err
    # The error is the last line (transformers may draw a progress bar before it).
    assert err.strip().splitlines()[-1].startswith(f"rere {argv[0]}: error: "), err
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    if out is not None:
        assert leftovers(out) == [], leftovers(out)
    return err


def stage_args(paths: dict, stage: str, model: Path, out: Path) -> list[str]:
    if stage == "recommend":
        return ["recommend", "--model", str(model), "--index", str(paths["index"]), "--item-ids", "0", "1", *sets()]
    common = ["--data", str(paths["data"]), "--index", str(paths["index"]), "--model", str(model), "--out", str(out)]
    if stage == "rl":  # the tiny workflow config, as the issue asks; the refusal comes before training
        return ["rl", "--config", str(TINY_CONFIG), "--variant", "rere", *common, "--set", "rl.max_steps=1"]
    return [stage, *common, *sets()]


# ---------------------------------------------------------------------------------------------
# A model folder never decides to run its own code


REMOTE_CODE = """
from pathlib import Path

from transformers import Qwen2ForCausalLM

Path({marker!r}).write_text("the folder's code ran")


class RemoteLM(Qwen2ForCausalLM):
    pass
"""


def remote_code_folder(base_model: Path, folder: Path, *, rere_json: bool, auto_map: bool) -> Path:
    """A copy of a working model folder that asks to run `remote.py` (which leaves a marker file)."""
    shutil.copytree(base_model, folder)
    (folder / "remote.py").write_text(REMOTE_CODE.format(marker=str(folder.parent / f"{folder.name}.ran")))
    if auto_map:
        config = json.loads((folder / "config.json").read_text())
        config["auto_map"] = {"AutoModelForCausalLM": "remote.RemoteLM"}
        (folder / "config.json").write_text(json.dumps(config))
    if rere_json:
        meta = json.loads((folder / "rere.json").read_text())
        meta["trust_remote_code"] = True
        (folder / "rere.json").write_text(json.dumps(meta))
    return folder


def marker(folder: Path) -> Path:
    return folder.parent / f"{folder.name}.ran"


@pytest.mark.parametrize("stage", ["recommend", "evaluate", "sft", "rl"])
def test_remote_code_asked_by_the_folder_is_refused_in_every_stage_that_loads_a_model(base, tmp_path, stage, capsys):
    # The folder: auto_map to a module of the folder, and rere.json saying trust it.
    model = remote_code_folder(base["base"], tmp_path / "evil", rere_json=True, auto_map=True)
    out = tmp_path / "out"
    argv = stage_args(base, stage, model, out)
    for extra in ([], ["--set", "model.trust_remote_code=false"]):
        refused(capsys, [*argv, *extra], "rere.json", "--set model.trust_remote_code=true", out=out)
        assert not marker(model).exists()
    # Only config.json asks (rere.json is silent): refused, naming config.json and its auto_map.
    model = remote_code_folder(base["base"], tmp_path / "evil2", rere_json=False, auto_map=True)
    refused(capsys, stage_args(base, stage, model, out), "config.json", "auto_map", "trust_remote_code=true", out=out)
    assert not marker(model).exists()


def test_remote_code_runs_when_the_user_allows_it(base, tmp_path):
    """The way out that the error names works (a subprocess: transformers copies the module
    into HF_MODULES_CACHE, pointed at a temporary folder)."""
    model = remote_code_folder(base["base"], tmp_path / "trusted", rere_json=False, auto_map=True)
    argv = stage_args(base, "recommend", model, tmp_path / "unused")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "rere.cli", *argv, "--set", "model.trust_remote_code=true", "-q"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert marker(model).read_text() == "the folder's code ran"


# ---------------------------------------------------------------------------------------------
# Inputs that do not belong together


@pytest.fixture
def other_catalogue(base, tmp_path) -> Path:
    """The data folder with the same item ids but other titles: another dataset's catalogue."""
    data = tmp_path / "data" / "tiny"
    shutil.copytree(base["data"], data)
    info = data / "info.txt"
    info.write_text(info.read_text().replace(" Lamp ", " Chair "))
    return data


@pytest.mark.parametrize("stage", ["evaluate", "sft"])
def test_data_and_index_of_different_catalogues_are_refused(base, other_catalogue, tmp_path, stage, capsys):
    out = tmp_path / "out"
    argv = stage_args({**base, "data": other_catalogue}, stage, base["base"], out)
    refused(capsys, argv, "info.txt is not the catalogue this index was built from", "rere index", out=out)


# ---------------------------------------------------------------------------------------------
# A damaged model folder


def damage_weights(folder: Path) -> None:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def damage_config(folder: Path) -> None:
    path = folder / "config.json"
    path.write_text(path.read_text()[:-20])


def damage_tokenizer_json(folder: Path) -> None:
    path = folder / "tokenizer.json"
    path.write_text(path.read_text()[:1000])


def damage_tokenizer_model(folder: Path) -> None:
    """Valid JSON that is not a tokenizer."""
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text())
    data["model"] = {"type": "NoSuchModel"}
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "damage, named",
    [
        (damage_weights, "model.safetensors is truncated"),
        (damage_config, "config.json: line"),
        (damage_tokenizer_json, "tokenizer.json: line"),
        (damage_tokenizer_model, "the tokenizer (tokenizer.json, tokenizer_config.json) could not be loaded"),
    ],
    ids=["truncated-safetensors", "broken-config-json", "broken-tokenizer-json", "not-a-tokenizer"],
)
def test_a_damaged_model_folder_is_named(base, tmp_path, damage, named, capsys):
    model = tmp_path / "damaged"
    shutil.copytree(base["base"], model)
    damage(model)
    out = tmp_path / "out"
    refused(capsys, stage_args(base, "evaluate", model, out), named, "rebuild it", out=out)
    refused(capsys, stage_args(base, "recommend", model, out), named)


# ---------------------------------------------------------------------------------------------
# `rere data`: odd titles, empty splits, bytes that are not UTF-8

D3_HEADER = (
    "user_id,item_asins,item_asin,history_item_id,item_id,history_item_title,item_title,"
    "history_rating,rating,history_timestamp,timestamp\n"
)


def d3_folder(folder: Path, title0: str = "Red Pen") -> Path:
    """A three-item D3 folder, two rows per split; `title0` is item 0's title (CSV-quoted)."""
    folder.mkdir(parents=True)
    (folder / "info.txt").write_text(f"{title0}\t0\nCup\t1\nInk\t2\n")
    quoted = title0.replace("'", "\\'")
    rows = [
        f"u1,['a0'],a1,[0],1,\"['{quoted}']\",Cup,[5.0],4.0,[1],2\n",
        "u2,['a1'],a2,[1],2,['Cup'],Ink,[5.0],4.0,[1],2\n",
    ]
    for split in ("train", "valid", "test"):
        (folder / f"{split}.csv").write_text(D3_HEADER + "".join(rows))
    return folder


def d3_config(tmp_path: Path, folder: Path) -> Path:
    config = tmp_path / "d3.yaml"
    config.write_text(json.dumps({"datasets": {"d3": {"source": "d3", "path": str(folder)}}}))
    return config


def data_args(tmp_path: Path, folder: Path, out: Path) -> list[str]:
    return ["data", "--config", str(d3_config(tmp_path, folder)), "--dataset", "d3", "--out", str(out)]


def test_a_tab_in_a_title_becomes_a_space_in_reader_and_writer(tmp_path):
    """One rule (rere.io.clean_title): a tab or line break inside a title is a space, for the
    info.txt reader, the CSV title columns and every source reader alike."""
    from rere.data import build_from_corpus
    from rere.data.corpus import Corpus
    from rere.io import read_catalogue, read_split

    folder = d3_folder(tmp_path / "d3", title0="Red\tPen")
    out = tmp_path / "data" / "d3"
    assert main([*data_args(tmp_path, folder, out), "-q"]) == 0
    assert (out / "info.txt").read_text().splitlines()[0] == "Red Pen\t0"
    assert read_catalogue(out / "info.txt")[0] == "Red Pen"
    assert read_split(out / "train.csv")[0]["history_item_title"] == ["Red Pen"]

    corpus = Corpus(
        events=[("u", "a", 5.0, 1), ("u", "b", 5.0, 2), ("u", "c", 5.0, 3)],
        titles={"a": "Pens\tand Paper", "b": "Ink\r\nWell", "c": "Cup"},
        words={},
        item_order=["a", "b", "c"],
        user_order=["u"],
    )
    ds = {"max_history": 10, "split": "leave_one_out"}
    _, items, _ = build_from_corpus(corpus, ds, seed=0, source="amazon")
    assert sorted(r["title"] for r in items) == ["Cup", "Ink  Well", "Pens and Paper"]


@pytest.mark.parametrize("split", ["train", "test"])
def test_rere_data_refuses_an_empty_split(tmp_path, split, capsys):
    folder = d3_folder(tmp_path / "d3")
    (folder / f"{split}.csv").write_text(D3_HEADER)
    out = tmp_path / "data" / "d3"
    refused(capsys, data_args(tmp_path, folder, out), f"{split}.csv: the {split} split has no rows", out=out)


@pytest.mark.parametrize(
    "name, line",
    [("valid.csv", 3), ("info.txt", 2)],
)
def test_a_byte_that_is_not_utf8_is_reported_with_its_line(tmp_path, name, line, capsys):
    folder = d3_folder(tmp_path / "d3")
    lines = (folder / name).read_bytes().split(b"\n")
    lines[line - 1] = lines[line - 1].replace(b"Cup", b"C\xfcp")  # latin-1 ü
    (folder / name).write_bytes(b"\n".join(lines))
    column = lines[line - 1].index(b"\xfc") + 1
    out = tmp_path / "data" / "d3"
    needle = f"{name}: line {line}: byte {column} of the line"
    refused(capsys, data_args(tmp_path, folder, out), needle, "not UTF-8", out=out)


def test_non_utf8_config_and_index_files_name_the_line(base, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_bytes(b"seed: 1\n# caf\xe9\n")
    refused(
        capsys, ["index", "--config", str(config), "--data", "x", "--out", "y"], "bad.yaml: line 2: byte 6 of the line"
    )
    index = tmp_path / "index"
    shutil.copytree(base["index"], index)
    text = (index / "index.json").read_bytes()
    (index / "index.json").write_bytes(text.replace(b"Red Lamp 0", b"R\xe9d Lamp 0"))
    out = tmp_path / "out"
    refused(capsys, stage_args({**base, "index": index}, "evaluate", base["base"], out), "index.json: line", out=out)


# ---------------------------------------------------------------------------------------------
# Config values and --set arguments


def test_sft_max_steps_zero_is_refused_naming_the_key(tmp_path, capsys):
    argv = ["index", "--data", "x", "--out", str(tmp_path / "out")]
    refused(capsys, [*argv, "--set", "sft.max_steps=0"], "--set sft.max_steps=0: key 'sft.max_steps'")
    config = tmp_path / "zero.yaml"
    config.write_text("sft: {max_steps: 0}\n")
    refused(capsys, [*argv, "--config", str(config)], f"{config}: key 'sft.max_steps': 0 is not allowed")


@pytest.mark.parametrize(
    "item, message",
    [
        ("sft.max_stepz=3", "--set sft.max_stepz=3: unknown key ['max_stepz'] under 'sft'"),
        ("evaluate.num_beams=many", "--set evaluate.num_beams=many: key 'evaluate.num_beams'"),
        ("sft=3", "--set sft=3: key 'sft'"),
        ("sft.max_steps=[1", "--set 'sft.max_steps=[1': the value is not valid YAML"),
        ("evaluate.num_beams=2", "with --set evaluate.num_beams=2: key 'evaluate.ks'"),
    ],
)
def test_set_errors_name_the_set_argument(tmp_path, item, message, capsys):
    err = refused(capsys, ["index", "--data", "x", "--out", str(tmp_path / "out"), "--set", item], message)
    assert "config.yaml: key" not in err


# ---------------------------------------------------------------------------------------------
# `rere recommend` with a history longer than the model was trained on


def test_a_long_history_keeps_its_last_items_and_says_so(base, caplog, capsys):
    history = [str(i % 12) for i in range(3000)]
    argv = ["recommend", "--model", str(base["base"]), "--index", str(base["index"]), "--item-ids", *history]
    # tiny.yaml's datasets.tiny.max_history (10) is the model's dataset's (rere.json: "tiny").
    with caplog.at_level("INFO", logger="rere"):
        assert main([*argv, "--config", str(TINY_CONFIG), "--k", "3", "--json"]) == 0
    kept = [h["item_id"] for h in json.loads(capsys.readouterr().out)["history"]]
    assert kept == [int(x) for x in history[-10:]]
    assert any("has 3000 items; keeping the last 10" in r.getMessage() for r in caplog.records)
    # A limit the model's 256 positions cannot hold is refused before decoding.
    refused(capsys, [*argv, *sets(), "--max-history", "3000"], "tokens", "the model takes 256 positions")


# ---------------------------------------------------------------------------------------------
# SFT resumed: the summary still describes every step


def test_train_loss_after_a_resume_covers_every_step(base, tmp_path):
    from test_sft import run_sft

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_sft(base, straight, "sft.max_steps=8", "sft.eval_steps=4") == 0
    assert run_sft(base, resumed, "sft.max_steps=4", "sft.eval_steps=4") == 0
    assert run_sft(base, resumed, "sft.max_steps=8", "sft.eval_steps=4") == 0  # continues from checkpoint-4

    def summary(out):
        return json.loads((out / "sft_summary.json").read_text())

    def logged(out):  # logging_steps=1: one loss record per step
        lines = (out / "trainer_log.jsonl").read_text().splitlines()
        return [r["loss"] for r in map(json.loads, lines) if "loss" in r]

    assert logged(resumed) == pytest.approx(logged(straight), rel=1e-5)  # the resume is faithful
    assert len(logged(resumed)) == 8 and summary(resumed)["global_step"] == 8
    assert summary(resumed)["train_loss"] == pytest.approx(sum(logged(resumed)) / 8, rel=1e-6)
    assert summary(resumed)["train_loss"] == pytest.approx(summary(straight)["train_loss"], rel=1e-5)


def test_overall_train_loss_weighs_each_record_by_its_steps(tmp_path):
    from rere.sft import overall_train_loss

    log = tmp_path / "trainer_log.jsonl"
    records = [
        {"step": 2, "loss": 4.0},
        {"step": 2, "eval_loss": 9.0},
        {"step": 6, "loss": 1.0},
        {"step": 8, "loss": 7.0},
    ]
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    # Resumed at 6: steps 1-2 at 4.0, 3-6 at 1.0 (from the log), 7-10 at 2.5 (this run).
    assert overall_train_loss(log, 6, 2.5, 10) == pytest.approx((4.0 * 2 + 1.0 * 4 + 2.5 * 4) / 10)
    assert overall_train_loss(log, 0, 2.5, 10) == 2.5  # not resumed: Trainer's own mean


# ---------------------------------------------------------------------------------------------
# An honest invalid rate: a broken trie shows up in the column


def wrong_tries(model, tokenizer, index):
    """Tries that constrained decoding would follow without complaint, but that are wrong:
    each item's label points at the next item's tokens, or no sequence is an item's code."""
    from rere.decoding import ItemTrie, catalogue_trie

    right, seqs = catalogue_trie(model, tokenizer, index, "compact", 42)
    vocab = model.config.get_text_config().vocab_size
    return right, {
        "labels-rotated": ItemTrie.from_sequences(seqs[1:] + seqs[:1], vocab),
        "not-item-codes": ItemTrie.from_sequences([[tokenizer.pad_token_id, *s] for s in seqs], vocab),
    }


@pytest.mark.parametrize("wrong", ["labels-rotated", "not-item-codes"])
def test_a_wrong_trie_shows_up_in_invalid_rate(base, tmp_path, wrong, monkeypatch):
    import rere.decoding
    from rere.config import load_config
    from rere.evaluate import evaluate_model
    from rere.index import ItemIndex
    from rere.io import read_split
    from rere.model import load_model

    index = ItemIndex.load(base["index"])
    model, tok, meta = load_model(base["base"], index=index)
    right, tries = wrong_tries(model, tok, index)
    config = load_config(overrides=[x for x in sets() if x != "--set"])
    rows = read_split(base["data"] / "test.csv")[:4]
    _, _, good = evaluate_model(model, tok, index, rows, config, style="compact", trie=right, progress=False)
    ranked, _, bad = evaluate_model(model, tok, index, rows, config, style="compact", trie=tries[wrong], progress=False)
    assert good["invalid"] == 0 and bad["invalid"] == 4 * 5  # every beam of 4 rows x 5 beams
    assert good["invalid_rate"] == 0.0 and bad["invalid_rate"] == 1.0
    assert ranked == [[], [], [], []]

    # Through the CLI: metrics.json carries the rate (the report's invalid_rate column).
    monkeypatch.setattr(rere.decoding, "catalogue_trie", lambda *args: (tries[wrong], None))
    out = tmp_path / "results"
    assert main([*stage_args(base, "evaluate", base["base"], out), "--set", "evaluate.max_rows=4", "-q"]) == 0
    written = json.loads((out / "metrics.json").read_text())
    assert written["invalid"] == 20 and written["invalid_rate"] == 1.0


def test_baselines_write_invalid_rate_as_not_applicable(base, tmp_path):
    out = tmp_path / "pop"
    assert main(["baseline", "--method", "pop", "--data", str(base["data"]), "--out", str(out), *sets(), "-q"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["invalid_rate"] is None and "invalid" not in metrics  # n/a, not a measured 0
