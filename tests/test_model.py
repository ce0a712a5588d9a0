"""`rere model`: scratch and pretrained base models, save/load, fingerprint checks."""

import json
import random
from pathlib import Path

import pytest
import torch
from fixtures.rows import d3_row
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

from rere import RereError
from rere.cli import main
from rere.config import load_config, schema_defaults
from rere.index import ItemIndex
from rere.io import write_catalogue, write_jsonl, write_split
from rere.machine import describe
from rere.model import ScratchConfig, count_parameters, load_model, save_model
from rere.prompts import item_token_ids, probe_prompts

TINY = [
    "model.scratch.vocab_size=300",
    "model.scratch.hidden_size=32",
    "model.scratch.num_layers=1",
    "model.scratch.num_heads=4",
    "model.scratch.num_kv_heads=2",
    "model.scratch.intermediate_size=64",
    "model.scratch.max_position_embeddings=128",
]
WORDS = ["Night", "Love", "Blue", "City", "King", "Dark", "Story", "House"]


def make_data(folder, n_items=24, n_users=12, seed=0):
    """A tiny `rere data` folder: info.txt, items.jsonl and train/valid/test splits."""
    rng = random.Random(seed)
    titles = {i: f"{WORDS[i % 8]} {WORDS[(i * 5 + 1) % 8]} ({1960 + i})" for i in range(n_items)}
    write_catalogue(folder / "info.txt", titles)
    write_jsonl(
        folder / "items.jsonl", [{"item_id": i, "title": t, "asin": str(i), "text": t} for i, t in titles.items()]
    )
    splits = {"train": [], "valid": [], "test": []}
    for u in range(n_users):
        seq = rng.sample(range(n_items), 8)
        for t in range(1, len(seq)):
            h = seq[max(0, t - 5) : t]
            split = "test" if t == len(seq) - 1 else "valid" if t == len(seq) - 2 else "train"
            splits[split].append(d3_row(str(u), h, seq[t], titles, str, list(range(len(h))), t))
    for name, rows in splits.items():
        write_split(folder / f"{name}.csv", rows)
    return titles


def run_stage(*argv):
    assert main([*argv, "-q"]) == 0


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """data/, a title index and a sid index, shared by the tests of this file."""
    root = tmp_path_factory.mktemp("model")
    make_data(root / "data")
    run_stage("index", "--data", str(root / "data"), "--out", str(root / "idx_title"), "--set", "index.kind=title")
    run_stage("index", "--data", str(root / "data"), "--out", str(root / "idx_sid"), "--set", "index.kind=sid")
    run_stage("index", "--data", str(root / "data"), "--out", str(root / "idx_atomic"), "--set", "index.kind=atomic")
    return root


def _sets(*items):
    return [x for item in items for x in ("--set", item)]


def build_scratch_title(workdir: Path, out: Path) -> None:
    run_stage(
        "model",
        "--data",
        str(workdir / "data"),
        "--index",
        str(workdir / "idx_title"),
        "--out",
        str(out),
        *_sets(*TINY),
    )


@pytest.fixture(scope="module")
def scratch_title(workdir):
    out = workdir / "base_title"
    build_scratch_title(workdir, out)
    return out


def test_scratch_model_builds_saves_reloads_and_generates(workdir, scratch_title):
    index = ItemIndex.load(workdir / "idx_title")
    model, tok, meta = load_model(scratch_title, index)
    assert meta == {
        "index_fingerprint": index.fingerprint,
        "index_kind": "title",
        "prompt_style": "sequence",  # config/config.yaml: model.prompt
        "dataset": "data",
        "stage": "base",
        "base": "scratch",
        "trust_remote_code": False,
        "machine": describe(),  # where it was built (rere.machine)
    }
    assert type(model).__name__ == "Qwen2ForCausalLM" and not model.training
    assert tok.padding_side == "left" and tok.pad_token == "<|pad|>" and tok.eos_token == "<|endoftext|>"
    assert model.config.num_hidden_layers == 1 and model.config.hidden_size == 32
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    # Parameters by hand (H=32, 4 heads of 8, 2 KV heads -> K/V width 16, MLP 64, tied embeddings):
    # per layer q 32*32+32, k and v 32*16+16 each, o 32*32, MLP 3*32*64, two norms 2*32 = 9344;
    # plus the embeddings 32*V and the final norm 32.
    assert count_parameters(model) == 32 * len(tok) + 9344 + 32
    gen = json.loads((scratch_title / "generation_config.json").read_text())
    assert gen["do_sample"] is False and gen["eos_token_id"] == tok.eos_token_id
    # AutoTokenizer (which later code may use) splits text exactly as the saved tokenizer does.
    auto = AutoTokenizer.from_pretrained(scratch_title)
    text = 'History: "Blue King (1961)", "Ünïcødé’s 123"\n\nNext:\n"Love City (1999)"\n'
    assert auto(text)["input_ids"] == tok(text)["input_ids"]
    # Batched, left-padded greedy generation is deterministic.
    batch = tok(
        ["History: x\nNext:\n", 'History: "Love City (1961)", "Night Love (1960)"\nNext:\n'],
        return_tensors="pt",
        padding=True,
    )
    assert batch["attention_mask"][0, 0] == 0  # left padding
    out1 = model.generate(**batch, max_new_tokens=4)
    out2 = model.generate(**batch, max_new_tokens=4)
    assert out1.shape == (2, batch["input_ids"].shape[1] + 4) and torch.equal(out1, out2)


