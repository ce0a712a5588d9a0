"""Config loading: defaults from the schema, typos named, overrides, merges."""

import pytest
import yaml

from rere import RereError
from rere.cli import main
from rere.config import DEFAULT_CONFIG, flatten, load_config


def test_default_config_fills_schema_defaults():
    config = load_config()
    # keys absent from config/config.yaml come from the schema
    assert config["sft"]["lora"]["target_modules"] == "all-linear"
    assert config["datasets"]["ml100k"]["k_core"] == 5
    assert config["rl"]["variants"]["rere"] == {"sampling": "beam", "reward": "ranking", "loss": "grpo"}
    assert config["tracking"]["experiment"] == "rere"


def test_typo_names_the_key_and_section():
    with pytest.raises(RereError, match=r"unknown key \['learnin_rate'\] under 'sft'"):
        load_config(overrides=["sft.learnin_rate=0.1"])


def test_bad_value_names_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("datasets:\n  ml100k: {source: recbole, split: random}\n")
    with pytest.raises(RereError, match=r"datasets\.ml100k\.split.*'random' is not one of"):
        load_config([DEFAULT_CONFIG, bad])


def test_k_larger_than_beams_is_refused():
    with pytest.raises(RereError, match="evaluate.ks.*larger than evaluate.num_beams=5"):
        load_config(overrides=["evaluate.num_beams=5"])


def test_later_files_override_and_datasets_replace(tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text(yaml.safe_dump({"datasets": {"office": {"source": "d3", "path": "x"}}, "sft": {"epochs": 7}}))
    config = load_config([DEFAULT_CONFIG, extra], ["sft.batch_size=3", "rl.learning_rate=1e-4"])
    assert config["rl"]["learning_rate"] == 1e-4
    assert list(config["datasets"]) == ["office"]  # replaced, not merged with ml100k
    assert config["sft"]["epochs"] == 7
    assert config["sft"]["batch_size"] == 3
    assert config["sft"]["learning_rate"] == load_config()["sft"]["learning_rate"]


def test_cross_field_requirements():
    with pytest.raises(RereError, match="datasets.a.category"):
        load_config(overrides=["datasets={a: {source: amazon}}"])
    with pytest.raises(RereError, match=r"rl.variants' has \['pop', 'sft'\]"):
        load_config(overrides=["rl.variants={sft: {}, pop: {}}"])
    with pytest.raises(RereError, match="model.name_or_path"):
        load_config(overrides=["model.init=pretrained"])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(RereError, match="does not exist"):
        load_config([tmp_path / "nope.yaml"])
    broken = tmp_path / "broken.yaml"
    broken.write_text("seed: [1,\n")
    with pytest.raises(RereError, match="not valid YAML"):
        load_config([broken])


def test_flatten():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": 1, "a.c": "[1, 2]", "d": None}


def test_cli_reports_config_error_without_traceback(capsys):
    assert main(["data", "--dataset", "ml100k", "--out", "unused", "--set", "sft.nope=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown key ['nope'] under 'sft'" in err
    assert "Traceback" not in err


def test_seeds_are_null_or_distinct_integers():
    assert load_config()["seeds"] is None  # default: one run with `seed`
    assert load_config(overrides=["seeds=[42, 43, 44]"])["seeds"] == [42, 43, 44]
    with pytest.raises(RereError, match=r"--set seeds=\[1, 1\]: key 'seeds': \[1, 1\] has non-unique elements"):
        load_config(overrides=["seeds=[1, 1]"])
    with pytest.raises(RereError, match=r"key 'seeds.1': 2.5 is not of type 'integer'"):
        load_config(overrides=["seeds=[1, 2.5]"])
    with pytest.raises(RereError, match=r"key 'seeds.0': 'a' is not of type 'integer'"):
        load_config(overrides=["seeds=[a]"])
    with pytest.raises(RereError, match=r"key 'seeds': \[\] should be non-empty"):
        load_config(overrides=["seeds=[]"])
