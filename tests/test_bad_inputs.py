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
    return sorted(p.name for p in out.parent.iterdir() if p.name == out.name or p.name.startswith((f".{out.name}.", f"{out.name}.")))


def refused(capsys, argv: list[str], *needles: str, out: Path | None = None) -> str:
    """Run `rere argv`; assert a clear refusal (exit 2, one error line naming the needles, no
    traceback) and that nothing was written at `out`. Returns stderr."""
    capsys.readouterr()
    assert main([*argv, "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rere {argv[0]}: error: "), err
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