def test_scratch_build_is_deterministic(workdir, scratch_title):
    out = workdir / "base_title_again"
    build_scratch_title(workdir, out)
    assert (out / "tokenizer.json").read_bytes() == (scratch_title / "tokenizer.json").read_bytes()
    a, _, _ = load_model(scratch_title)
    b, _, _ = load_model(out)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_scratch_model_with_sid_tokens(workdir):
    out = workdir / "base_sid"
    run_stage(
        "model", "--data", str(workdir / "data"), "--index", str(workdir / "idx_sid"), "--out", str(out), *_sets(*TINY)
    )
    index = ItemIndex.load(workdir / "idx_sid")
    model, tok, meta = load_model(out, index)
    assert meta["index_kind"] == "sid"
    sid_ids = tok.convert_tokens_to_ids(index.new_tokens)
    assert len(set(sid_ids)) == len(index.new_tokens) and min(sid_ids) >= len(tok) - len(index.new_tokens)
    ids = item_token_ids(tok, index.codes, probe_prompts(index.codes, "compact", 0))
    # Each SID is its level tokens, then "\n", then EOS.
    first = index.codes[0]
    n_levels = first.count("<")
    assert ids[0][:n_levels] == tok.convert_tokens_to_ids(["<" + t for t in first.split("<")[1:]])
    assert tok.decode(ids[0][n_levels:-1]) == "\n" and ids[0][-1] == tok.eos_token_id
    assert model.get_input_embeddings().weight.shape[0] == len(tok)


def test_scratch_model_with_atomic_items_writes_an_item_in_three_tokens(workdir):
    out = workdir / "base_atomic"
    sets = _sets(*TINY, "model.prompt=sequence")
    run_stage(
        "model", "--data", str(workdir / "data"), "--index", str(workdir / "idx_atomic"), "--out", str(out), *sets
    )
    index = ItemIndex.load(workdir / "idx_atomic")
    model, tok, meta = load_model(out, index)
    assert meta["index_kind"] == "atomic"
    ids = item_token_ids(tok, index.codes, probe_prompts(index.codes, "sequence", 0, tok.eos_token))
    newline = tok.encode("\n")
    for code, item in zip(index.codes, ids, strict=True):
        # the item's own token (one per item, distinct), "\n", EOS
        assert item == [tok.convert_tokens_to_ids(code), *newline, tok.eos_token_id]
    assert len({item[0] for item in ids}) == len(index.codes)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)


def test_load_model_refuses_wrong_fingerprint_and_bad_folders(workdir, scratch_title, tmp_path):
    with pytest.raises(RereError, match="catalogue does not match the index the model was trained with"):
        load_model(scratch_title, ItemIndex.load(workdir / "idx_sid"))
    with pytest.raises(RereError, match="does not exist; run `rere model`"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RereError, match="has no rere.json"):
        load_model(tmp_path / "empty")
    (tmp_path / "empty" / "rere.json").write_text("{}")
    with pytest.raises(RereError, match="has no model weights"):
        load_model(tmp_path / "empty")
    # The CLI reports a mismatched index as an error, not a traceback.
    assert (
        main(
            ["model", "--data", str(workdir / "data"), "--index", str(tmp_path / "none"), "--out", str(tmp_path / "m")]
        )
        == 2
    )


def test_save_model_keeps_named_entries(workdir, scratch_title, tmp_path):
    model, tok, meta = load_model(scratch_title)
    out = tmp_path / "sft"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "step1").write_text("x")
    (out / "stale.txt").write_text("old")
    save_model(model, tok, out, {**meta, "stage": "sft"}, load_config(), keep=["checkpoints"])
    assert (out / "checkpoints" / "step1").read_text() == "x" and not (out / "stale.txt").exists()
    assert json.loads((out / "rere.json").read_text())["stage"] == "sft"
    assert (out / "config.yaml").is_file() and (out / "model.safetensors").is_file()


def test_scratch_config_cross_checks():
    defaults = schema_defaults("model", "scratch")
    with pytest.raises(RereError, match="hidden_size': 30 is not divisible by num_heads=4"):
        ScratchConfig(**{**defaults, "hidden_size": 30, "num_heads": 4})
    with pytest.raises(RereError, match="num_heads=4 is not a multiple of 3"):
        ScratchConfig(**{**defaults, "hidden_size": 32, "num_heads": 4, "num_kv_heads": 3})


def _tiny_gpt2(folder, texts):
    """A local GPT-2 checkpoint: byte-level BPE tokenizer (no pad token) + 1-layer model."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=350,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    spec = json.loads(backend.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in spec["merges"]]
    tok = GPT2Tokenizer(vocab=spec["vocab"], merges=merges)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=256))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok


def test_pretrained_local_folder_with_sid_tokens(workdir, tmp_path):
    titles = (workdir / "data" / "info.txt").read_text().splitlines()
    original, original_tok = _tiny_gpt2(tmp_path / "tiny-gpt2", ["History: Next: " + t for t in titles] * 5)
    assert original_tok.pad_token is None
    out = tmp_path / "base"
    sets = _sets("model.init=pretrained", f"model.name_or_path={tmp_path / 'tiny-gpt2'}")
    run_stage("model", "--data", str(workdir / "data"), "--index", str(workdir / "idx_sid"), "--out", str(out), *sets)
    index = ItemIndex.load(workdir / "idx_sid")
    model, tok, meta = load_model(out, index)
    assert type(model).__name__ == "GPT2LMHeadModel" and meta["base"] == str(tmp_path / "tiny-gpt2")
    assert tok.pad_token == tok.eos_token == "<|endoftext|>" and tok.padding_side == "left"
    old = len(original_tok)
    assert len(tok) == old + len(index.new_tokens)
    emb = model.get_input_embeddings().weight  # (V, H)
    assert emb.shape[0] == len(tok)
    before = original.get_input_embeddings().weight
    assert torch.equal(emb[:old], before)  # existing rows untouched
    expected = before.mean(dim=0)
    assert torch.allclose(emb[old:], expected.expand(len(index.new_tokens), -1), atol=1e-6)
    assert torch.equal(model.get_output_embeddings().weight, emb)  # still tied
    assert json.loads((out / "generation_config.json").read_text())["do_sample"] is False


def test_pretrained_refuses_remote_code_unless_trusted(workdir, tmp_path):
    folder = tmp_path / "custom"
    _tiny_gpt2(folder, ["a b c"] * 5)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "rere_toy_custom"
    config["auto_map"] = {"AutoConfig": "configuration_toy.ToyConfig", "AutoModelForCausalLM": "modeling_toy.ToyModel"}
    (folder / "config.json").write_text(json.dumps(config))
    sets = _sets("model.init=pretrained", f"model.name_or_path={folder}")
    argv = [
        "model",
        "--data",
        str(workdir / "data"),
        "--index",
        str(workdir / "idx_title"),
        "--out",
        str(tmp_path / "m"),
    ]
    cfg = load_config(overrides=["model.init=pretrained", f"model.name_or_path={folder}"])
    assert cfg["model"]["trust_remote_code"] is False
    from rere.model import load_pretrained

    with pytest.raises(RereError, match="ships its own model code.*model.trust_remote_code=true"):
        load_pretrained(cfg["model"], ItemIndex.load(workdir / "idx_title"))
    assert main([*argv, *sets, "-q"]) == 2
    assert not (tmp_path / "m").exists()
    with pytest.raises(RereError, match="could not be loaded as a causal LM"):
        load_pretrained(
            {**cfg["model"], "name_or_path": str(tmp_path / "nothing")}, ItemIndex.load(workdir / "idx_title")
        )
